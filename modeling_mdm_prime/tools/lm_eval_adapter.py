"""lm-evaluation-harness model ``mdm_prime`` for MDM-Prime / MD4 checkpoints (not shipped as remote code).

Every number this model returns is built from the valid bound (docs/concepts/honest-likelihoods.md):

* ``loglikelihood``: ``-L̂(cont | ctx)``, where ``L(cont | ctx) ≥ -log p_θ(cont | ctx)`` is the continuous-time NELBO
  of the continuation with the context clean. Only the continuation's ``N = |cont| · ℓ`` sub-tokens are ever
  masked; the count estimator masks ``k ~ U{1..N}`` of them (a uniform k-subset) with weight ``N / k``:

      L(cont | ctx) = E_{k ~ U{1..N}} E_{|M| = k}[ (N / k) Σ_{i ∈ cont} Σ_{j ∈ M_i} -log p̄_θ(y0^{i,j} | y_M, ctx) ],

  stratified over k with ``num_time_samples`` draws. The value is a lower bound on the log-likelihood in expectation,
  an estimate with a standard error (``last_stderr``), never an exact log-likelihood.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows with the end-of-text prefix; each window's
  conditional bound with its own context clean, summed (a bound on the whole text's log-likelihood).
* ``generate_until``: batched ``model.generate()``; requests are grouped by their settings and ``max_gen_toks``
  and each is cut exactly at its first stop string. A row's noise depends only on (seed, its prompt, how many
  identical requests came before it), so the output of a request never depends on the batch it ran in, and K
  identical requests (``repeats: K``) are K independent samples.
* ``is_greedy`` (``loglikelihood``'s second value) is computed by default by iterative argmax unmasking of the
  continuation; ``is_greedy=False`` in ``--model_args`` skips it.

lm-eval 0.4.x has no plugin or entry-point discovery for models, so the model is registered when this module is
imported::

    python -m modeling_mdm_prime.tools.lm_eval_adapter --model mdm_prime \\
        --model_args pretrained=checkpoints/mdm-prime-shakespeare-tiny,num_time_samples=32 --tasks lambada_openai

    import modeling_mdm_prime.tools.lm_eval_adapter  # registers "mdm_prime"
    lm_eval.simple_evaluate(model="mdm_prime", model_args="pretrained=...", tasks=[...])

Under ``accelerate launch`` each process evaluates lm-eval's share of the requests (rank / world size).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models before we add ours)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from ..modeling_mdm_prime import MDMPrimeForMaskedDiffusion

logger = logging.getLogger(__name__)

# Generation-config fields a user may set in --model_args (defaults for every request) or a task may set in its
# generation_kwargs (per request, winning over the model_args).
GENERATION_FIELDS = (
    "num_steps",
    "time_grid",
    "strategy",
    "confidence_measure",
    "threshold",
    "block_length",
    "use_idle_cache",
    "sample_in_float64",
    "final_step",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
)


@dataclass
class BoundEstimate:
    """One request's score: ``loglikelihood`` = -(estimated NELBO) in nats, its Monte-Carlo standard error, the
    number of scored tokens and of windows, and whether iterative argmax unmasking reproduces the continuation
    (None when not computed)."""

    loglikelihood: float
    stderr: float
    num_tokens: int
    num_windows: int
    is_greedy: bool | None = None


def request_seed(seed: int, *token_lists: Sequence[int]) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and the tokens: the same window gets the same noise in any
    batch, on any rank and device."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(int(seed).to_bytes(8, "little", signed=True))
    for tokens in token_lists:
        digest.update(len(tokens).to_bytes(8, "little"))
        digest.update(b"".join(int(t).to_bytes(8, "little") for t in tokens))
    return int.from_bytes(digest.digest(), "little") >> 1


def occurrence_seed(seed: int, occurrence: int) -> int:
    """The generation seed of the ``occurrence``-th identical request (0: ``seed`` itself, so a request that is not
    repeated keeps its output; k > 0: a seed derived from both, independent of the batch)."""
    return int(seed) if occurrence == 0 else request_seed(seed, [occurrence]) % 2**62


def _pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        real[row, : len(seq)] = 1
    return ids, real


@torch.no_grad()
def conditional_bounds(
    model: MDMPrimeForMaskedDiffusion,
    windows: Sequence[tuple[Sequence[int], Sequence[int]]],
    num_time_samples: int,
    seeds: Sequence[int],
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NELBO of each ``(context, target)`` window with the context clean: the model's own
    :meth:`~MDMPrimeForMaskedDiffusion.nll_bound` with ``scored_mask`` on the target (the one likelihood
    implementation of the package; the count estimator, stratified over k).

    The ``K = num_time_samples`` draws of window w come from its own generator, seeded with ``seeds[w]``, so a window's
    estimate does not depend on the batch it is scored in. Windows are scored ``batch_size // K`` at a time
    (``batch_size`` rows per forward pass), longest first, right-padded (padding is never attended to).

    Returns:
        ``(W, K)`` float64 Monte-Carlo samples of ``L(target | context)`` (nats; their mean estimates the bound,
        their std / sqrt(K) is its standard error), and ``(W,)`` target lengths.
    """
    if model.state_dependent:
        raise ValueError(
            "GenMD4 models (noise_schedule='learnable_polynomial') need the masking-time estimator; the lm-eval "
            "adapter implements the count estimator of fixed schedules only."
        )
    device = torch.device(device) if device is not None else model.device
    samples = torch.zeros(len(windows), num_time_samples, dtype=torch.float64)
    scored = sorted((w for w, (_, target) in enumerate(windows) if target), key=lambda w: -sum(map(len, windows[w])))
    per_call = max(1, batch_size // num_time_samples)
    for start in tqdm(range(0, len(scored), per_call), disable=not progress, desc="mdm_prime bounds"):
        chunk = scored[start : start + per_call]
        ids, real = _pad_right([list(windows[w][0]) + list(windows[w][1]) for w in chunk], 0)
        target = torch.zeros_like(real, dtype=torch.bool)
        for row, w in enumerate(chunk):
            target[row, len(windows[w][0]) : len(windows[w][0]) + len(windows[w][1])] = True
        out = model.nll_bound(
            ids.to(device),
            real.to(device),
            num_time_samples=num_time_samples,
            generator=[torch.Generator().manual_seed(seeds[w]) for w in chunk],
            scored_mask=target.to(device),
        )
        samples[chunk] = out.nll_samples.cpu()
    lengths = torch.tensor([len(t) for _, t in windows])
    return samples, lengths


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    k = samples.numel()
    return samples.mean().item(), (samples.std().item() / math.sqrt(k)) if k > 1 else float("nan")


class MDMPrimeLM(TemplateLM):
    """lm-eval model for :class:`MDMPrimeForMaskedDiffusion` (``--model mdm_prime``).

    Args (``--model_args``):
        pretrained: checkpoint folder or Hub id, or a loaded model (Python API).
        tokenizer: tokenizer path or object (default: ``pretrained``; for a PEFT adapter, the adapter folder if
            it holds one, else the base model).
        peft: a PEFT (LoRA) adapter folder or Hub id, loaded onto ``pretrained`` (default: the base recorded in the
            adapter's config) and merged.
        device, dtype, revision, trust_remote_code: as for ``from_pretrained``.
        batch_size: windows per forward pass when scoring (each brings its ``num_time_samples`` rows, so a pass has
            ``batch_size · num_time_samples`` rows), prompts per ``generate()`` call. lm-eval's CLI passes 1 unless
            told ``--batch_size``.
        max_length: the model's window in tokens (default: ``max_position_embeddings``).
        num_time_samples: Monte-Carlo draws per scored window (network rows per window); ``mc_samples`` is its
            deprecated name.
        seed: base seed; each window / prompt derives its own from it and its tokens.
        is_greedy: compute ``is_greedy`` by iterative argmax unmasking (on by default: LAMBADA's ``acc`` and
            multiple-choice ``exact_match`` read it). It costs up to |cont| extra network calls per batch of
            requests; ``is_greedy=False`` skips it for tasks that only read log-likelihoods (the flag is then
            False, and a task that reads it reports 0).
        rolling_context_len: tokens of context each rolling window after the first conditions on (lm-eval's
            ``context_len``; 1 = its default).
        add_bos_token, prefix_token_id: as for lm-eval's ``hf`` model.
        max_gen_toks: default ``max_gen_toks`` of generation requests.
        max_batch_size: accepted for lm-eval's CLI and unused (there is no automatic batch size).
        num_steps, strategy, temperature, top_p, ...: generation-config fields (``GENERATION_FIELDS``), the
            defaults for every ``generate_until`` request; a task's ``generation_kwargs`` win over them.
    """

    def __init__(
        self,
        pretrained: str | MDMPrimeForMaskedDiffusion | None = None,
        tokenizer=None,
        peft: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        num_time_samples: int = 32,
        seed: int = 1234,
        is_greedy: bool = True,
        rolling_context_len: int = 1,
        add_bos_token: bool = False,
        prefix_token_id: int | None = None,
        max_gen_toks: int = 256,
        mc_samples: int | None = None,
        **generation_kwargs,
    ) -> None:
        super().__init__()
        from accelerate import PartialState

        if mc_samples is not None:
            warnings.warn(
                "the mdm_prime model_arg mc_samples is deprecated; it is now num_time_samples (the name "
                "nll_bound and every script use for Monte-Carlo draws).",
                FutureWarning,
                stacklevel=2,
            )
            num_time_samples = mc_samples

        unknown = sorted(set(generation_kwargs) - set(GENERATION_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown mdm_prime model_args {unknown}; expected the adapter's arguments or generation-config "
                f"fields {list(GENERATION_FIELDS)}."
            )
        for name, value in (("num_time_samples", num_time_samples), ("rolling_context_len", rolling_context_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2
        ):
            raise ValueError(f"max_length must be an integer >= 2 (a context token and a target), got {max_length!r}.")
        if isinstance(batch_size, str):
            batch_size = 8 if batch_size.startswith("auto") else int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")

        state = PartialState()
        if state.num_processes > 1:
            self._rank, self._world_size, self._device = state.process_index, state.num_processes, state.device
            self._state = state
        else:
            default = "cuda" if torch.cuda.is_available() else "cpu"
            if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
                # lm-eval's CLI passes --device cuda unless told otherwise; like its hf model, fall back.
                logger.warning("device %r is not available; using the CPU.", device)
                device = None
            self._device = torch.device(device or default)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)

        if pretrained is None and peft is None:
            raise ValueError("mdm_prime needs pretrained=<checkpoint> (or peft=<adapter> that records its base model).")
        if isinstance(pretrained, MDMPrimeForMaskedDiffusion):
            model = pretrained
        else:
            model, tokenizer = self._load(pretrained, tokenizer, peft, revision, trust_remote_code, dtype)
        self.model = model.to(self._device).eval()
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer, revision=revision, trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer
        self.batch_size_per_gpu = batch_size
        self._max_length = max_length
        self.num_time_samples, self.seed, self.compute_greedy = num_time_samples, int(seed), bool(is_greedy)
        self.rolling_context_len, self.add_bos_token = rolling_context_len, add_bos_token
        self.custom_prefix_token_id, self._max_gen_toks = prefix_token_id, max_gen_toks
        self.generation_defaults = dict(generation_kwargs)
        self._generation_config(self.generation_defaults)  # validate the model_args now, not at the first request
        # One entry per request of the last call of each method (this rank's requests, in request order).
        self.last_estimates: dict[str, list[BoundEstimate]] = {}

    @staticmethod
    def _load(pretrained, tokenizer, peft, revision, trust_remote_code, dtype):
        # The installed package's classes (tested code), not a checkpoint's copy of them.
        kwargs = dict(revision=revision, dtype=dtype) if dtype is not None else dict(revision=revision)
        if peft is not None:
            from peft import PeftConfig, PeftModel

            base = pretrained or PeftConfig.from_pretrained(peft).base_model_name_or_path
            model = MDMPrimeForMaskedDiffusion.from_pretrained(base, **kwargs)
            model = PeftModel.from_pretrained(model, peft).merge_and_unload()
            if tokenizer is None:
                from pathlib import Path

                has_own = Path(peft, "tokenizer_config.json").is_file()
                tokenizer = peft if has_own else base
            return model, tokenizer
        model = MDMPrimeForMaskedDiffusion.from_pretrained(pretrained, **kwargs)
        return model, tokenizer or pretrained

    # ---------------------------------------------------------------- lm-eval plumbing

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        eos = eos if eos is not None else self.model.config.eos_token_id
        if eos is None:
            raise ValueError(
                "neither the tokenizer nor the model config names an eos_token_id (the end-of-text prefix)."
            )
        return eos

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id if self.tokenizer is not None else None
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.config.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        from accelerate.utils import gather

        return gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this mdm_prime model was built without a tokenizer; pass tokenizer=... to score text.")
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=special)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        return {
            "mdm_prime_num_time_samples": self.num_time_samples,
            "mdm_prime_seed": self.seed,
            "mdm_prime_num_sub_tokens": self.model.codec.num_sub_tokens,
            "mdm_prime_scores": "valid-bound estimates (ELBO), not exact log-likelihoods",
        }

    # ---------------------------------------------------------------- scoring

    def _windows(self, context: list[int], target: list[int]) -> list[tuple[list[int], list[int]]]:
        """Split a request into ``(context, target)`` windows of at most ``max_length`` tokens.

        A context that does not fit beside the target is cut from the left (as lm-eval's ``hf`` model does). A
        target of ``max_length`` tokens or more is scored in lm-eval's disjoint rolling windows, the first one
        conditioned on the context's last token.
        """
        limit = self.max_length
        if len(target) < limit:
            return [
                (
                    context[len(context) + len(target) - limit :] if len(context) + len(target) > limit else context,
                    target,
                )
            ]
        logger.warning(
            "a continuation of %d tokens is longer than the window (%d); scored in rolling windows.", len(target), limit
        )
        prefix = context[-1] if context else self.prefix_token_id
        return self._rolling_windows(target, prefix)

    def _rolling_windows(self, tokens: list[int], prefix: int) -> list[tuple[list[int], list[int]]]:
        return [
            lm_utils.make_disjoint_window(w)
            for w in lm_utils.get_rolling_token_windows(
                token_list=tokens,
                prefix_token=prefix,
                max_seq_len=self.max_length - 1,  # + the context: a window is at most max_length tokens
                context_len=min(self.rolling_context_len, self.max_length - 1),
            )
        ]

    def _score(
        self, per_request: list[list[tuple[list[int], list[int]]]], disable_tqdm: bool = False
    ) -> list[BoundEstimate]:
        """Bounds of requests given as lists of windows; identical windows are scored once."""
        unique: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for windows in per_request:
            for ctx, tgt in windows:
                unique.setdefault((tuple(ctx), tuple(tgt)), len(unique))
        keys = list(unique)
        seeds = [request_seed(self.seed, ctx, tgt) for ctx, tgt in keys]
        samples, _ = conditional_bounds(
            self.model,
            keys,
            self.num_time_samples,
            seeds,
            self.batch_size * self.num_time_samples,
            self.device,
            progress=not disable_tqdm and self.rank == 0,
        )
        out = []
        for windows in per_request:
            total, variance = 0.0, 0.0
            for ctx, tgt in windows:
                mean, se = _mean_and_stderr(samples[unique[(tuple(ctx), tuple(tgt))]])
                total, variance = total + mean, variance + se**2  # windows use independent noise
            out.append(BoundEstimate(-total, math.sqrt(variance), sum(len(t) for _, t in windows), len(windows)))
        return out

    @torch.no_grad()
    def greedy_matches(self, windows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[bool]:
        """Whether iterative argmax unmasking of each window's target, context clean, reproduces the target.

        Start with every target token masked; at each step the network scores the masked positions, the one whose
        most likely token is most probable is set to that token (ties: the leftmost). A committed token never
        changes, so the first mismatch decides False; a row stops as soon as it is decided. At most |target|
        network calls per batch of ``batch_size`` windows.
        """
        model, codec = self.model, self.model.codec
        result = [True] * len(windows)
        for start in range(0, len(windows), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(windows))))
            ids, real = _pad_right([list(windows[i][0]) + list(windows[i][1]) for i in chunk], 0)
            ids, real = ids.to(self.device), real.to(self.device)
            target = torch.zeros_like(ids, dtype=torch.bool)
            for row, i in enumerate(chunk):
                target[row, len(windows[i][0]) : len(windows[i][0]) + len(windows[i][1])] = True
            open_ = target.clone()
            active = target.any(1)
            sub_ids = codec.encode(ids, check=False).masked_fill(open_.unsqueeze(-1), codec.mask_id)
            total = target.sum(1).clamp(min=1)
            while bool(active.any()):
                positions = open_ & active.unsqueeze(1)
                level = (open_.sum(1) / total).float() if model.config.time_conditioning else None
                logp = model.denoise(sub_ids, real, level, positions, consistency_filter=True)
                best, token = logp.max(-1)
                score = torch.full(ids.shape, float("-inf"), device=ids.device)
                score[positions] = best
                choice = torch.full(ids.shape, -1, dtype=torch.long, device=ids.device)
                choice[positions] = token
                pick = score.argmax(1)
                rows = active.nonzero().squeeze(1)
                picked = choice[rows, pick[rows]]
                wrong = picked != ids[rows, pick[rows]]
                for row in rows[wrong].tolist():
                    result[chunk[row]] = False
                active[rows[wrong]] = False
                open_[rows, pick[rows]] = False
                sub_ids[rows, pick[rows]] = codec.encode(picked.unsqueeze(1), check=False).squeeze(1)
                active &= open_.any(1)
        return result

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        per_request = [self._windows(list(ctx), list(cont)) if cont else [] for _, ctx, cont in requests]
        estimates = self._score(per_request, disable_tqdm)
        if self.compute_greedy:
            flat = [w for windows in per_request for w in windows]
            matches = iter(self.greedy_matches(flat))
            for est, windows in zip(estimates, per_request, strict=True):
                est.is_greedy = all([next(matches) for _ in windows])  # list: consume every window's flag
        self.last_estimates["loglikelihood"] = estimates
        out = []
        for (pair, _, _), est in zip(requests, estimates, strict=True):
            answer = (est.loglikelihood, bool(est.is_greedy))
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Bound on the log-likelihood of each whole text: lm-eval's disjoint windows (end-of-text prefix), each
        window's conditional bound with its context clean, summed."""
        texts = [req.args[0] for req in requests]
        estimates = self.rolling_bounds([self.tok_encode(text) for text in texts], disable_tqdm)
        for text, est in zip(texts, estimates, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), est.loglikelihood)
        return [est.loglikelihood for est in estimates]

    def rolling_bounds(self, token_lists: Sequence[list[int]], disable_tqdm: bool = True) -> list[BoundEstimate]:
        """Token-level ``loglikelihood_rolling`` with standard errors (also kept in ``last_estimates``)."""
        windows = [self._rolling_windows(list(tokens), self.eot_token_id) for tokens in token_lists]
        estimates = self._score(windows, disable_tqdm)
        self.last_estimates["loglikelihood_rolling"] = estimates
        return estimates

    @property
    def last_stderr(self) -> dict[str, list[float]]:
        """Standard error of each request of the last call of each method, in nats."""
        return {name: [e.stderr for e in estimates] for name, estimates in self.last_estimates.items()}

    # ---------------------------------------------------------------- generation

    def _generation_config(self, settings: dict):
        config = copy.deepcopy(self.model.generation_config)
        unused = config.update(**settings)
        if unused:
            raise ValueError(f"generation settings {sorted(unused)} are not fields of the model's generation config.")
        config.validate()
        return config

    def _request_settings(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        """(stop strings, max_gen_toks, generate() settings) of one request; the request's settings win over the
        model_args defaults."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"expected a dict of generation kwargs, got {type(gen_kwargs).__name__}.")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen = int(kwargs.pop("max_gen_toks"))
        settings = dict(self.generation_defaults)
        if kwargs.get("do_sample") is False:
            kwargs.pop("temperature", None)  # lm-eval writes temperature=0 for greedy; greedy needs none
        elif kwargs.get("temperature") == 0:
            kwargs.pop("temperature")
            kwargs["do_sample"] = False
        unknown = sorted(set(kwargs) - set(GENERATION_FIELDS))
        if unknown:
            raise ValueError(f"unsupported generation kwargs {unknown}; mdm_prime accepts {list(GENERATION_FIELDS)}.")
        settings.update(kwargs)
        if max_gen < 1 or max_gen >= self.max_length:
            raise ValueError(f"max_gen_toks must be in [1, {self.max_length - 1}] for this model, got {max_gen}.")
        return until, max_gen, settings

    def _generate_batch(self, contexts: list[str], config, max_gen: int, limit: int, seed: int) -> list[str]:
        """One left-padded ``generate()`` call; each row's text up to its first EOS token."""
        encoded = [(self.tok_encode(c) or [self.prefix_token_id])[-limit:] for c in contexts]
        width = max(map(len, encoded))
        ids = torch.full((len(contexts), width), self.model.config.pad_token_id or 0, dtype=torch.long)
        real = torch.zeros_like(ids)
        for row, enc in enumerate(encoded):  # left padding: new tokens follow every prompt at column width
            ids[row, width - len(enc) :] = torch.tensor(enc)
            real[row, width - len(enc) :] = 1
        out = self.model.generate(
            ids.to(self.device),
            attention_mask=real.to(self.device),
            generation_config=config,
            max_new_tokens=max_gen,
            seed=seed,
        )
        texts = []
        for row in range(len(contexts)):
            generated = out[row, width:].tolist()
            if self.eot_token_id in generated:
                generated = generated[: generated.index(self.eot_token_id)]
            texts.append(self.tok_decode(generated))
        return texts

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched ``generate()``: requests with the same settings and ``max_gen_toks`` share batches (repeated
        identical requests are independent samples, each with its own seed: :func:`occurrence_seed`), every request
        is cut at the first EOS token and then exactly at the first occurrence of any of its own stop strings."""
        parsed = [(ctx, *self._request_settings(kw)) for ctx, kw in (req.args for req in requests)]
        # The k-th of several identical requests (same context and generation kwargs: lm-eval's ``repeats``,
        # self-consistency, pass@k) is occurrence k and draws its noise from occurrence_seed(seed, k): K identical
        # requests are K independent samples, and a request's output depends only on (seed, its occurrence, its
        # prompt), never on the batch it ran in. Requests that differ only in their stop strings share a sample.
        seen: dict[tuple[str, str], int] = {}
        groups: dict[tuple, dict[tuple[str, int], list[int]]] = {}
        for index, (ctx, _, max_gen, settings) in enumerate(parsed):
            key = (ctx, json.dumps(requests[index].args[1], sort_keys=True, default=str))
            occurrence = seen[key] = seen.get(key, -1) + 1
            groups.setdefault((max_gen, tuple(sorted(settings.items()))), {}).setdefault((ctx, occurrence), [])
            groups[(max_gen, tuple(sorted(settings.items())))][(ctx, occurrence)].append(index)
        texts: list[str | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="mdm_prime generate_until")
        for (max_gen, settings), rows in groups.items():
            config = self._generation_config(dict(settings))
            limit = self.max_length - max_gen
            for occurrence in sorted({k for _, k in rows}):
                prompts = sorted((c for c, k in rows if k == occurrence), key=len, reverse=True)
                seed = occurrence_seed(self.seed, occurrence)
                for start in range(0, len(prompts), self.batch_size):
                    batch = prompts[start : start + self.batch_size]
                    for context, text in zip(batch, self._generate_batch(batch, config, max_gen, limit, seed)):
                        for index in rows[(context, occurrence)]:
                            texts[index] = postprocess_generated_text(text, parsed[index][1], None)
                            self.cache_hook.add_partial("generate_until", requests[index].args, texts[index])
                            pbar.update(1)
        pbar.close()
        return texts


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m modeling_mdm_prime.tools.lm_eval_adapter <lm-eval arguments>``: lm-eval's CLI with ``mdm_prime``
    registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # Run the package's module, so that exactly one class is registered under "mdm_prime" however it is imported.
    from modeling_mdm_prime.tools.lm_eval_adapter import main as package_main

    package_main()
else:
    register_model("mdm_prime")(MDMPrimeLM)
