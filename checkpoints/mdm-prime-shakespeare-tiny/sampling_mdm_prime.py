"""Sampler math for masked diffusion (docs/guides/generation.md): time grids, counter-based random numbers, float64
categorical draws, and the sampling strategies.

A strategy is a small scheduler-like object (in the manner of diffusers' schedulers). It owns its time grid
and reveal probabilities, decides *without the model* which positions need the network's scores at a step
(:meth:`SamplerStrategy.plan`), and turns those scores into the next sub-tokens (:meth:`SamplerStrategy.step`).
The single generation loop in ``generation_mdm_prime.py`` drives any of them, and a user can pass their own
subclass to ``generate(strategy=...)``.

Strategies shipped here:

* :class:`AncestralStrategy` (default, exact): the MDM-Prime ancestral sampler.
* :class:`ConfidenceStrategy`: MaskGIT / LLaDA / Dream ordering by a confidence measure, the same expected
  number of reveals per step as the ancestral sampler. Approximate.
* :class:`ThresholdStrategy`: Fast-dLLM's parallel decoding: reveal everything whose confidence exceeds a
  threshold (at least one element per row), so the number of steps adapts to the text. Approximate.
* :class:`StateDependentStrategy` (exact, GenMD4 models): the ancestral sampler of a state-dependent schedule
  (docs/concepts/genmd4.md); ``generate()`` uses it instead of the ancestral one for ``learnable_polynomial`` models.

Confidence is measured per *sub-token* (for ℓ = 1, per token): digit j of a position is scored by its
marginal ``p̄(y^j | y_t) = Σ_{x: digit j of x = v} p_θ(x | y_t)``. A partially masked token is a state of
the forward process (docs/concepts/partial-masking.md), so a sampler may commit to a digit it is sure of (say the most
significant one) while the rest of the token is still uncertain; a token-level measure would have to wait
until the whole token is likely. The revealed digits always come from one joint token draw per position,
so they agree with each other and, through the consistency filter, with the digits already revealed.

Plain torch: no model calls, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .codec_mdm_prime import SubTokenCodec
from .schedules_mdm_prime import LinearSchedule, NoiseSchedule

_MASK32 = 0xFFFFFFFF
# Elements of a float64 (rows, C) temporary materialised at once by the categorical draw.
_DRAW_CHUNK_ELEMENTS = 1 << 24
TIME_GRIDS = ("uniform", "cosine")
CONFIDENCE_MEASURES = ("probability", "margin", "entropy")


def time_grid(num_steps: int, kind: str = "uniform", device: torch.device | str | None = None) -> torch.Tensor:
    """Decreasing times ``(num_steps + 1,)`` float64 from 1 (all masked) to 0 (clean).

    ``uniform``: ``t_k = 1 - k / T``. ``cosine``: ``t_k = cos(π/2 · k / T)``, finer near t = 1 where the first
    tokens are chosen.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    return row_time_grids(torch.tensor([num_steps], device=device), kind)[0]


def row_time_grids(num_steps: torch.Tensor, kind: str = "uniform") -> torch.Tensor:
    """One time grid per row: ``(B,)`` step counts T_b -> ``(B, max T + 1)`` float64 times.

    Row b holds ``t_{b,k}`` for k = 0..T_b (from 1 down to exactly 0) and stays at 0 after T_b.
    """
    if kind not in TIME_GRIDS:
        raise ValueError(f"time_grid must be one of {TIME_GRIDS}, got {kind!r}.")
    steps = num_steps.long().clamp(min=1).unsqueeze(1)
    k = torch.arange(int(steps.max()) + 1, device=num_steps.device)
    fraction = (k / steps.double()).clamp(max=1.0)
    grid = 1.0 - fraction if kind == "uniform" else torch.cos(0.5 * math.pi * fraction)
    # Exact end points: t = 1 is the all-masked prior, t = 0 clean (cos(π/2) is 6e-17, not 0).
    grid[:, 0] = 1.0
    return grid.masked_fill(k >= steps, 0.0)


def check_time_warp(time_warp) -> tuple[float, float, float] | None:
    """Validate ``(a, e, c)`` (see :func:`warp_times`); None or e = 0 means no warp."""
    if time_warp is None:
        return None
    values = tuple(time_warp) if isinstance(time_warp, (list, tuple)) else None
    if values is None or len(values) != 3 or not all(_is_real(v) for v in values):
        raise ValueError(f"time_warp must be three numbers (a, e, c) or None, got {time_warp!r}.")
    a, e, c = (float(v) for v in values)
    if e == 0:
        return None
    if not (a > 0 and e > 0 and a - c >= 1.0 and -c <= 0.0):
        raise ValueError(
            f"time_warp (a, e, c) = {values} must be increasing and cover [0, 1]: a > 0, e > 0 (e = 0: no warp), "
            "a - c >= 1 and c >= 0."
        )
    return a, e, c


def warp_times(t: torch.Tensor, time_warp: tuple[float, float, float] | None) -> torch.Tensor:
    """The MDM-Prime image sampler's time warp (images.md), in this package's direction (t = 1 all masked).

    The reference code runs time the other way (τ = 1 - t, τ = 0 all masked) and warps ``τ' = 1 - a(1 - τ)^e + c``;
    here that is ``t' = clamp(a · t^e - c, 0, 1)``, with the grid's end points kept exact. The paper's CIFAR-10
    setting (a, e, c) = (1, 1.7, 0) is ``t' = t^1.7``: more steps spent where few elements are still masked.
    """
    if time_warp is None:
        return t
    a, e, c = time_warp
    warped = (a * t.clamp(min=0.0) ** e - c).clamp(0.0, 1.0)
    return torch.where((t == 1.0) | (t == 0.0), t, warped)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (multiply-xorshift) on int64 tensors holding values in [0, 2^32).

    The multiplier is below 2^27, so no product overflows int64 and results are identical on every device.
    """
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def seed_words(seed: int | torch.Tensor) -> torch.Tensor:
    """A seed, or ``(B,)`` int64 per-row seeds, folded to 32-bit words (a scalar tensor for an int seed)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.long()
        return _mix32((seed ^ (seed >> 32)) & _MASK32)
    return _mix32(torch.tensor((seed ^ (seed >> 32)) & _MASK32, dtype=torch.long))


def stream_keys(
    seed: int | torch.Tensor, stream_ids: torch.Tensor, content: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B,)`` int64 keys in [0, 2^32) of independent random streams.

    Args:
        seed: the generation seed, or ``(B,)`` int64 seeds, one per row.
        stream_ids: ``(B,)`` per-row stream ids (e.g. ``occurrence · num_return_sequences + return index``).
        content: optional ``(B,)`` words summarising each row's own conditioning (:func:`content_words`), so
            that different prompts in one batch draw independent noise while a row's key still depends on
            nothing but that row.
    """
    seed_word = seed_words(seed).to(stream_ids.device)
    keys = _mix32((_mix32(stream_ids.long() & _MASK32) + seed_word) & _MASK32)
    return keys if content is None else _mix32(keys ^ content)


def content_words(values: torch.Tensor, present: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Order-aware hash of each row's known entries: ``(B, ...)`` values, ``present`` mask and counters ->
    ``(B,)`` words in [0, 2^32). Padding does not enter (give it ``present = False``)."""
    terms = _mix32((_mix32(counters & _MASK32) + values.long() + 1) & _MASK32)
    return (terms * present).flatten(1).sum(1) & _MASK32


def occurrence_index(words: torch.Tensor) -> torch.Tensor:
    """``(B,)`` words -> ``(B,)`` how many earlier rows carry the same word (0 for a row's first occurrence)."""
    same = words.unsqueeze(0) == words.unsqueeze(1)
    return torch.tril(same, diagonal=-1).sum(1)


def _lane(keys: torch.Tensor, step: torch.Tensor | int, counters: torch.Tensor) -> torch.Tensor:
    h = _mix32((counters & _MASK32) ^ keys)
    h = _mix32(h ^ (step & _MASK32))
    return _mix32((h + keys) & _MASK32)


def counter_uniform(keys: torch.Tensor, step: int | torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1) that are a pure function of (key, step, counter).

    Args:
        keys: ``(B,)`` stream keys (:func:`stream_keys`).
        step: the sampler step, an int or ``(B,)`` per row.
        counters: ``(B, ...)`` non-negative int64 counters, e.g. a position's rank among its row's real tokens.
    Returns:
        ``(B, ...)`` float64 with 53 random bits, taken from two independently keyed 32-bit hash lanes.

    Being stateless, a row's numbers do not depend on which other rows share the batch or where padding
    sits, which is what makes batched generation equal to one-prompt-at-a-time generation.
    """
    shape = (-1,) + (1,) * (counters.dim() - 1)
    keys = keys.view(shape)
    if isinstance(step, torch.Tensor):
        step = step.long().view(shape)
    high = _lane(keys, step, counters)
    low = _lane(_mix32(keys ^ 0x9E3779B9), step, counters)
    return ((high >> 5) * (1 << 26) + (low >> 6)).double() / float(1 << 53)


def sample_categorical(
    log_probs: torch.Tensor,
    uniform: torch.Tensor,
    greedy: bool | torch.Tensor = False,
    float64: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from ``softmax(log_probs)``, and the drawn token's probability.

    Args:
        log_probs: ``(N, C)`` unnormalised log-probabilities (-inf for excluded tokens).
        uniform: ``(N,)`` float64 in [0, 1).
        greedy: take the argmax instead (a bool, or ``(N,)`` bool per row).
        float64: inverse CDF in float64 (default). ``False``: Gumbel-max in float32, as MDLM samples; a token
            whose probability is below ~2^-24 of the largest can then never be drawn, which silently lowers
            the temperature (docs/concepts/honest-likelihoods.md). Kept for comparisons.
    Returns:
        ``(N,)`` long token ids and ``(N,)`` float64 probabilities of those tokens.
    """
    if isinstance(greedy, torch.Tensor):
        if not bool(greedy.any()) or bool(greedy.all()):
            return sample_categorical(log_probs, uniform, bool(greedy.all()) if greedy.numel() else False, float64)
        tokens, _ = sample_categorical(log_probs, uniform, False, float64)
        tokens = torch.where(greedy, log_probs.argmax(-1), tokens)
        probs = torch.log_softmax(log_probs.double(), -1).gather(1, tokens.unsqueeze(1)).squeeze(1).exp()
        return tokens, probs
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


def digit_marginals(log_probs: torch.Tensor, codec: SubTokenCodec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-digit marginals of token distributions: ``(N, C)`` log-probabilities -> ``(N, ℓ, b)`` probabilities.

    ``out[n, j, v] = Σ_{x : digit j of x = v} p(x)`` with ``p = softmax(log_probs[n])``, computed on the digit
    grid (one axis per digit, codes ≥ C padded with probability 0), so no (N, C, ℓ) tensor is built. float32 by
    default: the strategies only rank and threshold these numbers (the token draws themselves are float64).
    """
    n, vocab = log_probs.shape
    ell, base = codec.num_sub_tokens, codec.base
    inner = base ** (ell - 1)
    first = -(-vocab // inner)
    probs = torch.zeros(n, first * inner, dtype=dtype, device=log_probs.device)
    probs[:, :vocab] = torch.softmax(log_probs.to(dtype), -1)
    grid = probs.view(n, first, *([base] * (ell - 1)))
    out = torch.zeros(n, ell, base, dtype=dtype, device=log_probs.device)
    for j in range(ell):
        others = [axis for axis in range(1, ell + 1) if axis != j + 1]
        marginal = grid.sum(dim=others) if others else grid
        out[:, j, : marginal.shape[1]] = marginal
    return out


def digit_confidence(
    log_probs: torch.Tensor, tokens: torch.Tensor | None, codec: SubTokenCodec, measure: str
) -> torch.Tensor:
    """``(N, ℓ)`` confidence of each digit under the digit marginals of ``log_probs`` ``(N, C)``.

    ``probability``: ``p̄(y^j = digit_j(x̂))`` of the drawn ``tokens`` ``(N,)`` (LLaDA's low-confidence
    remasking, Dream's ``maskgit_plus``); ``margin``: top-1 minus top-2 of ``p̄(y^j = ·)`` (``topk_margin``);
    ``entropy``: minus the entropy of ``p̄(y^j = ·)`` in nats. The last two ignore ``tokens``. For ℓ = 1
    these are the token-level measures of those samplers.
    """
    marginals = digit_marginals(log_probs, codec)  # (N, ℓ, b)
    if measure == "probability":
        if tokens is None:
            raise ValueError("the probability measure needs the drawn tokens.")
        digits = codec.digit_table(log_probs.device)[tokens]  # (N, ℓ)
        return marginals.gather(2, digits.unsqueeze(-1)).squeeze(-1)
    if measure == "margin":
        top = marginals.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if measure == "entropy":
        return torch.special.xlogy(marginals, marginals).sum(-1)
    raise ValueError(f"confidence measure must be one of {CONFIDENCE_MEASURES}, got {measure!r}.")


@dataclass
class SamplerStepInput:
    """What a strategy sees at one step of the generation loop (B rows, L positions, ℓ digits).

    Args:
        sub_ids: ``(B, L, ℓ)`` current digits (``codec.mask_id`` where masked).
        block: ``(B, L, ℓ)`` bool, the digits each row generates in its current block (masked or not).
        updatable: ``(B, L, ℓ)`` bool, the still masked digits of ``block``: what this step may reveal.
        step: ``(B,)`` long, each row's step index within its current block (0 = t of 1).
        uniform: ``(B, L, ℓ + 1)`` float64 uniforms of this step; slot 0 draws the token, slots 1..ℓ are free
            for per-digit decisions (the ancestral reveal coins).
        greedy: ``(B,)`` bool, rows that take the argmax token instead of sampling at this step.
    """

    sub_ids: torch.Tensor
    block: torch.Tensor
    updatable: torch.Tensor
    step: torch.Tensor
    uniform: torch.Tensor
    greedy: torch.Tensor


@dataclass
class SamplerStepOutput:
    """Result of :meth:`SamplerStrategy.step`: ``sub_ids`` ``(B, L, ℓ)`` the next digits and ``revealed``
    ``(B, L, ℓ)`` bool, the digits this step revealed."""

    sub_ids: torch.Tensor
    revealed: torch.Tensor


class SamplerStrategy:
    """Base class of sampling strategies: one reverse step ``y_t -> y_s`` of a masked-diffusion sampler.

    The generation loop calls, per call of ``generate()``:

    1. :meth:`set_timesteps` once, with each row's number of steps per block and the model's codec and
       (endpoint-exact) schedule;
    2. per step: :meth:`plan` (no model) -> the ``(B, L)`` positions that need scores. If none, the step is
       idle and the network is skipped. Otherwise the loop computes the processed, filtered log-probabilities
       ``(N, C)`` at those positions (row-major order) and calls :meth:`step`;
    3. :meth:`noise_level` whenever it calls the network: what a time-conditioned network is told.

    A subclass implements :meth:`plan` and :meth:`step`; :meth:`reveal_probability` and :meth:`draw` are
    there to use. ``adaptive = True`` declares that a block ends when its digits are all revealed rather than
    after a fixed number of steps; ``exact = True`` that the sampler draws from the model's distribution.
    Instances are copied per ``generate()`` call, so one object can serve many calls.
    """

    name = "base"
    exact = False
    adaptive = False

    def __init__(
        self, time_grid: str = "uniform", float64: bool = True, time_warp: tuple[float, float, float] | None = None
    ):
        if time_grid not in TIME_GRIDS:
            raise ValueError(f"time_grid must be one of {TIME_GRIDS}, got {time_grid!r}.")
        self.time_grid = time_grid
        self.float64 = bool(float64)
        self.time_warp = check_time_warp(time_warp)
        self.codec: SubTokenCodec | None = None
        self.timesteps: torch.Tensor | None = None
        self.alphas: torch.Tensor | None = None
        self.steps_per_block: torch.Tensor | None = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if isinstance(v, (int, float, str, bool)))
        return f"{type(self).__name__}({fields})"

    def set_timesteps(
        self, steps_per_block: torch.Tensor, codec: SubTokenCodec, schedule: NoiseSchedule | None = None
    ) -> None:
        """Per-row time grids ``timesteps`` ``(B, S + 1)`` and ``alphas = α(timesteps)`` (float64).

        Args:
            steps_per_block: ``(B,)`` steps each row spends on each of its blocks.
            codec: the model's sub-token codec.
            schedule: the masking schedule; its endpoint-exact version is used (α(1) = 0, α(0) = 1).
        """
        if getattr(schedule, "state_dependent", False):
            # GenMD4: there is no single α(t). The scalar grid follows α = 1 - t, so noise_level() tells the
            # network t itself (what GenMD4 networks are trained with), and the confidence strategy's quota is
            # the linear schedule's; StateDependentStrategy uses the per-value schedule on top of this grid.
            schedule = LinearSchedule()
        schedule = (schedule or LinearSchedule()).exact()
        self.codec = codec
        self.steps_per_block = steps_per_block.long()
        self.timesteps = warp_times(row_time_grids(self.steps_per_block, self.time_grid), self.time_warp)
        alphas = schedule.alpha(self.timesteps).double()
        self.alphas = torch.where(self.timesteps == 1.0, 0.0, torch.where(self.timesteps == 0.0, 1.0, alphas))

    def times(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` times t (now) and s (after the step) of each row's current step."""
        last = self.timesteps.shape[1] - 1
        t = self.timesteps.gather(1, step.clamp(max=last).unsqueeze(1)).squeeze(1)
        s = self.timesteps.gather(1, (step + 1).clamp(max=last).unsqueeze(1)).squeeze(1)
        return t, s

    def step_alphas(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` float64 α_t (now) and α_s (after the step) of each row's current step."""
        last = self.alphas.shape[1] - 1
        alpha_t = self.alphas.gather(1, step.clamp(max=last).unsqueeze(1)).squeeze(1)
        alpha_s = self.alphas.gather(1, (step + 1).clamp(max=last).unsqueeze(1)).squeeze(1)
        return alpha_t, alpha_s

    def reveal_probability(self, step: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float64 ``(α_s - α_t) / (1 - α_t)``: the probability that a masked element is revealed by
        each row's current step; exactly 1 on a block's last step."""
        alpha_t, alpha_s = self.step_alphas(step)
        p = ((alpha_s - alpha_t) / (1.0 - alpha_t)).clamp(0.0, 1.0)
        return torch.where(step + 1 >= self.steps_per_block, torch.ones_like(p), p)

    def noise_level(self, state: SamplerStepInput) -> torch.Tensor:
        """``(B,)`` the masking probability ``1 - α_t`` of each row now (for time-conditioned networks)."""
        return 1.0 - self.step_alphas(state.step)[0]

    def plan(self, state: SamplerStepInput) -> torch.Tensor:
        """``(B, L)`` bool: positions whose scores this step needs, decided without the model."""
        raise NotImplementedError

    def step(self, scores: torch.Tensor, scored: torch.Tensor, state: SamplerStepInput) -> SamplerStepOutput:
        """Reveal digits from ``scores`` ``(N, C)``, the processed log-probabilities at ``scored`` ``(B, L)``
        (a superset of :meth:`plan`'s positions, row-major order)."""
        raise NotImplementedError

    def draw(
        self, scores: torch.Tensor, scored: torch.Tensor, state: SamplerStepInput, where: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per scored position: ``(B, L)`` drawn tokens (0 elsewhere) and ``(N,)`` their row's index
        into ``scores``. ``where`` ``(B, L)`` limits the draws to a subset of ``scored``."""
        where = scored if where is None else where & scored
        keep = where[scored]
        row_of = torch.arange(scored.shape[0], device=scored.device).unsqueeze(1).expand_as(scored)[where]
        tokens, _ = sample_categorical(scores[keep], state.uniform[..., 0][where], state.greedy[row_of], self.float64)
        picked = torch.zeros(scored.shape, dtype=torch.long, device=scored.device)
        picked[where] = tokens
        return picked, keep

    def reveal(self, state: SamplerStepInput, tokens: torch.Tensor, revealed: torch.Tensor) -> SamplerStepOutput:
        """Write the digits of ``tokens`` ``(B, L)`` where ``revealed`` ``(B, L, ℓ)`` (a subset of updatable)."""
        revealed = revealed & state.updatable
        digits = self.codec.digit_table(tokens.device)[tokens]
        return SamplerStepOutput(torch.where(revealed, digits, state.sub_ids), revealed)


class AncestralStrategy(SamplerStrategy):
    """The MDM-Prime ancestral sampler (exact): draw ``x̂ ~ p_θ(· | y_t)`` per position and reveal each
    masked digit of ``encode(x̂)`` independently with probability ``(α_s - α_t) / (1 - α_t)``
    (docs/guides/generation.md).

    Which digits are revealed does not depend on x̂, so :meth:`plan` decides it first (from the reveal coins,
    uniform slots 1..ℓ) and x̂ is drawn only where a digit is revealed; a step that reveals nothing is idle.
    """

    name = "ancestral"
    exact = True

    def _coins(self, state: SamplerStepInput) -> torch.Tensor:
        p = self.reveal_probability(state.step).view(-1, 1, 1)
        return state.updatable & (state.uniform[..., 1:] < p)

    def plan(self, state):
        return self._coins(state).any(-1)

    def step(self, scores, scored, state):
        revealed = self._coins(state)
        tokens, _ = self.draw(scores, scored, state, where=revealed.any(-1))
        return self.reveal(state, tokens, revealed)


class PredictorCorrectorStrategy(AncestralStrategy):
    """The ancestral sampler with the MDM-Prime image sampler's corrector (images.md; the "divergence-free" term of
    flow_matching's discrete Euler solver). Approximate for a finite number of steps, like the reference.

    With ``ρ(t) = a · τ^e (1 - τ)^e`` at the reference time τ = 1 - t, one step t -> s reveals each masked digit with
    probability ``min(1, (1 + ρ) (α_s - α_t) / (1 - α_t))`` and re-masks each digit the row generated and had
    revealed before this step with probability ``min(1, ρ (α_s - α_t) / α_s)``: extra forward and backward
    moves at rates that leave the forward process's marginals unchanged to first order, so early mistakes can be
    undone. A block's last step reveals everything and re-masks nothing; fixed digits (prompts, imputation) are
    never re-masked. The re-mask coin of a revealed digit is its (otherwise unused) reveal-coin uniform.

    Args:
        rate, exponent: a and e (the paper's CIFAR-10 setting is 16, 2).
    """

    name = "predictor_corrector"

    def __init__(
        self,
        rate: float,
        exponent: float,
        time_grid: str = "uniform",
        float64: bool = True,
        time_warp: tuple[float, float, float] | None = None,
    ):
        super().__init__(time_grid, float64, time_warp)
        if not (_is_real(rate) and rate >= 0 and _is_real(exponent) and exponent >= 0):
            raise ValueError(f"corrector (rate, exponent) must be non-negative numbers, got ({rate!r}, {exponent!r}).")
        self.rate, self.exponent = float(rate), float(exponent)

    def _rho(self, step):
        t, _ = self.times(step)
        tau = 1.0 - t
        return self.rate * (tau * (1.0 - tau)) ** self.exponent

    def reveal_probability(self, step):
        p = super().reveal_probability(step)
        last = step + 1 >= self.steps_per_block
        return torch.where(last, p, ((1.0 + self._rho(step)) * p).clamp(max=1.0))

    def _remask(self, state: SamplerStepInput) -> torch.Tensor:
        """``(B, L, ℓ)`` the generated digits revealed before this step that this step masks again."""
        alpha_t, alpha_s = self.step_alphas(state.step)
        p = (self._rho(state.step) * (alpha_s - alpha_t) / alpha_s.clamp(min=1e-12)).clamp(0.0, 1.0)
        p = torch.where(state.step + 1 >= self.steps_per_block, torch.zeros_like(p), p)
        was_revealed = state.block & ~state.updatable
        return was_revealed & (state.uniform[..., 1:] < p.view(-1, 1, 1))

    def plan(self, state):
        # A step that only re-masks must still run (with or without the idle cache, so that both give the same
        # samples): its positions are planned too, although their scores are not used.
        return super().plan(state) | self._remask(state).any(-1)

    def step(self, scores, scored, state):
        revealed = self._coins(state)
        tokens, _ = self.draw(scores, scored, state, where=revealed.any(-1))
        out = self.reveal(state, tokens, revealed)
        remask = self._remask(state)
        return SamplerStepOutput(out.sub_ids.masked_fill(remask, self.codec.mask_id), out.revealed)


class ConfidenceStrategy(SamplerStrategy):
    """Confidence-ordered unmasking (MaskGIT, LLaDA's low-confidence remasking, Dream's ``maskgit_plus`` /
    ``topk_margin`` / ``entropy``), at the sub-token level. Approximate: the revealed set depends on the scores.

    Each step reveals ``round(n · (α_s - α_t) / (1 - α_t))`` of a row's n updatable digits (the ancestral
    sampler's expected number, so the step budget means the same), choosing the most confident digits of the
    drawn tokens (ties: earlier position, then the more significant digit).

    Args:
        measure: ``"probability"`` (of the drawn digit), ``"margin"`` (top-1 minus top-2) or ``"entropy"``
            (negative entropy), each of the digit's marginal (see :func:`digit_confidence`).
    """

    name = "confidence"

    def __init__(
        self,
        measure: str = "probability",
        time_grid: str = "uniform",
        float64: bool = True,
        time_warp: tuple[float, float, float] | None = None,
    ):
        super().__init__(time_grid, float64, time_warp)
        if measure not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence measure must be one of {CONFIDENCE_MEASURES}, got {measure!r}.")
        self.measure = measure

    def _quota(self, state):
        count = state.updatable.flatten(1).sum(1)
        return torch.floor(count.double() * self.reveal_probability(state.step) + 0.5).long()

    def plan(self, state):
        return state.updatable.any(-1) & (self._quota(state) > 0).unsqueeze(1)

    def _confidence(
        self, scores: torch.Tensor, scored: torch.Tensor, state: SamplerStepInput
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, L, ℓ)`` float32 digit confidences, -inf where not updatable, and the ``(B, L)`` drawn tokens for
        the probability measure, which needs them (the other measures draw only what they reveal: None)."""
        tokens = None
        if self.measure == "probability":
            tokens, _ = self.draw(scores, scored, state)
        confidence = torch.full(state.updatable.shape, -math.inf, device=scores.device)
        drawn = None if tokens is None else tokens[scored]
        confidence[scored] = digit_confidence(scores, drawn, self.codec, self.measure)
        return confidence.masked_fill(~state.updatable, -math.inf), tokens

    def _select(self, confidence: torch.Tensor, state: SamplerStepInput) -> torch.Tensor:
        """``(B, L, ℓ)`` the ``quota`` most confident updatable digits of each row (ties: earlier position, then
        the more significant digit)."""
        batch = confidence.shape[0]
        order = torch.argsort(confidence.reshape(batch, -1), dim=1, descending=True, stable=True)
        positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        return rank.view_as(state.updatable) < self._quota(state).view(-1, 1, 1)

    def step(self, scores, scored, state):
        confidence, tokens = self._confidence(scores, scored, state)
        revealed = self._select(confidence, state) & state.updatable
        if tokens is None:
            tokens, _ = self.draw(scores, scored, state, where=revealed.any(-1))
        return self.reveal(state, tokens, revealed)


class ThresholdStrategy(ConfidenceStrategy):
    """Fast-dLLM's threshold parallel decoding, at the sub-token level. Approximate.

    Every step scores all of a row's current block and reveals each updatable digit whose confidence exceeds
    ``threshold``; if none does, the row's single most confident digit. Each step therefore makes progress,
    and a block ends when it is fully revealed (``adaptive``): confident text takes few steps, hard text many.
    ``num_steps`` and the time grid are not used; a time-conditioned network is told the block's masked
    fraction as its noise level. Per-row network calls are reported as ``row_nfe``.

    Args:
        threshold: confidence above which a digit is revealed (a probability for ``probability`` and
            ``margin``, a negative entropy in nats for ``entropy``).
        measure: see :class:`ConfidenceStrategy`.
    """

    name = "threshold"
    adaptive = True

    def __init__(self, threshold: float = 0.9, measure: str = "probability", float64: bool = True):
        super().__init__(measure, "uniform", float64)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number, got {threshold!r}.")
        self.threshold = float(threshold)

    def noise_level(self, state):
        masked = state.updatable.flatten(1).sum(1).double()
        return masked / state.block.flatten(1).sum(1).clamp(min=1).double()

    def plan(self, state):
        return state.updatable.any(-1)

    def _select(self, confidence, state):
        flat = confidence.reshape(confidence.shape[0], -1)
        best = torch.zeros_like(flat, dtype=torch.bool)
        best.scatter_(1, flat.argmax(1, keepdim=True), True)  # argmax takes the first maximum: earliest digit
        return ((flat > self.threshold) | best).view_as(state.updatable)


class StateDependentStrategy(SamplerStrategy):
    """Exact ancestral sampler of a state-dependent schedule (GenMD4, ℓ = 1, docs/concepts/genmd4.md).

    A masked position at t becomes token i at s with probability ``r_i μ_i``, ``r_i = (α_{s,i} - α_{t,i}) /
    (1 - α_{t,i}) = 1 - (s/t)^{w_i}``, and stays masked with probability ``1 - Σ_i r_i μ_i``. Reveal and token
    are ONE joint draw (the reveal probability depends on the token). With the position's uniform u (slot 1)
    it reveals iff ``u < Σ_i r_i μ_i``, and the token is the inverse-CDF draw of slot 0 from ``∝ r_i μ_i``
    (float64).

    Idle skipping stays exact without the network: ``Σ_i r_i μ_i <= max_i r_i`` for every μ, so a position with
    ``u >= max_i r_i`` cannot be revealed whatever the scores; :meth:`plan` asks for scores only where
    ``u < max_i r_i``. The network is told t (:meth:`noise_level`), as in training.
    """

    name = "state_dependent"
    exact = True

    def set_timesteps(self, steps_per_block, codec, schedule=None):
        if not getattr(schedule, "state_dependent", False):
            raise ValueError(
                "StateDependentStrategy needs a state-dependent schedule (a noise_schedule='learnable_polynomial' "
                "model); use AncestralStrategy for fixed schedules."
            )
        if codec.num_sub_tokens != 1:
            raise ValueError("StateDependentStrategy is defined for num_sub_tokens=1.")
        super().set_timesteps(steps_per_block, codec, schedule)
        self.powers = schedule.powers.detach().double()

    def noise_level(self, state):
        return self.times(state.step)[0]

    def token_reveal_probability(self, step: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` float64 ``r_i = 1 - (s/t)^{w_i}`` of each row's current step; exactly 1 on a block's
        last step (s = 0)."""
        t, s = self.times(step)
        log_ratio = torch.log(s / t).unsqueeze(1)  # -inf at s = 0
        r = (-torch.expm1(self.powers.to(t.device) * log_ratio)).clamp(0.0, 1.0)
        return torch.where((step + 1 >= self.steps_per_block).unsqueeze(1), torch.ones_like(r), r)

    def plan(self, state):
        largest = self.token_reveal_probability(state.step).amax(1)  # (B,)
        return state.updatable[..., 0] & (state.uniform[..., 1] < largest.unsqueeze(1))

    def step(self, scores, scored, state):
        row_of = torch.arange(scored.shape[0], device=scored.device).unsqueeze(1).expand_as(scored)[scored]
        r = self.token_reveal_probability(state.step)[row_of]  # (N, C)
        log_mu = torch.log_softmax(scores.double(), -1)
        joint = log_mu + torch.log(r)  # log(r_i μ_i): the probability of moving to i
        reveal_probability = torch.logsumexp(joint, -1).exp()  # Σ_i r_i μ_i
        reveal = state.updatable[..., 0][scored] & (state.uniform[..., 1][scored] < reveal_probability)
        tokens = torch.zeros(scored.shape, dtype=torch.long, device=scored.device)
        if bool(reveal.any()):
            drawn, _ = sample_categorical(
                joint[reveal], state.uniform[..., 0][scored][reveal], state.greedy[row_of][reveal], self.float64
            )
            where = scored.clone()
            where[scored] = reveal
            tokens[where] = drawn
        revealed = torch.zeros_like(scored)
        revealed[scored] = reveal
        return self.reveal(state, tokens, revealed.unsqueeze(-1))


STRATEGIES = {
    cls.name: cls
    for cls in (
        AncestralStrategy,
        ConfidenceStrategy,
        ThresholdStrategy,
        StateDependentStrategy,
        PredictorCorrectorStrategy,
    )
}


def get_sampler_strategy(
    name: str,
    *,
    time_grid: str = "uniform",
    float64: bool = True,
    confidence_measure: str = "probability",
    threshold: float = 0.9,
    time_warp: tuple[float, float, float] | None = None,
    corrector: tuple[float, float] | None = None,
) -> SamplerStrategy:
    """Build a shipped strategy by name (``ancestral``, ``confidence``, ``threshold``, ``state_dependent``,
    ``predictor_corrector``) from generation settings. ``corrector`` (a, e) turns ``ancestral`` into
    :class:`PredictorCorrectorStrategy`; ``time_warp`` (a, e, c) warps the time grid (:func:`warp_times`)."""
    if corrector is not None and name not in ("ancestral", "predictor_corrector"):
        raise ValueError(f"corrector applies to the ancestral sampler, not to strategy={name!r}.")
    if name == "predictor_corrector" and corrector is None:
        raise ValueError("strategy='predictor_corrector' needs corrector=(rate, exponent), e.g. (16, 2).")
    if time_warp is not None and name in ("threshold", "state_dependent") and check_time_warp(time_warp):
        raise ValueError(f"time_warp applies to the time-grid strategies, not to strategy={name!r}.")
    if name == "state_dependent":
        return StateDependentStrategy(time_grid, float64)
    if corrector is not None:
        if not isinstance(corrector, (list, tuple)) or len(corrector) != 2:
            raise ValueError(f"corrector must be (rate, exponent) or None, got {corrector!r}.")
        return PredictorCorrectorStrategy(corrector[0], corrector[1], time_grid, float64, time_warp)
    if name == "ancestral":
        return AncestralStrategy(time_grid, float64, time_warp)
    if name == "confidence":
        return ConfidenceStrategy(confidence_measure, time_grid, float64, time_warp)
    if name == "threshold":
        return ThresholdStrategy(threshold, confidence_measure, float64)
    raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)} or a SamplerStrategy.")


__all__ = [
    "AncestralStrategy",
    "ConfidenceStrategy",
    "PredictorCorrectorStrategy",
    "SamplerStepInput",
    "SamplerStepOutput",
    "SamplerStrategy",
    "StateDependentStrategy",
    "ThresholdStrategy",
    "content_words",
    "counter_uniform",
    "digit_confidence",
    "digit_marginals",
    "get_sampler_strategy",
    "occurrence_index",
    "seed_words",
    "row_time_grids",
    "sample_categorical",
    "stream_keys",
    "time_grid",
    "warp_times",
]
