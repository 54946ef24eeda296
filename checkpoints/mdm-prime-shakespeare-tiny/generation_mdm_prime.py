"""``generate()`` for masked diffusion: iterative sub-token unmasking behind the transformers generation API.

One loop (:meth:`MDMPrimeGenerationMixin.generate`) runs every strategy; a strategy is a step object from
``sampling_mdm_prime.py``. Autoregressive decoding is never used: settings that only make sense for it raise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput, logging

from .sampling_mdm_prime import content_words, counter_uniform, get_sampler_step, stream_keys, time_grid

logger = logging.get_logger(__name__)

DIFFUSION_DEFAULTS = {
    "num_steps": None,
    "time_grid": "uniform",
    "strategy": "ancestral",
    "block_length": None,
    "use_idle_cache": True,
    "sample_in_float64": True,
    "final_step": "sample",
    "output_history": False,
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


class MDMPrimeGenerationConfig(GenerationConfig):
    r"""Generation settings for masked diffusion, next to the standard ones it reuses.

    Diffusion settings:
        num_steps: denoising steps T (default: the number of positions to generate).
        time_grid: ``"uniform"`` or ``"cosine"`` spacing of the T steps from t = 1 to t = 0.
        strategy: ``"ancestral"`` (the MDM-Prime sampler) or ``"confidence"`` (MaskGIT / LLaDA ordering).
        block_length: decode the generated positions in blocks of this many tokens, left to right
            (semi-autoregressive); ``num_steps`` is split evenly over the blocks. ``None``: one block.
        use_idle_cache: skip the network on idle steps. Whether a step reveals anything is decided before
            the network is consulted (ancestral: the reveal coins; confidence: the quota), so skipping is
            exact, for time-conditioned networks too. ``False`` runs the naive sampler: the network at every
            step on every masked position (same samples, more network calls).
        sample_in_float64: draw tokens by float64 inverse CDF. ``False`` uses float32 Gumbel-max, which
            suppresses rare tokens; it exists for comparisons only.
        final_step: ``"sample"`` or ``"argmax"`` for the draws of each block's last step.
        output_history: with ``return_dict_in_generate``, also return the sub-tokens after every step.

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
        if self.num_steps is not None and (not isinstance(self.num_steps, int) or self.num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer or None, got {self.num_steps!r}.")
        if self.block_length is not None and (not isinstance(self.block_length, int) or self.block_length < 1):
            raise ValueError(f"block_length must be a positive integer or None, got {self.block_length!r}.")
        if self.time_grid not in ("uniform", "cosine"):
            raise ValueError(f"time_grid must be 'uniform' or 'cosine', got {self.time_grid!r}.")
        if self.strategy not in ("ancestral", "confidence"):
            raise ValueError(f"strategy must be 'ancestral' or 'confidence', got {self.strategy!r}.")
        if self.final_step not in ("sample", "argmax"):
            raise ValueError(f"final_step must be 'sample' or 'argmax', got {self.final_step!r}.")

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
        num_steps: denoising steps run (fewer if a callback stopped early).
        idle_steps: ``(B · num_return_sequences,)`` steps in which the row did not change.
        history: per step, the ``(B · n, L, ℓ)`` sub-tokens after it (with ``output_history``).
    """

    sequences: torch.LongTensor | None = None
    nfe: int | None = None
    num_steps: int | None = None
    idle_steps: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None


@dataclass
class MDMPrimeSamplerState:
    """What a ``step_callback`` sees after each step; return True from the callback to stop early (the
    remaining masked sub-tokens are then filled in one final pass)."""

    step: int
    num_steps: int
    t: float
    s: float
    sub_ids: torch.LongTensor
    nfe: int


@dataclass
class _Canvas:
    sub_ids: torch.Tensor  # (B, L, ℓ) digits, mask id where unknown
    fixed: torch.Tensor  # (B, L, ℓ) bool, digits that never change (prompt, template, conditioning)
    real: torch.Tensor  # (B, L) bool, attention mask
    filler: torch.Tensor  # (B, L) ids returned at padded positions
    streams: torch.Tensor  # (B,) random-stream id of each row (its index among num_return_sequences)

    @property
    def generated(self) -> torch.Tensor:
        """(B, L) positions with a digit to generate."""
        return (~self.fixed).any(-1) & self.real


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

    def _prepare_generation_config(self, generation_config, kwargs: dict) -> MDMPrimeGenerationConfig:
        config = MDMPrimeGenerationConfig.from_generation_config(generation_config or self.generation_config)
        unused = config.update(**kwargs)
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
        return config

    def _prepare_canvas(self, input_ids, attention_mask, infill_mask, sub_token_ids, config) -> _Canvas:
        codec = self.codec
        device = self.device
        if sub_token_ids is not None:
            if input_ids is not None or infill_mask is not None:
                raise ValueError("pass either sub_token_ids or input_ids (with an optional infill_mask), not both.")
            if sub_token_ids.dim() != 3:
                raise ValueError(f"sub_token_ids must have shape (batch, length, ℓ), got {tuple(sub_token_ids.shape)}.")
            codec.check_sub_ids(sub_token_ids, "sub_token_ids")
            sub_ids = sub_token_ids.to(device)
            real = torch.ones(sub_ids.shape[:2], dtype=torch.bool, device=device)
            if attention_mask is not None:
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
        else:
            if input_ids is None:
                input_ids = torch.empty(1, 0, dtype=torch.long, device=device)
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
            input_ids = input_ids.to(device)
            real = (
                torch.ones_like(input_ids, dtype=torch.bool)
                if attention_mask is None
                else attention_mask.to(device).bool()
            )
            if real.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(real.shape)} != input_ids shape {tuple(input_ids.shape)}."
                )
            ids = torch.where(real, input_ids, torch.zeros_like(input_ids))
            codec.check_ids(ids, "input_ids")
            sub_ids = codec.encode(ids)
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
                sub_ids = sub_ids.masked_fill(infill.unsqueeze(-1), codec.mask_id)
            filler = input_ids.clone()

        new_tokens = self._num_new_tokens(
            sub_ids.shape[1], infill_mask is not None or sub_token_ids is not None, config
        )
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
        copies = config.num_return_sequences or 1
        streams = torch.arange(copies, device=device).repeat(sub_ids.shape[0])
        expand = lambda x: x.repeat_interleave(copies, dim=0)  # noqa: E731
        return _Canvas(expand(sub_ids), expand(fixed), expand(real), expand(filler), streams)

    def _num_new_tokens(self, length: int, has_template: bool, config) -> int:
        if config.max_new_tokens is not None:
            return int(config.max_new_tokens)
        if has_template:  # a template is filled in place; only an explicit max_new_tokens appends to it
            return 0
        if config.max_length is not None:
            return max(0, int(config.max_length) - length)
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
        seed: int | None = None,
        step_callback: Callable[[MDMPrimeSamplerState], bool | None] | None = None,
        **kwargs,
    ) -> torch.LongTensor | MDMPrimeGenerateOutput:
        r"""Generate by iterative sub-token unmasking (method.md §3.5).

        Inputs (one of):
            * ``input_ids`` ``(B, P)`` prompts (+ ``attention_mask`` with left or right padding): the prompt never
              changes and ``max_new_tokens`` masked positions follow each row's last real token.
            * ``input_ids`` as a template + ``infill_mask`` ``(B, L)`` bool: fill exactly the marked positions
              (``max_new_tokens`` may append more).
            * ``sub_token_ids`` ``(B, L, ℓ)`` with ``codec.mask_id`` where unknown: sub-token conditioning (the
              paper's imputation: tokens with some digits fixed).
            * nothing: unconditional generation of ``max_new_tokens`` tokens.

        Args:
            generation_config: an :class:`MDMPrimeGenerationConfig` (a plain ``GenerationConfig`` is converted);
                ``**kwargs`` override its fields, e.g. ``max_new_tokens=64, num_steps=128, top_p=0.9``.
            logits_processor: applied to the ``(N, C)`` filtered log-probabilities of the positions being
                updated (``input_ids`` given to them is ``(N, L)``: each position's sequence, undecided tokens
                as ``pad_token_id``), before temperature / top-k / top-p.
            streamer: e.g. ``TextStreamer`` (batch size 1): tokens are pushed in position order as soon as
                every position before them is decided.
            generator / seed: reproducibility. Each output row draws its noise from a stream keyed by (seed,
                its index among ``num_return_sequences``, its own prompt/template) and counted by step and by
                position among the row's real tokens. So a row's output does not depend on the rest of the
                batch or on padding, different prompts get independent noise, and two identical prompts in one
                batch give identical samples (use ``num_return_sequences`` for several samples of one prompt).
            step_callback: called with an :class:`MDMPrimeSamplerState` after every step; returning True stops
                early and fills the remaining masked sub-tokens in one final pass.

        Returns:
            ``(B · num_return_sequences, L)`` token ids, or :class:`MDMPrimeGenerateOutput` with
            ``return_dict_in_generate=True``. After a row's first generated EOS, the generated positions hold
            ``pad_token_id`` (or the EOS id if there is no pad id).
        """
        for name in AUTOREGRESSIVE_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} is for autoregressive decoding; masked diffusion generation cannot use it.")
            kwargs.pop(name, None)
        kwargs.pop("use_cache", None)  # an autoregressive KV-cache switch; diffusion has its own idle-step cache
        config = self._prepare_generation_config(generation_config, kwargs)
        canvas = self._prepare_canvas(input_ids, attention_mask, infill_mask, sub_token_ids, config)
        codec, schedule = self.codec, self.noise_schedule.exact()
        strategy = get_sampler_step(config.strategy, codec)
        processors = self._logits_processors(config, logits_processor)
        batch, length, ell = canvas.sub_ids.shape
        if streamer is not None and batch != 1:
            raise ValueError(f"streamers handle one sequence at a time; this call generates {batch}.")

        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        rank = (canvas.real.long().cumsum(1) - 1).clamp(min=0)
        counters = rank.unsqueeze(-1) * (ell + 1) + torch.arange(ell + 1, device=self.device)
        known = canvas.fixed & canvas.real.unsqueeze(-1)
        content = content_words(canvas.sub_ids, known, counters[..., 1:])
        keys = stream_keys(seed, canvas.streams.to(self.device), content)

        generated = canvas.generated
        gen_rank = generated.long().cumsum(1) - 1
        block_length = config.block_length or max(1, int(generated.sum(1).max()))
        block_of = torch.where(generated, gen_rank // block_length, torch.full_like(gen_rank, -1))
        num_blocks = int(block_of.max()) + 1
        num_steps = config.num_steps or int(generated.sum(1).max())
        if num_steps % num_blocks:
            raise ValueError(
                f"num_steps={num_steps} must be divisible by the number of blocks ({num_blocks} blocks of "
                f"block_length={block_length})."
            )
        steps_per_block = num_steps // num_blocks
        times = time_grid(steps_per_block, config.time_grid)
        alphas = schedule.alpha(times).tolist()
        alphas[0], alphas[-1] = 0.0, 1.0
        grid = times.tolist()

        y = canvas.sub_ids.clone()
        streaming = _StreamState(streamer, canvas, codec, config.eos_token_id) if streamer is not None else None
        nfe, step_index, stopped = 0, 0, False
        idle = torch.zeros(batch, dtype=torch.long, device=self.device)
        history = [] if config.output_history else None

        def update(updatable, reveal_p, noise, greedy):
            """One step: plan without the model, call it only if something is revealed (idle-step skip)."""
            nonlocal nfe
            uniform = counter_uniform(keys, step_index, counters)
            rows = strategy.positions_to_score(updatable, reveal_p, uniform)
            if not config.use_idle_cache:  # the naive sampler: the network at every step, every masked position
                rows = updatable.any(-1)
            if not bool(rows.any()):
                return y
            noise_level = torch.full((batch,), noise, device=self.device)
            log_probs = self.denoise(y, attention_mask=canvas.real, noise_level=noise_level, positions=rows)
            nfe += 1
            scores = self._process(processors, log_probs, rows, y, canvas, config)
            return strategy.step(y, updatable, rows, scores, reveal_p, uniform, greedy, config.sample_in_float64)

        for block in range(num_blocks):
            active = block_of == block
            for k in range(steps_per_block):
                last = k == steps_per_block - 1
                reveal_p = 1.0 if last else (alphas[k + 1] - alphas[k]) / (1.0 - alphas[k])
                greedy = not config.do_sample or (last and config.final_step == "argmax")
                new = update((y == codec.mask_id) & active.unsqueeze(-1), reveal_p, 1.0 - alphas[k], greedy)
                idle += (new == y).flatten(1).all(1).long()
                y = new
                step_index += 1
                if history is not None:
                    history.append(y.clone())
                if streaming is not None:
                    streaming.push(y)
                if step_callback is not None and step_callback(
                    MDMPrimeSamplerState(step_index, num_steps, grid[k], grid[k + 1], y, nfe)
                ):
                    stopped = True
                    break
            if stopped:
                break

        if stopped:  # one final pass over everything still masked
            greedy = not config.do_sample or config.final_step == "argmax"
            y = update((y == codec.mask_id) & generated.unsqueeze(-1), 1.0, 0.0, greedy)

        sequences = self._finalize(y, canvas, config)
        if streaming is not None:
            streaming.finish(sequences)
        if not config.return_dict_in_generate:
            return sequences
        return MDMPrimeGenerateOutput(
            sequences=sequences,
            nfe=nfe,
            num_steps=step_index,
            idle_steps=idle,
            history=tuple(history) if history is not None else None,
        )

    def _process(self, processors, log_probs, rows, y, canvas, config) -> torch.Tensor:
        """Apply logits processors to the ``(N, C)`` scores of the updated positions."""
        if not processors:
            return log_probs
        tokens = self._decided_tokens(y, canvas, config)
        row_of = torch.arange(y.shape[0], device=y.device).unsqueeze(1).expand_as(rows)[rows]
        return processors(tokens[row_of], log_probs.clone())

    def _decided_tokens(self, y, canvas, config) -> torch.Tensor:
        decided = (y != self.codec.mask_id).all(-1) & canvas.real
        digits = y.masked_fill(~decided.unsqueeze(-1), 0)
        tokens = (digits * torch.tensor(self.codec.place_values, device=y.device)).sum(-1)
        return torch.where(decided, tokens, torch.full_like(tokens, self._pad_id(config)))

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


def _append_masked(sub_ids, fixed, real, filler, count, mask_id, pad_id):
    """Add ``count`` masked positions right after each row's last real token (left padding, or none:
    at the end; right padding: before the padding)."""
    batch, length, ell = sub_ids.shape
    device = sub_ids.device
    lengths = real.sum(1)
    right_padded = bool((~real[:, -1]).any()) if length else False
    if right_padded and not bool((real == (torch.arange(length, device=device) < lengths.unsqueeze(1))).all()):
        raise ValueError("attention_mask must be left- or right-padded (no holes inside a row).")
    total = length + count
    pos = torch.arange(total, device=device).expand(batch, total)
    start = lengths.unsqueeze(1) if right_padded else torch.full((batch, 1), length, device=device)
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
