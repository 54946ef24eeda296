"""Sampler math for masked diffusion (method.md §3.5): time grids, counter-based random numbers, float64
categorical draws and the per-step update rules ("strategies").

A strategy is a small object whose :meth:`SamplerStep.step` maps the current sub-tokens and the model's
(processed) token scores to the next sub-tokens; the single generation loop in ``generation_mdm_prime.py``
drives any of them. Plain torch: no model calls, no I/O.
"""

from __future__ import annotations

import math

import torch

from .codec_mdm_prime import SubTokenCodec

_MASK32 = 0xFFFFFFFF
# Elements of a float64 (rows, C) temporary materialised at once by the categorical draw.
_DRAW_CHUNK_ELEMENTS = 1 << 24


def time_grid(num_steps: int, kind: str = "uniform", device: torch.device | str | None = None) -> torch.Tensor:
    """Decreasing times ``(num_steps + 1,)`` float64 from 1 (all masked) to 0 (clean).

    ``uniform``: ``t_k = 1 - k / T``. ``cosine``: ``t_k = cos(π/2 · k / T)``, finer near t = 1 where the first
    tokens are chosen.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    k = torch.arange(num_steps + 1, dtype=torch.float64, device=device) / num_steps
    if kind == "uniform":
        grid = 1.0 - k
    elif kind == "cosine":
        grid = torch.cos(0.5 * math.pi * k)
    else:
        raise ValueError(f"time_grid must be 'uniform' or 'cosine', got {kind!r}.")
    grid[0], grid[-1] = 1.0, 0.0
    return grid


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (multiply-xorshift) on int64 tensors holding values in [0, 2^32).

    The multiplier is below 2^27, so no product overflows int64 and results are identical on every device.
    """
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def stream_keys(seed: int, stream_ids: torch.Tensor, content: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` int64 keys in [0, 2^32) of independent random streams.

    Args:
        seed: the generation seed.
        stream_ids: ``(B,)`` per-row stream ids (e.g. the index among ``num_return_sequences``).
        content: optional ``(B,)`` words summarising each row's own conditioning (:func:`content_words`), so
            that different prompts in one batch draw independent noise while a row's key still depends on
            nothing but that row.
    """
    seed_word = _mix32(torch.tensor((seed ^ (seed >> 32)) & _MASK32, dtype=torch.long))
    keys = _mix32((_mix32(stream_ids.long() & _MASK32) + seed_word.to(stream_ids.device)) & _MASK32)
    return keys if content is None else _mix32(keys ^ content)


def content_words(values: torch.Tensor, present: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Order-aware hash of each row's known entries: ``(B, ...)`` values, ``present`` mask and counters ->
    ``(B,)`` words in [0, 2^32). Padding does not enter (give it ``present = False``)."""
    terms = _mix32((_mix32(counters & _MASK32) + values.long() + 1) & _MASK32)
    return (terms * present).flatten(1).sum(1) & _MASK32


def _lane(keys: torch.Tensor, step: int, counters: torch.Tensor) -> torch.Tensor:
    h = _mix32((counters & _MASK32) ^ keys)
    h = _mix32(h ^ (step & _MASK32))
    return _mix32((h + keys) & _MASK32)


def counter_uniform(keys: torch.Tensor, step: int, counters: torch.Tensor) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1) that are a pure function of (key, step, counter).

    Args:
        keys: ``(B,)`` stream keys (:func:`stream_keys`).
        step: the sampler step.
        counters: ``(B, ...)`` non-negative int64 counters, e.g. a position's rank among its row's real tokens.
    Returns:
        ``(B, ...)`` float64 with 53 random bits, taken from two independently keyed 32-bit hash lanes.

    Being stateless, a row's numbers do not depend on which other rows share the batch or where padding
    sits, which is what makes batched generation equal to one-prompt-at-a-time generation.
    """
    keys = keys.view((-1,) + (1,) * (counters.dim() - 1))
    high = _lane(keys, step, counters)
    low = _lane(_mix32(keys ^ 0x9E3779B9), step, counters)
    return ((high >> 5) * (1 << 26) + (low >> 6)).double() / float(1 << 53)


def sample_categorical(
    log_probs: torch.Tensor, uniform: torch.Tensor, greedy: bool = False, float64: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from ``softmax(log_probs)``, and the drawn token's probability.

    Args:
        log_probs: ``(N, C)`` unnormalised log-probabilities (-inf for excluded tokens).
        uniform: ``(N,)`` float64 in [0, 1).
        greedy: take the argmax instead.
        float64: inverse CDF in float64 (default). ``False``: Gumbel-max in float32, as MDLM samples; a token
            whose probability is below ~2^-24 of the largest can then never be drawn, which silently lowers
            the temperature (method.md §1). Kept for comparisons.
    Returns:
        ``(N,)`` long token ids and ``(N,)`` float64 probabilities of those tokens.
    """
    if greedy or not float64:
        if greedy:
            tokens = log_probs.argmax(-1)
        else:  # one float32 Gumbel variate per token, hashed from the row's uniform and the token id
            ids = torch.arange(log_probs.shape[1], device=log_probs.device).expand_as(log_probs)
            u = counter_uniform((uniform * 2**32).long(), 0, ids).float()
            u = u.clamp(min=torch.finfo(torch.float32).tiny, max=1.0 - 2.0**-24)
            tokens = (log_probs.float() - torch.log(-torch.log(u))).argmax(-1)
        probs = torch.log_softmax(log_probs.double(), -1).gather(1, tokens.unsqueeze(1)).squeeze(1).exp()
        return tokens, probs
    tokens = torch.empty(log_probs.shape[0], dtype=torch.long, device=log_probs.device)
    probs = torch.empty(log_probs.shape[0], dtype=torch.float64, device=log_probs.device)
    chunk = max(1, _DRAW_CHUNK_ELEMENTS // max(1, log_probs.shape[1]))
    for start in range(0, log_probs.shape[0], chunk):
        cdf = torch.softmax(log_probs[start : start + chunk].double(), dim=-1).cumsum_(-1)
        total = cdf[:, -1:]
        index = torch.searchsorted(cdf, uniform[start : start + chunk, None] * total, right=True)
        index = index.clamp_(max=log_probs.shape[1] - 1)
        upper = cdf.gather(1, index)
        lower = torch.where(index > 0, cdf.gather(1, (index - 1).clamp(min=0)), torch.zeros_like(upper))
        tokens[start : start + chunk] = index.squeeze(1)
        probs[start : start + chunk] = ((upper - lower) / total).squeeze(1)
    return tokens, probs


class SamplerStep:
    """One reverse step ``y_t -> y_s`` of a masked-diffusion sampler, in two parts.

    :meth:`positions_to_score` decides, *without the model*, which positions need the network's scores this
    step; when none do, the step reveals nothing and the generation loop skips the network (an idle step).
    :meth:`step` then updates the sub-tokens from the scores. Arguments:

        sub_ids: ``(B, L, ℓ)`` current digits (``codec.mask_id`` where masked).
        updatable: ``(B, L, ℓ)`` bool, the masked digits this step may reveal.
        rows: ``(B, L)`` bool, positions whose scores are given (a superset of ``positions_to_score``).
        scores: ``(N, C)`` processed log-probabilities at ``rows`` (row-major order).
        reveal_probability: ``(α_s - α_t) / (1 - α_t)``; 1 on the last step.
        uniform: ``(B, L, ℓ + 1)`` float64 uniforms; slot 0 draws the token, slots 1..ℓ decide the digits.
        greedy: draw argmax tokens instead of sampling.
        float64: draw in float64 (see :func:`sample_categorical`).

    Revealed digits come from one joint token draw per position, so they agree with each other and, through
    the consistency filter, with the digits already revealed.
    """

    def __init__(self, codec: SubTokenCodec):
        self.codec = codec

    def positions_to_score(self, updatable, reveal_probability, uniform) -> torch.Tensor:
        raise NotImplementedError

    def step(self, sub_ids, updatable, rows, scores, reveal_probability, uniform, greedy=False, float64=True):
        raise NotImplementedError

    def _draw(self, scores, rows, uniform, greedy, float64):
        """``(B, L)`` drawn tokens (0 where not scored) and their probabilities (0 where not scored)."""
        tokens, probs = sample_categorical(scores, uniform[..., 0][rows], greedy, float64)
        picked = torch.zeros(rows.shape, dtype=torch.long, device=rows.device)
        picked[rows] = tokens
        confidence = torch.zeros(rows.shape, dtype=torch.float64, device=rows.device)
        confidence[rows] = probs
        return picked, confidence


class AncestralStep(SamplerStep):
    """The MDM-Prime ancestral sampler: draw ``x̂ ~ p_θ(· | y_t)`` per position and reveal each masked digit
    of ``encode(x̂)`` independently with probability ``(α_s - α_t) / (1 - α_t)`` (method.md §3.5).

    Which digits are revealed does not depend on x̂, so it is decided first and x̂ is drawn only where a
    digit is revealed.
    """

    name = "ancestral"

    def _reveal(self, updatable, reveal_probability, uniform):
        return updatable & (uniform[..., 1:] < reveal_probability)

    def positions_to_score(self, updatable, reveal_probability, uniform):
        return self._reveal(updatable, reveal_probability, uniform).any(-1)

    def step(self, sub_ids, updatable, rows, scores, reveal_probability, uniform, greedy=False, float64=True):
        reveal = self._reveal(updatable, reveal_probability, uniform)
        drawn = reveal.any(-1)
        keep = drawn[rows]  # draw only where something is revealed, even if more rows were scored
        tokens, _ = self._draw(scores[keep], drawn, uniform, greedy, float64)
        return torch.where(reveal, self.codec.encode(tokens), sub_ids)


class ConfidenceStep(SamplerStep):
    """Confidence-ordered unmasking (MaskGIT / LLaDA style) at the sub-token level.

    Reveals ``round(n · (α_s - α_t) / (1 - α_t))`` of a row's n updatable digits, the same expected number
    as the ancestral sampler, choosing those whose position's drawn token is most probable (ties: earlier
    position, then more significant digit).
    """

    name = "confidence"

    def _quota(self, updatable, reveal_probability):
        count = updatable.flatten(1).sum(1)
        return torch.floor(count.double() * reveal_probability + 0.5).long()

    def positions_to_score(self, updatable, reveal_probability, uniform):
        return updatable.any(-1) & (self._quota(updatable, reveal_probability) > 0).unsqueeze(1)

    def step(self, sub_ids, updatable, rows, scores, reveal_probability, uniform, greedy=False, float64=True):
        tokens, confidence = self._draw(scores, rows, uniform, greedy, float64)
        batch = sub_ids.shape[0]
        quota = self._quota(updatable, reveal_probability)
        score = confidence.unsqueeze(-1).expand_as(updatable).masked_fill(~updatable, -1.0).reshape(batch, -1)
        order = torch.argsort(score, dim=1, descending=True, stable=True)
        positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        reveal = (rank < quota.unsqueeze(1)).view_as(updatable) & updatable
        return torch.where(reveal, self.codec.encode(tokens), sub_ids)


STRATEGIES = {cls.name: cls for cls in (AncestralStep, ConfidenceStep)}


def get_sampler_step(name: str, codec: SubTokenCodec) -> SamplerStep:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}.")
    return STRATEGIES[name](codec)


__all__ = [
    "AncestralStep",
    "ConfidenceStep",
    "SamplerStep",
    "content_words",
    "counter_uniform",
    "get_sampler_step",
    "sample_categorical",
    "stream_keys",
    "time_grid",
]
