"""``generate()`` for masked diffusion: iterative sub-token unmasking behind the transformers generation API.

One loop (:meth:`MDMPrimeGenerationMixin.generate`) runs every strategy. A strategy is a scheduler-like
object from ``sampling_mdm_prime.py`` (or the user's own :class:`SamplerStrategy` subclass). ``generate()``
reads as four phases: the configuration of the call, the canvas (what is fixed and what is generated), the
denoising loop (one :meth:`MDMPrimeGenerationMixin._denoising_step` per step), and finalisation.
Autoregressive decoding is never used: settings that only make sense for it raise.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput, logging

from .sampling_mdm_prime import (
    CONFIDENCE_MEASURES,
    STRATEGIES,
    TIME_GRIDS,
    AncestralStrategy,
    PredictorCorrectorStrategy,
    SamplerStepInput,
    SamplerStrategy,
    StateDependentStrategy,
    check_time_warp,
    content_words,
    counter_uniform,
    get_sampler_strategy,
    occurrence_index,
    seed_words,
    stream_keys,
)

logger = logging.get_logger(__name__)

DIFFUSION_DEFAULTS = {
    "num_steps": None,
    "time_grid": "uniform",
    "strategy": "ancestral",
    "confidence_measure": "probability",
    "threshold": 0.9,
    "block_length": None,
    "use_idle_cache": True,
    "sample_in_float64": True,
    "final_step": "sample",
    "output_history": False,
    "temperature_schedule": None,
    "time_warp": None,
    "corrector": None,
}
# Standard fields whose transformers defaults would change what is sampled (4.57 defaults to top_k=50 and
# greedy decoding): always written to generation_config.json so the file means the same on every version.
SAMPLING_DEFAULTS = {
    "do_sample": True,
    "temperature": 1.0,
    "top_k": None,
    "top_p": None,
    "num_return_sequences": 1,
}
# Settings of autoregressive decoding that masked diffusion cannot honour: (name, value that means "off").
AUTOREGRESSIVE_ONLY = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "stop_strings": None,
    "prompt_lookup_num_tokens": None,
    "force_words_ids": None,
    "constraints": None,
    "length_penalty": 1.0,
    "exponential_decay_length_penalty": None,
}
_HUB_LOADING_KWARGS = (
    "cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder",
)  # fmt: skip
AUTOREGRESSIVE_KWARGS = ("past_key_values", "assistant_model", "negative_prompt_ids", "prefix_allowed_tokens_fn")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class MDMPrimeGenerationConfig(GenerationConfig):
    r"""Generation settings for masked diffusion, next to the standard ones it reuses.

    Diffusion settings:
        num_steps: denoising steps T per call, split evenly over the blocks. Default: one step per generated
            position (per block: ``block_length`` steps). Each row takes its own default, so a row never
            depends on the others.
        time_grid: ``"uniform"`` or ``"cosine"`` spacing of a block's steps from t = 1 to t = 0.
        strategy: ``"ancestral"`` (the exact MDM-Prime sampler, default), ``"confidence"`` (MaskGIT / LLaDA /
            Dream ordering) or ``"threshold"`` (Fast-dLLM parallel decoding); ``generate(strategy=obj)`` also
            takes a :class:`SamplerStrategy` object. The last two are approximate samplers. ``"state_dependent"``
            is the exact sampler of GenMD4 models, which also run ``"ancestral"`` as it.
        confidence_measure: ``"probability"``, ``"margin"`` or ``"entropy"`` (confidence and threshold).
        threshold: the confidence a digit needs to be revealed by the threshold strategy.
        block_length: decode the generated positions in blocks of this many tokens, left to right
            (semi-autoregressive). ``None``: one block.
        use_idle_cache: skip the network on idle steps. Whether a step reveals anything is decided before
            the network is consulted, so skipping is exact, for time-conditioned networks too. ``False`` runs
            the naive sampler: the network at every step on every masked position (same samples).
        sample_in_float64: draw tokens by float64 inverse CDF. ``False`` uses float32 Gumbel-max, which
            suppresses rare tokens; it exists for comparisons only.
        final_step: ``"sample"`` or ``"argmax"`` for the draws of each block's last step.
        output_history: with ``return_dict_in_generate``, also return the sub-tokens after every step.

    The MDM-Prime image sampler's knobs (images.md; the paper grid-searched them per (ℓ, NFE) cell, e.g. CIFAR-10
    ℓ = 2 at NFE 512: ``temperature_schedule=(-0.2, 2, 1)``, ``corrector=(16, 2)``, ``time_warp=(1, 1.7, 0)``).
    They are written in the reference code's time τ = 1 - t (τ = 0 all masked) and apply to text models too:
        temperature_schedule: (a, b, c): the filtered log-probabilities are divided by ``a τ^b + c`` (after
            ``temperature``); it must stay positive on [0, 1].
        time_warp: (a, e, c): warp the time grid, ``τ' = 1 - a (1 - τ)^e + c`` (see ``warp_times``; e = 0: none).
        corrector: (a, e): re-mask revealed digits at rate ``a τ^e (1 - τ)^e`` and reveal correspondingly faster
            (:class:`PredictorCorrectorStrategy`, ancestral strategy only; approximate).

    Reused standard settings: ``max_new_tokens`` / ``max_length``, ``do_sample`` (default True),
    ``temperature``, ``top_k``, ``top_p`` (token level, on the filtered distribution),
    ``num_return_sequences``, ``eos_token_id``, ``pad_token_id``, ``return_dict_in_generate``.
    """

    def __init__(self, **kwargs):
        # Set before GenerationConfig.__init__, which validates (and so reads them) at its end.
        for name, default in DIFFUSION_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        for name, default in SAMPLING_DEFAULTS.items():
            kwargs.setdefault(name, default)
        super().__init__(**kwargs)

    def validate(self, *args, **kwargs):
        super().validate(*args, **kwargs)
        for name in ("num_steps", "block_length"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        choices = {
            "time_grid": TIME_GRIDS,
            "strategy": tuple(STRATEGIES),
            "confidence_measure": CONFIDENCE_MEASURES,
            "final_step": ("sample", "argmax"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name, size in (("temperature_schedule", 3), ("time_warp", 3), ("corrector", 2)):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, (list, tuple)) or len(value) != size or not all(_is_number(v) for v in value)
            ):
                raise ValueError(f"{name} must be None or {size} numbers, got {value!r}.")
        if self.temperature_schedule is not None:
            a, b, c = self.temperature_schedule
            if not (b >= 0 and c > 0 and a + c > 0):
                raise ValueError(
                    f"temperature_schedule (a, b, c) = {tuple(self.temperature_schedule)} must give a positive "
                    "temperature a·τ^b + c on [0, 1]: b >= 0, c > 0 and a + c > 0."
                )
        if self.time_warp is not None:
            check_time_warp(self.time_warp)
        if self.corrector is not None:
            if min(self.corrector) < 0:
                raise ValueError(f"corrector (rate, exponent) must be non-negative, got {tuple(self.corrector)}.")
            if self.strategy not in ("ancestral", "predictor_corrector"):
                raise ValueError(f"corrector applies to the ancestral sampler, not to strategy={self.strategy!r}.")
        if not _is_number(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}.")
        if not _is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}.")
        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens) or self.max_new_tokens < 0):
            raise ValueError(f"max_new_tokens must be a non-negative integer or None, got {self.max_new_tokens!r}.")
        if self.max_length is not None and (not _is_int(self.max_length) or self.max_length < 0):
            raise ValueError(f"max_length must be a non-negative integer or None, got {self.max_length!r}.")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {self.top_p!r}.")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None, got {self.top_k!r}.")
        if self.temperature is not None and (not _is_number(self.temperature) or self.temperature <= 0):
            raise ValueError(f"temperature must be a positive number or None, got {self.temperature!r}.")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be a non-negative token id or None, got {value!r}.")
        eos = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
        if any(e is not None and (not _is_int(e) or e < 0) for e in eos):
            raise ValueError(f"eos_token_id must be a non-negative token id (or a list of them), got {eos!r}.")

    def to_diff_dict(self):
        out = super().to_diff_dict()
        for name in (*DIFFUSION_DEFAULTS, *SAMPLING_DEFAULTS):
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_model_config(cls, model_config) -> MDMPrimeGenerationConfig:
        """Defaults for a model: its special token ids, nothing else (transformers 5 calls this at init)."""
        config = model_config if isinstance(model_config, dict) else model_config.to_dict()
        ids = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        return cls(**ids)

    @classmethod
    def from_generation_config(cls, config: GenerationConfig | None) -> MDMPrimeGenerationConfig:
        """A copy as ``MDMPrimeGenerationConfig``. A plain ``GenerationConfig`` (what transformers 4.57 gives a
        model loaded from disk) keeps only the values that differ from its class defaults, so 4.57's
        autoregressive defaults (``top_k=50``, greedy) never leak into diffusion sampling."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return copy.deepcopy(config)
        values = config.to_diff_dict()
        values.pop("transformers_version", None)
        return cls(**values)


@dataclass
class MDMPrimeGenerateOutput(ModelOutput):
    """Output of :meth:`MDMPrimeGenerationMixin.generate` with ``return_dict_in_generate=True``.

    Args:
        sequences: ``(B · num_return_sequences, L)`` token ids: the prompt (with its padding) and the generated
            tokens; after a row's first generated EOS, generated positions hold ``pad_token_id``.
        nfe: number of network evaluations (idle steps skip the network unless ``use_idle_cache=False``).
        num_steps: denoising steps run by the loop (fewer if a callback stopped early).
        idle_steps: ``(B · num_return_sequences,)`` steps of each row in which the row did not change.
        row_nfe: ``(B · num_return_sequences,)`` network evaluations that scored each row (what the row would
            cost alone; adaptive strategies make it differ between rows).
        history: per step, the ``(B · n, L, ℓ)`` sub-tokens after it (with ``output_history``); after an early
            stop, also after the final fill pass.
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    num_steps: int | None = None
    idle_steps: torch.LongTensor | None = None
    row_nfe: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None


@dataclass
class MDMPrimeSamplerState:
    """What a ``step_callback`` sees after each step; return True from the callback to stop early (the
    remaining masked sub-tokens are then filled in one final pass at each row's current noise level). A step
    streamer (an object with ``put_step``) gets the same states, plus the initial canvas (``step=0``) and the
    state after an early stop's fill pass (``final_fill=True``).

    Args:
        step: steps run so far. t, s: ``(B,)`` each row's time before and after this step (within its block).
        sub_ids: ``(B, L, ℓ)`` the digits after this step. nfe: network evaluations so far.
        fixed: ``(B, L, ℓ)`` bool, the digits that never change (prompt, template, conditioning).
        attention_mask: ``(B, L)`` bool, the real positions (False: padding).
        final_fill: True for the state after an early stop's one-pass fill.
    """

    step: int
    t: torch.Tensor
    s: torch.Tensor
    sub_ids: torch.Tensor
    nfe: int
    fixed: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    final_fill: bool = False


@dataclass
class _Canvas:
    sub_ids: torch.Tensor  # (B, L, ℓ) digits, mask id where unknown
    fixed: torch.Tensor  # (B, L, ℓ) bool, digits that never change (prompt, template, conditioning)
    real: torch.Tensor  # (B, L) bool, attention mask
    filler: torch.Tensor  # (B, L) ids returned at padded positions
    keys: torch.Tensor  # (B,) random-stream key of each row
    counters: torch.Tensor  # (B, L, ℓ + 1) per-element counters: rank among the row's real tokens, then slot

    @property
    def generated(self) -> torch.Tensor:
        """(B, L) positions with a digit to generate."""
        return (~self.fixed).any(-1) & self.real


@dataclass
class _DenoisingLoop:
    """The sampler's state between steps (one generate() call)."""

    canvas: _Canvas
    config: MDMPrimeGenerationConfig
    strategy: SamplerStrategy
    processors: LogitsProcessorList
    block_of: torch.Tensor  # (B, L) block index of each generated position, -1 elsewhere
    num_blocks: torch.Tensor  # (B,)
    network_mask: torch.Tensor | None  # the attention mask for the network (None: nothing padded)
    y: torch.Tensor  # (B, L, ℓ) current digits
    block: torch.Tensor  # (B,) each row's current block
    step: torch.Tensor  # (B,) step within the current block
    idle: torch.Tensor  # (B,)
    row_nfe: torch.Tensor  # (B,)
    nfe: int = 0
    iteration: int = 0
    history: list | None = None
    streaming: _StreamState | None = None
    network_kwargs: dict = field(default_factory=dict)  # extra inputs of every network call
    token_sets: torch.Tensor | None = None  # (K, C) bool, allowed tokens of each constraint
    token_set_ids: torch.Tensor | None = None  # (B, L) long, the constraint of each position

    @property
    def running(self) -> torch.Tensor:
        return self.block < self.num_blocks


class MDMPrimeGenerationMixin:
    """``generate()`` by iterative sub-token unmasking. A class whose name ends in ``GenerationMixin`` makes
    transformers' ``can_generate()`` true on 4.57 and 5.x."""

    generation_config_class = MDMPrimeGenerationConfig

    def adjust_generation_fn(
        self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs
    ):
        """Called by transformers 5 ``from_pretrained``: load generation_config.json as MDMPrimeGenerationConfig."""
        if generation_config is not None:
            self.generation_config = MDMPrimeGenerationConfig.from_generation_config(generation_config)
        elif pretrained_model_name_or_path is not None:
            loading = {key: kwargs[key] for key in _HUB_LOADING_KWARGS if key in kwargs}
            try:
                self.generation_config = MDMPrimeGenerationConfig.from_pretrained(
                    pretrained_model_name_or_path, _from_auto=from_auto_class, _from_pipeline=from_pipeline, **loading
                )
            except OSError:
                logger.info("no generation_config.json found; using the model's default generation config.")

    # ----------------------------------------------------------------------------------------------------------
    # Phase 1: the configuration of this call
    # ----------------------------------------------------------------------------------------------------------

    def _prepare_generation_config(
        self, generation_config: GenerationConfig | None = None, use_model_defaults: bool | None = None, **kwargs
    ) -> tuple[MDMPrimeGenerationConfig, dict]:
        """transformers' contract (its pipelines call this too): the settings of a call, as a new
        :class:`MDMPrimeGenerationConfig`, and the kwargs that are not generation settings.

        Precedence: ``kwargs`` > an explicit ``generation_config`` > the model's ``generation_config``. With an
        explicit config, fields it leaves at their defaults take the model's values (``use_model_defaults``,
        as in transformers); ``use_model_defaults=False`` takes only the model's special token ids.
        """
        model_config = MDMPrimeGenerationConfig.from_generation_config(self.generation_config)
        if generation_config is None:
            config = model_config
        else:
            config = MDMPrimeGenerationConfig.from_generation_config(generation_config)
            defaults = MDMPrimeGenerationConfig()
            explicit = set(generation_config.to_diff_dict())
            for key, value in model_config.to_diff_dict().items():
                if key == "transformers_version" or (use_model_defaults is False and not key.endswith("token_id")):
                    continue  # without model defaults, only the special token ids are taken (transformers' rule)
                if key not in explicit or getattr(config, key, None) == getattr(defaults, key, None):
                    setattr(config, key, value)
        unused = config.update(**kwargs)
        config.validate()
        return config, unused

    def _call_settings(self, generation_config, kwargs: dict) -> tuple[MDMPrimeGenerationConfig, set[str]]:
        """The call's config, and the names of the fields the call set itself (kwargs or an explicit config)."""
        for name in AUTOREGRESSIVE_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} is for autoregressive decoding; masked diffusion generation cannot use it.")
            kwargs.pop(name, None)
        kwargs.pop("use_cache", None)  # an autoregressive KV-cache switch; diffusion has its own idle-step cache
        config, unused = self._prepare_generation_config(generation_config, **kwargs)
        if unused:
            raise ValueError(
                f"generate() got arguments it does not use: {sorted(unused)}. Masked diffusion takes generation "
                "settings (see MDMPrimeGenerationConfig) and no extra model inputs."
            )
        for name, off in AUTOREGRESSIVE_ONLY.items():
            value = getattr(config, name, off)
            if value is not None and value != off:
                raise ValueError(
                    f"{name}={value!r} belongs to autoregressive decoding and cannot be honoured by masked "
                    "diffusion generation; unset it (this model never decodes left to right)."
                )
        vocab = self.config.vocab_size
        eos = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
        for name, values in (("pad_token_id", [config.pad_token_id]), ("eos_token_id", eos)):
            if any(v is not None and v >= vocab for v in values):
                raise ValueError(f"{name}={values} is not a token id of this model (vocab_size={vocab}).")
        from_call = set(kwargs)
        if generation_config is not None:
            from_call |= set(generation_config.to_diff_dict()) - {*DIFFUSION_DEFAULTS, *SAMPLING_DEFAULTS}
        return config, from_call

    def _num_new_tokens(self, length: int, has_template: bool, config, from_call: set[str]) -> int:
        """Positions appended after the prompt. Length fields set in the call win over the saved config;
        a template (infilling, sub-token conditioning) is filled in place unless the call asks for more."""
        if {"max_new_tokens", "max_length"} <= from_call and config.max_new_tokens is not None:
            logger.warning(
                f"Both `max_new_tokens` (={config.max_new_tokens}) and `max_length` (={config.max_length}) seem to "
                "have been set. `max_new_tokens` will take precedence."
            )
        if "max_new_tokens" in from_call and config.max_new_tokens is not None:
            return config.max_new_tokens
        if "max_length" in from_call and config.max_length is not None:
            return max(0, config.max_length - length)
        if has_template:
            return 0
        if config.max_new_tokens is not None:
            return config.max_new_tokens
        if config.max_length is not None:
            return max(0, config.max_length - length)
        logger.warning_once("neither max_new_tokens nor max_length is set; generating 20 positions in total.")
        return max(0, 20 - length)

    def _pad_id(self, config) -> int:
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
        return int(pad) if pad is not None else 0

    def _logits_processors(self, config, user: LogitsProcessorList | None) -> LogitsProcessorList:
        processors = LogitsProcessorList(user or [])
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(top_k=config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p))
        return processors

    # ----------------------------------------------------------------------------------------------------------
    # Phase 2: the canvas
    # ----------------------------------------------------------------------------------------------------------

    def _check_inputs(self, input_ids, attention_mask, infill_mask, sub_token_ids, seed) -> None:
        """Types and shapes of generate()'s tensors, checked once at the entry point."""
        for name, value in (
            ("input_ids", input_ids),
            ("attention_mask", attention_mask),
            ("infill_mask", infill_mask),
            ("sub_token_ids", sub_token_ids),
        ):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor, got {type(value).__name__}; tokenize with "
                    "return_tensors='pt' or wrap it in torch.tensor(...)."
                )
            if value is not None and (value.is_floating_point() or value.is_complex()):
                raise ValueError(f"{name} must be an integer or bool tensor, got dtype {value.dtype}.")
        if seed is not None and not _is_int(seed):
            seeds = seed.tolist() if isinstance(seed, torch.Tensor) and seed.dim() == 1 else seed
            rows = next((v.shape[0] for v in (input_ids, sub_token_ids) if v is not None and v.dim() > 1), None)
            if not (
                isinstance(seeds, (list, tuple))
                and all(_is_int(v) and -(2**63) <= v < 2**63 for v in seeds)
                and len(seeds) == rows
            ):
                raise ValueError(
                    f"seed must be an integer, None, or one 64-bit integer per input row (a list or 1-D tensor of "
                    f"{rows if rows is not None else 'B'} values), got {seed!r}."
                )
        if attention_mask is not None:
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must hold 0 (padding) and 1 (real tokens) only.")
            real = attention_mask.bool()
            if real.dim() != 2:
                raise ValueError(f"attention_mask must have shape (batch, length), got {tuple(real.shape)}.")
            runs = (real & ~torch.nn.functional.pad(real, (1, 0))[:, :-1]).sum(-1)  # starts of runs of 1s
            touches_end = real[:, :1].any(-1) | real[:, -1:].any(-1)
            if bool((runs > 1).any()) or bool((real.any(-1) & ~touches_end).any()):
                raise ValueError(
                    "attention_mask must be left- or right-padded: each row's real tokens form one run that "
                    "starts at the first or ends at the last position (no holes)."
                )

    def _template_from_sub_token_ids(self, sub_token_ids, attention_mask, config) -> tuple[torch.Tensor, ...]:
        """``(B, L, ℓ)`` digits with masks -> (sub_ids, fixed, real, filler): the masked digits are generated."""
        codec, device = self.codec, self.device
        if sub_token_ids.dim() != 3:
            raise ValueError(f"sub_token_ids must have shape (batch, length, ℓ), got {tuple(sub_token_ids.shape)}.")
        codec.check_sub_ids(sub_token_ids, "sub_token_ids")
        sub_ids = sub_token_ids.to(device)
        real = torch.ones(sub_ids.shape[:2], dtype=torch.bool, device=device)
        if attention_mask is not None:
            if attention_mask.shape != sub_ids.shape[:2]:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != sub_token_ids shape "
                    f"{tuple(sub_ids.shape[:2])} (batch, length)."
                )
            real = attention_mask.to(device).bool()
        fixed = (sub_ids != codec.mask_id) | ~real.unsqueeze(-1)
        sub_ids = sub_ids.masked_fill(~real.unsqueeze(-1), codec.mask_id)
        impossible = ~codec.consistency_mask(sub_ids).any(-1) & real
        if bool(impossible.any()):
            raise ValueError(
                f"sub_token_ids at (batch, position) {tuple(impossible.nonzero()[0].tolist())} fix digits that "
                f"match no token id below vocab_size={codec.vocab_size}."
            )
        filler = torch.full(real.shape, self._pad_id(config), dtype=torch.long, device=device)
        return sub_ids, fixed, real, filler

    def _template_from_input_ids(self, input_ids, attention_mask, infill_mask) -> tuple[torch.Tensor, ...]:
        """``(B, P)`` prompts (or a template with ``infill_mask``) -> (sub_ids, fixed, real, filler)."""
        device = self.device
        if input_ids is None:
            input_ids = torch.empty(1, 0, dtype=torch.long, device=device)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
        input_ids = input_ids.to(device)
        real = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
        )
        if real.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(real.shape)} != input_ids shape {tuple(input_ids.shape)}.")
        sub_ids = self.codec.encode(torch.where(real, input_ids, torch.zeros_like(input_ids)))  # validates the ids
        fixed = torch.ones_like(sub_ids, dtype=torch.bool)
        if infill_mask is not None:
            infill = infill_mask.to(device).bool()
            if infill.shape != input_ids.shape:
                raise ValueError(
                    f"infill_mask shape {tuple(infill.shape)} != input_ids shape {tuple(input_ids.shape)}."
                )
            if bool((infill & ~real).any()):
                raise ValueError("infill_mask marks padded positions; only real positions can be filled.")
            fixed &= ~infill.unsqueeze(-1)
            sub_ids = sub_ids.masked_fill(infill.unsqueeze(-1), self.codec.mask_id)
        return sub_ids, fixed, real, input_ids.clone()

    def _prepare_canvas(
        self, input_ids, attention_mask, infill_mask, sub_token_ids, config, from_call, seed
    ) -> _Canvas:
        """The canvas: fixed digits, positions to generate (appended after each prompt), and each row's key."""
        codec, device = self.codec, self.device
        if sub_token_ids is not None:
            if input_ids is not None or infill_mask is not None:
                raise ValueError("pass either sub_token_ids or input_ids (with an optional infill_mask), not both.")
            sub_ids, fixed, real, filler = self._template_from_sub_token_ids(sub_token_ids, attention_mask, config)
        else:
            sub_ids, fixed, real, filler = self._template_from_input_ids(input_ids, attention_mask, infill_mask)

        has_template = infill_mask is not None or sub_token_ids is not None
        new_tokens = self._num_new_tokens(sub_ids.shape[1], has_template, config, from_call)
        if new_tokens:
            sub_ids, fixed, real, filler = _append_masked(
                sub_ids, fixed, real, filler, new_tokens, codec.mask_id, self._pad_id(config)
            )
        if sub_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt plus new tokens is {sub_ids.shape[1]} positions, more than max_position_embeddings="
                f"{self.config.max_position_embeddings}."
            )
        if not bool((~fixed & real.unsqueeze(-1)).any()):
            raise ValueError("nothing to generate: set max_new_tokens, an infill_mask, or masked sub_token_ids.")

        # Random streams: a row's key depends on the seed, its own conditioning (hashed over its real tokens, so
        # padding does not enter), how many earlier rows have the same conditioning (and, with per-row seeds, the
        # same seed), and its return index.
        ell = codec.num_sub_tokens
        rank = (real.long().cumsum(1) - 1).clamp(min=0)
        counters = rank.unsqueeze(-1) * (ell + 1) + torch.arange(ell + 1, device=device)
        content = content_words(sub_ids, fixed & real.unsqueeze(-1), counters[..., 1:])
        copies = config.num_return_sequences
        expand = lambda x: x.repeat_interleave(copies, dim=0)  # noqa: E731
        if isinstance(seed, (list, tuple, torch.Tensor)):  # one seed per row (validated in _check_inputs)
            seed = torch.as_tensor(seed, dtype=torch.long, device=device)
            occurrence = occurrence_index(content ^ seed_words(seed)).repeat_interleave(copies)
            seed = expand(seed)
        else:
            occurrence = occurrence_index(content).repeat_interleave(copies)
        streams = occurrence * copies + torch.arange(copies, device=device).repeat(sub_ids.shape[0])
        keys = stream_keys(seed, streams, expand(content))
        return _Canvas(expand(sub_ids), expand(fixed), expand(real), expand(filler), keys, expand(counters))

    # ----------------------------------------------------------------------------------------------------------
    # Phase 3: the denoising loop
    # ----------------------------------------------------------------------------------------------------------

    def _start_loop(self, canvas, config, strategy, processors, streamer) -> _DenoisingLoop:
        """Blocks and steps per row: every default is a function of the row alone."""
        generated = canvas.generated
        count = generated.sum(1)
        block_length = torch.full_like(count, config.block_length) if config.block_length else count.clamp(min=1)
        rank = generated.long().cumsum(1) - 1
        block_of = torch.where(generated, rank // block_length.unsqueeze(1), torch.full_like(rank, -1))
        num_blocks = -(-count // block_length)
        if config.num_steps is None or strategy.adaptive:
            steps_per_block = block_length
        else:
            blocks = num_blocks.clamp(min=1)
            bad = (config.num_steps % blocks != 0).nonzero().flatten()
            if len(bad):
                row = int(bad[0])
                raise ValueError(
                    f"num_steps={config.num_steps} must be divisible by the number of blocks: row {row} has "
                    f"{int(count[row])} positions to generate, {int(blocks[row])} blocks of block_length="
                    f"{int(block_length[row])}."
                )
            steps_per_block = config.num_steps // blocks
        strategy.set_timesteps(steps_per_block, self.codec, self.noise_schedule)
        batch = count.shape[0]
        zeros = torch.zeros(batch, dtype=torch.long, device=count.device)
        return _DenoisingLoop(
            canvas=canvas,
            config=config,
            strategy=strategy,
            processors=processors,
            block_of=block_of,
            num_blocks=num_blocks,
            network_mask=None if bool(canvas.real.all()) else canvas.real,
            y=canvas.sub_ids.clone(),
            block=zeros.clone(),
            step=zeros.clone(),
            idle=zeros.clone(),
            row_nfe=zeros.clone(),
            history=[] if config.output_history else None,
            streaming=_StreamState(streamer, canvas, self.codec, config.eos_token_id) if streamer else None,
        )

    def _step_input(self, loop: _DenoisingLoop, whole_canvas: bool = False) -> SamplerStepInput:
        """What the strategy sees: each running row's current block (or, for the final fill, everything left)."""
        canvas, config, strategy = loop.canvas, loop.config, loop.strategy
        in_block = canvas.generated if whole_canvas else (loop.block_of == loop.block.unsqueeze(1))
        block = in_block.unsqueeze(-1) & ~canvas.fixed & loop.running.view(-1, 1, 1)
        last = torch.zeros_like(loop.running) if strategy.adaptive else loop.step + 1 >= strategy.steps_per_block
        greedy = torch.full_like(loop.running, not config.do_sample)
        if config.final_step == "argmax":
            greedy |= torch.ones_like(last) if whole_canvas else last
        return SamplerStepInput(
            sub_ids=loop.y,
            block=block,
            updatable=block & (loop.y == self.codec.mask_id),
            step=loop.step,
            uniform=counter_uniform(canvas.keys, loop.iteration, canvas.counters),
            greedy=greedy,
        )

    def _sampling_scores(self, loop: _DenoisingLoop, scored: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` processed log-probabilities at ``scored``: the network's distribution restricted to the
        tokens consistent with the revealed digits (always, also for ``carry_over=False`` models, so every
        decoded token is a valid id), then the logits processors, temperature, top-k and top-p.
        ``noise_level`` ``(B,)`` is what a time-conditioned network is told."""
        noise_level = noise_level.float() if self.config.time_conditioning else None
        logits = self.token_logits(
            loop.y, loop.network_mask, noise_level, scored, check_inputs=False, **loop.network_kwargs
        ).float()
        allowed = self.codec.consistency_mask(loop.y[scored], check=False)
        if loop.token_sets is not None:
            # Constrained positions draw only from their set; digits are revealed from the constrained
            # distribution's marginals, so a partly revealed token always keeps an allowed completion.
            allowed &= loop.token_sets[loop.token_set_ids[scored]]
        log_probs = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
        row_of = torch.arange(loop.y.shape[0], device=loop.y.device).unsqueeze(1).expand_as(scored)[scored]
        if loop.processors:
            tokens = self._decided_tokens(loop.y, loop.canvas, loop.config)
            log_probs = loop.processors(tokens[row_of], log_probs)
        if loop.config.temperature_schedule is not None:
            a, b, c = loop.config.temperature_schedule
            tau = 1.0 - loop.strategy.times(loop.step)[0]  # the reference code's time: 0 = all masked
            temperature = (a * tau**b + c).float()[row_of].unsqueeze(1)
            log_probs = (log_probs / temperature).log_softmax(-1)
        return log_probs

    def _denoising_step(self, loop: _DenoisingLoop) -> None:
        """One step of every running row: plan without the model, call it only if something is revealed."""
        strategy, y = loop.strategy, loop.y
        state = self._step_input(loop)
        # Without the idle cache every masked position is scored (a superset of the plan: same samples).
        scored = strategy.plan(state)
        if not loop.config.use_idle_cache:
            scored = scored | state.updatable.any(-1)
        if bool(scored.any()):
            scores = self._sampling_scores(loop, scored, strategy.noise_level(state))
            loop.y = strategy.step(scores, scored, state).sub_ids
            loop.nfe += 1
            loop.row_nfe += scored.any(1)
        running = loop.running
        loop.idle += running & ~(loop.y != y).flatten(1).any(1)
        # Advance each running row: to the next block after a fixed number of steps, or (adaptive strategies)
        # once its block is fully revealed.
        loop.step = loop.step + running
        if strategy.adaptive:
            done = ~(state.block & (loop.y == self.codec.mask_id)).flatten(1).any(1)
        else:
            done = loop.step >= strategy.steps_per_block
        done &= running
        loop.block = loop.block + done
        loop.step = torch.where(done, torch.zeros_like(loop.step), loop.step)
        loop.iteration += 1
        if loop.history is not None:
            loop.history.append(loop.y.clone())
        if loop.streaming is not None:
            loop.streaming.push(loop.y)

    def _fill_remaining(self, loop: _DenoisingLoop) -> None:
        """After an early stop: draw every still-masked digit in one pass, telling a time-conditioned network
        each row's current noise level (not 0: most of the canvas may still be masked)."""
        noise_level = loop.strategy.noise_level(self._step_input(loop))
        state = self._step_input(loop, whole_canvas=True)
        scored = state.updatable.any(-1)
        if not bool(scored.any()):
            return
        tokens, _ = loop.strategy.draw(self._sampling_scores(loop, scored, noise_level), scored, state)
        loop.y = loop.strategy.reveal(state, tokens, state.updatable).sub_ids
        loop.nfe += 1
        loop.row_nfe += scored.any(1)

    def _check_token_sets(self, token_sets, token_set_ids, canvas: _Canvas) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate a constraint against the canvas: shapes, index range, and that every generated position
        can still become one of its allowed tokens given the digits it already has."""
        if token_sets is None or token_set_ids is None:
            raise ValueError("token_sets and token_set_ids go together: pass both or neither.")
        rows, length = canvas.real.shape
        if token_sets.dtype != torch.bool or token_sets.dim() != 2 or token_sets.shape[1] != self.codec.vocab_size:
            raise ValueError(
                f"token_sets must be a (K, {self.codec.vocab_size}) bool tensor (one row per allowed vocabulary), "
                f"got {tuple(token_sets.shape)} {token_sets.dtype}."
            )
        if token_set_ids.dtype != torch.long or tuple(token_set_ids.shape) != (rows, length):
            raise ValueError(
                f"token_set_ids must be a ({rows}, {length}) long tensor: one set index per position of the canvas "
                f"(output rows × positions, prompt and padding included), got {tuple(token_set_ids.shape)} "
                f"{token_set_ids.dtype}."
            )
        if token_set_ids.numel() and (int(token_set_ids.min()) < 0 or int(token_set_ids.max()) >= len(token_sets)):
            raise ValueError(f"token_set_ids must index token_sets, i.e. lie in [0, {len(token_sets)}).")
        device = canvas.sub_ids.device
        token_sets, token_set_ids = token_sets.to(device), token_set_ids.to(device)
        generated = canvas.generated
        agree = self.codec.consistency_mask(canvas.sub_ids[generated])  # (N, C) tokens agreeing with fixed digits
        possible = (token_sets[token_set_ids[generated]] & agree).any(-1)
        if not bool(possible.all()):
            row, position = generated.nonzero()[(~possible).nonzero()[0, 0]].tolist()
            raise ValueError(
                f"row {row}, position {position}: no token of its set (token_sets[{int(token_set_ids[row, position])}])"
                " agrees with the digits it already has; the constraint cannot be met."
            )
        return token_sets, token_set_ids

    def _decided_tokens(self, y, canvas, config) -> torch.Tensor:
        decided = (y != self.codec.mask_id).all(-1) & canvas.real
        digits = y.masked_fill(~decided.unsqueeze(-1), 0)
        tokens = (digits * torch.tensor(self.codec.place_values, device=y.device)).sum(-1)
        return torch.where(decided, tokens, torch.full_like(tokens, self._pad_id(config)))

    # ----------------------------------------------------------------------------------------------------------
    # Phase 4: finalisation
    # ----------------------------------------------------------------------------------------------------------

    def _finalize(self, y, canvas, config) -> torch.Tensor:
        """Decode, restore padding, and replace what follows the first generated EOS by padding."""
        if bool(((y == self.codec.mask_id) & canvas.real.unsqueeze(-1)).any()):
            raise RuntimeError("sampling ended with masked sub-tokens; this is a bug, please report it.")
        real_digits = y.masked_fill(~canvas.real.unsqueeze(-1), 0)
        tokens = self.codec.decode(real_digits)
        tokens = torch.where(canvas.real, tokens, canvas.filler)
        eos = config.eos_token_id
        if eos is not None:
            eos_ids = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=y.device)
            generated = canvas.generated
            hit = torch.isin(tokens, eos_ids) & generated
            after = (hit.long().cumsum(1) - hit.long()) > 0
            tokens = torch.where(after & generated, torch.full_like(tokens, self._pad_id(config)), tokens)
        return tokens

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        streamer=None,
        infill_mask: torch.Tensor | None = None,
        sub_token_ids: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
        seed: int | Sequence[int] | torch.Tensor | None = None,
        step_callback: Callable[[MDMPrimeSamplerState], bool | None] | None = None,
        strategy: str | SamplerStrategy | None = None,
        network_kwargs: dict | None = None,
        token_sets: torch.Tensor | None = None,
        token_set_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.LongTensor | MDMPrimeGenerateOutput:
        r"""Generate by iterative sub-token unmasking (docs/guides/generation.md).

        Inputs (one of):
            * ``input_ids`` ``(B, P)`` prompts (+ ``attention_mask`` with left or right padding): the prompt never
              changes and ``max_new_tokens`` masked positions follow each row's last real token.
            * ``input_ids`` as a template + ``infill_mask`` ``(B, L)`` bool: fill exactly the marked positions.
              Nothing is appended unless the call itself sets ``max_new_tokens`` or ``max_length`` (a saved
              generation config's length does not apply to templates).
            * ``sub_token_ids`` ``(B, L, ℓ)`` with ``codec.mask_id`` where unknown: sub-token conditioning (the
              paper's imputation: tokens with some digits fixed). Appends like a template.
            * nothing: unconditional generation of ``max_new_tokens`` tokens.

        Args:
            generation_config: an :class:`MDMPrimeGenerationConfig` (a plain ``GenerationConfig`` is converted);
                ``**kwargs`` override its fields, e.g. ``max_new_tokens=64, num_steps=128, top_p=0.9``. Fields set
                in the call win over the model's saved config; if the call sets both ``max_new_tokens`` and
                ``max_length``, ``max_new_tokens`` wins (with transformers' warning).
            logits_processor: applied to the ``(N, C)`` filtered log-probabilities of the positions being
                updated (``input_ids`` given to them is ``(N, L)``: each position's sequence, undecided tokens
                as ``pad_token_id``), before temperature / top-k / top-p.
            streamer: e.g. ``TextStreamer`` (batch size 1): tokens are pushed in position order as soon as
                every position before them is decided. A *step streamer*, an object with ``put_step(state)`` and
                ``end()``, instead receives the whole canvas (any batch size) as an :class:`MDMPrimeSamplerState`:
                the initial one, then after every step exactly what ``output_history`` records
                (``modeling_mdm_prime.tools.unmasking_view.UnmaskingRecorder`` renders it).
            generator / seed: reproducibility. Each output row draws its noise from a stream keyed by (seed, its
                own prompt or template, the number of earlier rows in the batch with the same prompt, its index
                among ``num_return_sequences``), counted by step and by position among the row's real tokens.
                So a row's output does not depend on the other prompts in the batch or on padding, and a batch
                ``[A, A]`` gives the same two samples as ``[A]`` with ``num_return_sequences=2``.
                ``seed`` may also be one integer per input row (a list or 1-D tensor): each row then draws from
                its own seed's streams, so its output is a function of the row and its seed alone, whatever else
                is in the batch or on other processes (distributed RL rollouts, ``tools.grpo``).
            step_callback: called with an :class:`MDMPrimeSamplerState` after every step; returning True stops
                early and fills the remaining masked sub-tokens in one final pass.
            strategy: a strategy name (``"ancestral"``, ``"confidence"``, ``"threshold"``, ``"state_dependent"``) or
                a :class:`SamplerStrategy` object (your own subclass, or e.g. ``ThresholdStrategy(0.8, "margin")``).
                GenMD4 models (``noise_schedule="learnable_polynomial"``) run ``"ancestral"`` as
                :class:`StateDependentStrategy`, its exact counterpart for state-dependent schedules.
            network_kwargs: extra inputs of every network call (``token_logits``), like diffusers'
                ``cross_attention_kwargs``; the image model passes its ``class_labels`` and ``guidance_scale`` here.
                Per-row tensors must already have one row per output row (``num_return_sequences`` included).
            token_sets / token_set_ids: constrained infilling. ``token_sets`` ``(K, C)`` bool lists K allowed
                vocabularies; ``token_set_ids`` ``(B · n, L)`` long gives each position of the canvas (prompt
                and padding included, one row per output row) the index of its set. Every generated token at
                position p of row b is then drawn from ``softmax(logits)`` restricted to
                ``token_sets[token_set_ids[b, p]]`` (and to the tokens consistent with its revealed digits): a
                per-position form of transformers' ``prefix_allowed_tokens_fn``. A set of all True leaves a
                position free. Used for structured output by infilling (a JSON template with typed holes).

        Batched = one at a time: in float32, each row equals its single-prompt output exactly. In bfloat16 or
        float16 the noise is still per row, but the network's rounding depends on the batch shape (padding,
        batch size), so a batched row can differ from its single-prompt run; the same call is reproducible.

        Returns:
            ``(B · num_return_sequences, L)`` token ids, or :class:`MDMPrimeGenerateOutput` with
            ``return_dict_in_generate=True``. After a row's first generated EOS, the generated positions hold
            ``pad_token_id`` (or the EOS id if there is no pad id).
        """
        # 1. Configuration.
        if isinstance(strategy, str):
            kwargs["strategy"] = strategy
        elif strategy is not None and not isinstance(strategy, SamplerStrategy):
            raise TypeError(f"strategy must be a name or a SamplerStrategy, got {type(strategy).__name__}.")
        config, from_call = self._call_settings(generation_config, kwargs)
        self._check_inputs(input_ids, attention_mask, infill_mask, sub_token_ids, seed)
        if isinstance(strategy, SamplerStrategy):
            strategy = copy.copy(strategy)  # set_timesteps writes per-call state into it
        else:
            strategy = get_sampler_strategy(
                config.strategy,
                time_grid=config.time_grid,
                float64=config.sample_in_float64,
                confidence_measure=config.confidence_measure,
                threshold=config.threshold,
                time_warp=config.time_warp,
                corrector=config.corrector,
            )
        if getattr(self, "state_dependent", False) and type(strategy) is AncestralStrategy:
            # GenMD4 (learnable_polynomial): the exact ancestral sampler of a state-dependent schedule.
            strategy = StateDependentStrategy(strategy.time_grid, strategy.float64, strategy.time_warp)
        elif getattr(self, "state_dependent", False) and isinstance(strategy, PredictorCorrectorStrategy):
            raise ValueError(
                "corrector is defined for fixed schedules; this GenMD4 model's schedule is state dependent (its "
                "re-masking rates would need their own derivation). Unset corrector."
            )
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())

        # 2. Canvas.
        canvas = self._prepare_canvas(input_ids, attention_mask, infill_mask, sub_token_ids, config, from_call, seed)
        step_streamer = streamer if callable(getattr(streamer, "put_step", None)) else None
        if streamer is not None and step_streamer is None and canvas.sub_ids.shape[0] != 1:
            raise ValueError(
                f"token streamers handle one sequence at a time; this call generates {canvas.sub_ids.shape[0]} "
                "(a step streamer, with put_step, takes any batch)."
            )

        # 3. The denoising loop.
        processors = self._logits_processors(config, logits_processor)
        loop = self._start_loop(canvas, config, strategy, processors, None if step_streamer else streamer)
        loop.network_kwargs = dict(network_kwargs or {})
        if token_sets is not None or token_set_ids is not None:
            loop.token_sets, loop.token_set_ids = self._check_token_sets(token_sets, token_set_ids, canvas)

        def state(t: torch.Tensor, s: torch.Tensor, final_fill: bool = False) -> MDMPrimeSamplerState:
            return MDMPrimeSamplerState(loop.iteration, t, s, loop.y, loop.nfe, canvas.fixed, canvas.real, final_fill)

        if step_streamer is not None:
            start, _ = strategy.times(loop.step)
            step_streamer.put_step(state(start, start))
        while bool(loop.running.any()):
            t, s = strategy.times(loop.step)
            self._denoising_step(loop)
            after = state(t, s)
            if step_streamer is not None:
                step_streamer.put_step(after)
            if step_callback is not None and step_callback(after):
                self._fill_remaining(loop)
                if loop.history is not None:
                    loop.history.append(loop.y.clone())
                if step_streamer is not None:
                    step_streamer.put_step(state(s, s, final_fill=True))
                break

        # 4. Finalisation.
        sequences = self._finalize(loop.y, canvas, config)
        if loop.streaming is not None:
            loop.streaming.finish(sequences)
        if step_streamer is not None:
            step_streamer.end()
        if not config.return_dict_in_generate:
            return sequences
        return MDMPrimeGenerateOutput(
            sequences=sequences,
            nfe=loop.nfe,
            num_steps=loop.iteration,
            idle_steps=loop.idle,
            row_nfe=loop.row_nfe,
            history=tuple(loop.history) if loop.history is not None else None,
        )


def _append_masked(sub_ids, fixed, real, filler, count, mask_id, pad_id):
    """Add ``count`` masked positions right after each row's last real token (left padding, or none: at the end;
    right padding: before the padding; a row without real tokens: at the start)."""
    batch, length, ell = sub_ids.shape
    device = sub_ids.device
    positions = torch.arange(length, device=device)
    last_real = torch.where(real, positions, torch.full_like(positions, -1)).amax(1) if length else None
    start = (last_real + 1).unsqueeze(1) if length else torch.zeros(batch, 1, dtype=torch.long, device=device)
    total = length + count
    pos = torch.arange(total, device=device).expand(batch, total)
    is_new = (pos >= start) & (pos < start + count)
    source = torch.where(pos < start, pos, pos - count).clamp(0, max(length - 1, 0))
    if length:
        old_sub = sub_ids.gather(1, source.unsqueeze(-1).expand(batch, total, ell))
        old_fixed = fixed.gather(1, source.unsqueeze(-1).expand(batch, total, ell))
        old_real = real.gather(1, source)
        old_filler = filler.gather(1, source)
    else:
        old_sub = torch.full((batch, total, ell), mask_id, dtype=sub_ids.dtype, device=device)
        old_fixed = torch.ones(batch, total, ell, dtype=torch.bool, device=device)
        old_real = torch.zeros(batch, total, dtype=torch.bool, device=device)
        old_filler = torch.full((batch, total), pad_id, dtype=torch.long, device=device)
    new_sub = torch.where(is_new.unsqueeze(-1), torch.full_like(old_sub, mask_id), old_sub)
    new_fixed = old_fixed & ~is_new.unsqueeze(-1)
    new_real = old_real | is_new
    new_filler = torch.where(is_new, torch.full_like(old_filler, pad_id), old_filler)
    return new_sub, new_fixed, new_real, new_filler


class _StreamState:
    """Pushes decided tokens to a transformers streamer in position order (batch size 1), up to the first EOS."""

    def __init__(self, streamer, canvas: _Canvas, codec, eos_token_id):
        self.streamer, self.codec = streamer, codec
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        self.eos = {int(e) for e in eos if e is not None}
        self.positions = canvas.real[0].nonzero().squeeze(1)  # real positions, in order
        generated = canvas.generated[0, self.positions]
        self.next = int(generated.long().argmax()) if bool(generated.any()) else len(self.positions)
        self.stopped = False
        prompt = canvas.sub_ids[0, self.positions[: self.next]]
        prompt_ids = codec.decode(prompt) if self.next else torch.empty(0, dtype=torch.long)
        streamer.put(prompt_ids.unsqueeze(0).cpu())

    def _put(self, tokens: torch.Tensor) -> None:
        """Send ``tokens`` (1-D), cut after the first EOS, which ends the stream."""
        hits = [i for i, token in enumerate(tokens.tolist()) if token in self.eos]
        if hits:
            tokens, self.stopped = tokens[: hits[0] + 1], True
        if len(tokens):
            self.streamer.put(tokens.cpu())

    def push(self, y: torch.Tensor) -> None:
        if self.stopped:
            return
        digits = y[0, self.positions]
        decided = (digits != self.codec.mask_id).all(-1)
        end = self.next
        while end < len(self.positions) and bool(decided[end]):
            end += 1
        if end > self.next:
            self._put(self.codec.decode(digits[self.next : end]))
            self.next = end

    def finish(self, sequences: torch.Tensor) -> None:
        if not self.stopped and self.next < len(self.positions):
            self._put(sequences[0, self.positions[self.next :]])
        self.streamer.end()


__all__ = [
    "MDMPrimeGenerateOutput",
    "MDMPrimeGenerationConfig",
    "MDMPrimeGenerationMixin",
    "MDMPrimeSamplerState",
]
