"""Forward process and objectives of MDM-Prime / MD4 (docs/concepts/honest-likelihoods.md,
docs/concepts/partial-masking.md).

Notation: a token x0 has digits y0 = (y0^1..y0^ℓ); y_t is y0 with some digits masked; p_θ(x | y_t) is the
model's distribution over the C real tokens, restricted to the tokens consistent with the revealed digits
V(y_t) when ``carry_over`` is on. For a set U of digit positions,

    p̄_θ(y^U = y0^U | y_t) = Σ_{x ∈ V(y_t): digits U of x equal y0^U} p_θ(x | y_t).

Every objective is built from these set marginals:
  * valid continuous-time bound: Σ_{j masked} -log p̄(y^{j} = y0^{j} | y_t)   (digits revealed one at a time)
  * discrete-time bound, one step revealing U: -log p̄(y^U = y0^U | y_t)
  * the MDM-Prime paper objective: -log p_θ(x0 | y_t), the softmax over V(y_t) with ``carry_over`` (equal to
    -log p̄(y^M = y0^M | y_t), M the masked digits) and over all C tokens without. Not an upper bound on the
    NLL (docs/concepts/honest-likelihoods.md).

The set marginals come from :func:`superset_logsumexp`, which needs one exp and about one summing pass over the
(N, C) logits for all 2^ℓ digit sets at once: no (N, C, ℓ) tensor and no dense (N, C) filter is materialised.

Plain torch: no model, no I/O.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .codec_mdm_prime import SubTokenCodec


def sample_masks(
    shape: tuple[int, ...] | torch.Size,
    alpha: torch.Tensor,
    maskable: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Forward process q(y_t | y0): every sub-token is masked independently with probability 1 - α_t.

    Args:
        shape: ``(B, L, ℓ)``.
        alpha: ``(B,)`` α(t) per sequence.
        maskable: optional ``(B, L)`` bool; positions where it is False are never masked (padding,
            prompts).
    Returns:
        ``(B, L, ℓ)`` bool, True where the sub-token is masked.
    """
    u = torch.rand(shape, generator=generator, device=alpha.device, dtype=torch.float64)
    masked = u >= alpha.to(torch.float64).view(-1, *([1] * (len(shape) - 1)))
    if maskable is not None:
        masked &= maskable.unsqueeze(-1)
    return masked


def sample_mask_counts(
    maskable: torch.Tensor,
    num_sub_tokens: int,
    strata: torch.Tensor,
    generator: torch.Generator | None = None,
    return_level: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rao-Blackwellised forward process for the continuous-time ELBO of a time-independent network.

    With t ~ U(0, 1) and each of a sequence's N elements masked with probability t, the number masked, k, is
    uniform on {0..N} and ``E[1/t | k] = (N + 1) / k``; given k the masked set is a uniform k-subset. Hence

        ∫_0^1 (1/t) E_q[S(y_t)] dt = E_{k ~ U{1..N}} E_{|M| = k}[ (N / k) · S(M) ]

    for any per-sequence sum S over masked elements (valid bound or paper objective), and for any schedule
    with exact end points (the bound depends on the schedule only through them). Unlike sampling t, whose
    weight 1/t has an infinite second moment near t = 0, the weight N/k is bounded by N.

    For a time-conditioned network, which must be told the noise level, the same holds with the masking
    probability drawn given k: t | k ~ Beta(k + 1, N - k + 1) under the forward process, and the 1/t weight
    turns that density into ((N + 1)/k) · Beta(k, N - k + 1), so

        ∫_0^1 (1/t) E_q[S(y_t, t)] dt = E_{k ~ U{1..N}} E_{t ~ Beta(k, N-k+1)} E_{|M| = k}[ (N / k) · S(M, t) ].

    The k-th smallest of the N uniform keys that choose M is such a t, and it is independent of which k
    elements they choose, so it comes for free (``return_level``). The weight stays N/k.

    Args:
        maskable: ``(B, L)`` bool, positions whose ℓ sub-tokens may be masked (N = ℓ · count per row).
        strata: ``(B,)`` in [0, 1): k = 1 + floor(strata · N) (pass low-discrepancy values to stratify).
        return_level: also return the ``(B,)`` masking probabilities t ~ Beta(k, N - k + 1) (float64; 1 for
            rows with nothing maskable).
    Returns:
        ``(B, L, ℓ)`` bool masks with exactly k masked elements per row, and ``(B,)`` weights N / k (0 for
        rows with nothing maskable).
    """
    batch, length = maskable.shape
    elements = maskable.unsqueeze(-1).expand(batch, length, num_sub_tokens)
    total = elements.flatten(1).sum(1)
    count = (1 + torch.floor(strata.double() * total)).long().clamp(max=total.clamp(min=1))
    keys = torch.rand(elements.shape, generator=generator, device=maskable.device, dtype=torch.float64)
    keys = keys.masked_fill(~elements, 2.0).flatten(1)  # never chosen
    order = keys.argsort(1)
    rank = torch.empty_like(keys, dtype=torch.long)
    rank.scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(rank))
    masked = (rank < count.unsqueeze(1)).view(elements.shape) & elements
    weight = torch.where(total > 0, total.double() / count, torch.zeros_like(total, dtype=torch.float64))
    if not return_level:
        return masked, weight.float()
    level = keys.gather(1, order.gather(1, (count - 1).unsqueeze(1))).squeeze(1)
    return masked, weight.float(), torch.where(total > 0, level, torch.ones_like(level))


# The fast path needs Σ_x exp(x - x0) <= e^64 (x0 the target's logit, which lies in every set): every set sum
# is then in [1, e^64], so float32 neither overflows nor loses a set to underflow (the at most C terms that
# underflow change a sum >= 1 by < 1e-40). Rows beyond it (the target > 64 nats below the row's mass) are
# rare and go through float64.
_FAST_PATH_LIMIT = math.exp(64.0)
# The float64 shift stays within this many nats of the row maximum, so no sum of C exps overflows (e^709).
_FALLBACK_SHIFT_GAP = 640.0


def _exp_grid(logits: torch.Tensor, shift: torch.Tensor, codec: SubTokenCodec, dtype: torch.dtype) -> torch.Tensor:
    """``(n, C)`` logits and ``(n,)`` shifts -> a new ``(n, b_1, b, ..., b)`` grid of ``exp(logits - shift)`` in
    ``dtype``: one axis per digit (most significant first), zero-padded (invalid codes) up to ``b_1 b^(ℓ-1)``."""
    inner = codec.base ** (codec.num_sub_tokens - 1)
    first = -(-codec.vocab_size // inner)
    grid = torch.empty(logits.shape[0], first * inner, dtype=dtype, device=logits.device)
    torch.sub(logits, shift.to(dtype).unsqueeze(1), out=grid[:, : codec.vocab_size])
    grid[:, codec.vocab_size :] = float("-inf")
    return grid.exp_().view(logits.shape[0], first, *([codec.base] * (codec.num_sub_tokens - 1)))


def _resolve_sums(tensor: torch.Tensor, digits: torch.Tensor, rows: torch.Tensor, depth: int, bits: int, out) -> None:
    """Forward recursion over the digit axes: at depth j split into "digit j agrees with the target" (select
    its slice) and "digit j is free" (sum over the axis); the leaf's ``bits`` are the agreeing digits."""
    if depth == digits.shape[1]:
        out[:, bits] = tensor
        return
    _resolve_sums(tensor[rows, digits[:, depth]], digits, rows, depth + 1, bits | (1 << depth), out)
    _resolve_sums(tensor.sum(1), digits, rows, depth + 1, bits, out)


def _set_sums(logits: torch.Tensor, shift: torch.Tensor, digits: torch.Tensor, codec, dtype) -> torch.Tensor:
    """``(n, 2^ℓ)`` ``S[n, A] = Σ_{x agrees with the target on A} exp(logits[n, x] - shift[n])`` in ``dtype``."""
    out = torch.empty(logits.shape[0], 1 << codec.num_sub_tokens, dtype=dtype, device=logits.device)
    rows = torch.arange(logits.shape[0], device=logits.device)
    _resolve_sums(_exp_grid(logits, shift, codec, dtype), digits, rows, 0, 0, out)
    return out


def _coefficient_grid(coefficients: torch.Tensor, digits: torch.Tensor, rows: torch.Tensor, depth: int, base: int):
    """``K(y) = Σ_{A ⊆ agree(y)} c_A`` on the digit axes ``depth..ℓ-1``, an ``(n, b, ..., b)`` grid (``(n,)`` at
    depth ℓ). ``agree(y)`` is the set of those digits of y that equal the target's; ``coefficients`` ``(n,
    2^(ℓ-depth))`` is indexed by the bits of A from digit ``depth`` on. Each level is b times larger than the
    two below it, so building it costs about 2/b of a pass over the logits."""
    if depth == digits.shape[1]:
        return coefficients[:, 0]
    free = _coefficient_grid(coefficients[:, 0::2], digits, rows, depth + 1, base)
    agree = _coefficient_grid(coefficients[:, 1::2], digits, rows, depth + 1, base)
    grid = free.unsqueeze(1).repeat(1, base, *([1] * (free.dim() - 1)))
    grid[rows, digits[:, depth]] += agree
    return grid


def _set_sums_backward(logits, shift, coefficients, digits, codec, dtype) -> torch.Tensor:
    """``(n, b_1 b^(ℓ-1))`` gradient ``Σ_A c_A exp(x - shift) [x agrees with the target on A]`` for ``(n, 2^ℓ)``
    coefficients ``c_A = ∂loss/∂F_A / S_A`` (the derivative of ``F_A = shift + log S_A``)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    grid = _exp_grid(logits, shift, codec, dtype)
    # Digit 0 (the padded axis) is handled here rather than in _coefficient_grid, so that the only full-size
    # work is one exp and one broadcast multiply, done in place.
    free = _coefficient_grid(coefficients[:, 0::2], digits, rows, 1, codec.base)
    agree = _coefficient_grid(coefficients[:, 1::2], digits, rows, 1, codec.base)
    slab = grid[rows, digits[:, 0]] * agree
    grid.mul_(free.unsqueeze(1))
    grid[rows, digits[:, 0]] += slab
    return grid.view(logits.shape[0], -1)


class _SupersetLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, codec):
        digits = codec.digit_table(logits.device)[targets]
        target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()
        sums = _set_sums(logits, target_logits, digits, codec, torch.float32)
        out = sums.log().add_(target_logits.unsqueeze(1))
        far = ~(sums[:, 0] <= _FAST_PATH_LIMIT)  # also catches inf / NaN (a -inf target logit)
        far_rows = far.nonzero().squeeze(1) if bool(far.any()) else None
        far_sums = far_shift = None
        if far_rows is not None:
            far_logits = logits[far_rows]
            far_shift = torch.maximum(
                far_logits.amax(1).double() - _FALLBACK_SHIFT_GAP, target_logits[far_rows].double()
            )
            far_shift = torch.where(torch.isfinite(far_shift), far_shift, torch.zeros_like(far_shift))
            far_sums = _set_sums(far_logits, far_shift, digits[far_rows], codec, torch.float64)
            out[far_rows] = far_sums.log().add_(far_shift.unsqueeze(1)).float()
        out[:, -1] = target_logits  # the full set is the target alone: exact
        ctx.codec = codec
        ctx.far_rows = far_rows
        ctx.save_for_backward(logits, targets, target_logits, sums, far_sums, far_shift)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, target_logits, sums, far_sums, far_shift = ctx.saved_tensors
        codec, far_rows = ctx.codec, ctx.far_rows
        digits = codec.digit_table(logits.device)[targets]
        coefficients = grad_out.float() / sums  # every fast-path sum is >= 1
        if far_rows is not None:
            coefficients[far_rows] = 0.0
        grad = _set_sums_backward(logits, target_logits, coefficients, digits, codec, torch.float32)
        if far_rows is not None:
            # A set of -inf logits has S = 0 and contributes nothing (its members' exps are 0).
            far_grad_out = grad_out[far_rows].double()
            far_coefficients = torch.where(far_sums > 0, far_grad_out / far_sums, torch.zeros_like(far_sums))
            grad[far_rows] = _set_sums_backward(
                logits[far_rows], far_shift, far_coefficients, digits[far_rows], codec, torch.float64
            ).float()
        return grad[:, : codec.vocab_size].to(logits.dtype), None, None


def superset_logsumexp(logits: torch.Tensor, targets: torch.Tensor, codec: SubTokenCodec) -> torch.Tensor:
    """``F[n, A] = log Σ_{x : digits A of x equal those of targets[n]} exp(logits[n, x])`` for every digit set A.

    Args:
        logits: ``(N, C)`` scores over the real tokens (any float dtype; computed in float32).
        targets: ``(N,)`` token ids.
    Returns:
        ``(N, 2^ℓ)`` float32, differentiable; column A is the bitmask of A (bit j <-> digit j, the most
        significant digit is bit 0). Column ``2^ℓ - 1`` is the target's own logit, column 0 the whole row's
        log-sum-exp.

    Every set A contains the target, so with the target's logit x0 as the shift, ``F[n, A] = x0 + log S[n, A]``
    with ``S[n, A] = Σ_{x ∈ A} exp(logits[n, x] - x0) >= 1``: one exp over the logits, then only sums. The
    exps are viewed as a grid with one axis per digit (zero-padded for invalid codes) and the axes are resolved
    one at a time: each partial sum splits into "digit j agrees" (select the target's slice) and "digit j is
    free" (sum over the axis). Both halves are b times smaller than their parent, so all 2^ℓ sums cost about
    one pass (for b >= 4). The backward is ``∂F_A/∂x = exp(x - F_A) [x ∈ A]``: one exp and one multiply by
    ``K(x) = Σ_{A ∋ x} g_A / S_A``, a grid built the same way from the (N, 2^ℓ) coefficients. Only the logits
    and ``(N, 2^ℓ)`` sums are kept for the backward.

    Float32 is exact to rounding while ``S[n, 0] <= e^64`` (the target within 64 nats of the row's
    log-sum-exp, as in any trained or initialised network); other rows (a host synchronisation checks for
    them) are computed in float64 with a shift near the row maximum, which is exact unless the target lies
    more than ~1,300 nats below it. A -inf target logit gives -inf for the sets of -inf logits, and no NaN.
    """
    vocab = codec.vocab_size
    if logits.dim() != 2 or logits.shape[1] != vocab or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, {vocab}) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}."
        )
    return _SupersetLogSumExp.apply(logits, targets, codec)


def digit_set_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    revealed: torch.Tensor,
    query_sets: torch.Tensor,
    codec: SubTokenCodec,
    carry_over: bool = True,
) -> torch.Tensor:
    """``log p̄_θ(y^U = y0^U | y_t)`` for K digit sets U per row.

    Args:
        logits: ``(N, C)`` unnormalised scores over the real tokens (any float dtype).
        targets: ``(N,)`` clean token ids x0.
        revealed: ``(N, ℓ)`` bool, the digits of x0 visible in y_t.
        query_sets: ``(N, K)`` long bitmasks of digit positions U (bit j <-> digit j).
        carry_over: normalise over V(y_t) (the consistency filter) instead of all C tokens.
    Returns:
        ``(N, K)`` float32 log-probabilities (0 for an empty U).
    """
    sums = superset_logsumexp(logits, targets, codec)
    base = codec.digits_to_bits(revealed) if carry_over else torch.zeros_like(targets)
    return sums.gather(1, base.unsqueeze(1) | query_sets) - sums.gather(1, base.unsqueeze(1))


def diffusion_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    codec: SubTokenCodec,
    carry_over: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token integrands of the two continuous-time objectives.

    Args:
        logits: ``(N, C)``; targets: ``(N,)``; masked: ``(N, ℓ)`` bool, the masked digits of y_t.
    Returns:
        ``(valid, prime)``, each ``(N,)`` float32 in nats:
        ``valid = Σ_{j masked} -log p̄(y^j = y0^j | y_t)`` (valid-bound integrand) and
        ``prime = -log p_θ(x0 | y_t)`` (paper objective integrand; the softmax over V(y_t) with ``carry_over``, over
        all C tokens without; docs/concepts/honest-likelihoods.md says why only the first is a bound). Both are 0
        for a fully revealed token with ``carry_over`` and equal for ℓ = 1.
    """
    if codec.num_sub_tokens == 1:
        # One digit: a masked token's terms are both the cross-entropy; a revealed one is carried over.
        nll = F.cross_entropy(logits.float(), targets, reduction="none") * masked[:, 0]
        return nll, nll
    singles = masked.long() << torch.arange(codec.num_sub_tokens, device=masked.device)  # (N, ℓ)
    # The paper term asks for every digit: x0 itself, normalised over V(y_t) with carry_over (the revealed
    # digits then agree anyway) and over all C tokens without it.
    everything = torch.full_like(targets, (1 << codec.num_sub_tokens) - 1).unsqueeze(1)
    queries = torch.cat([singles, everything], dim=1)  # (N, ℓ + 1)
    log_probs = digit_set_log_probs(logits, targets, ~masked, queries, codec, carry_over)
    return -log_probs[:, :-1].sum(1), -log_probs[:, -1]


def discrete_step_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    reveal: torch.Tensor,
    codec: SubTokenCodec,
    carry_over: bool = True,
) -> torch.Tensor:
    """Discrete-time bound term of one reverse step: ``-log p̄(y^U = y0^U | y_t)`` per token, ``(N,)``,
    where U (``reveal``, ``(N, ℓ)`` bool, a subset of ``masked``) are the digits revealed jointly by the step.
    """
    if (reveal & ~masked).any():
        raise ValueError("reveal must be a subset of the masked digits.")
    log_probs = digit_set_log_probs(
        logits, targets, ~masked, codec.digits_to_bits(reveal).unsqueeze(1), codec, carry_over
    )
    return -log_probs[:, 0]


def discrete_reveal_weights(
    alphas: torch.Tensor,
    counts: torch.Tensor,
    sizes: torch.Tensor,
    num_sub_tokens: int,
    steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights of the discrete-time bound's terms, with the step's reveal set (and, for a time-independent network,
    the step itself) integrated out exactly.

    The T-step bound is ``L_T = Σ_{i=1..T} E_{y_{t_i}} E_U[-log p̄(y0^U | y_{t_i})]`` with t_i = i/T, where the step
    t_i -> t_{i-1} reveals each masked digit independently with probability ``r_i = (α_{i-1} - α_i) / (1 - α_i)``.
    For a token with m masked digits, a reveal set U of its masked digits has probability ``r_i^u (1 - r_i)^(m-u)``
    (u = |U|), so ``E_U`` is a sum over the 2^m subsets (:func:`discrete_expected_step_terms`). A sample draws i
    uniformly, masks every one of the N maskable digits with probability 1 - α_i, and observes k masked digits.
    Given k the masked set is a uniform k-subset whatever i was, and i is distributed as
    ``π(i | k) ∝ (1 - α_i)^k α_i^(N-k)``. So, with the token terms c(U) of a time-independent network,

        ``W[u, m] = T Σ_i π(i | k) r_i^u (1 - r_i)^(m - u)``

    gives the unbiased estimate ``Σ_tokens Σ_{∅ ≠ U ⊆ M} W[u, m] c(U)`` of L_T. A time-conditioned network's terms
    depend on i, so it keeps the sampled step (already a draw from π(i | k)): ``W[u, m] = T r_i^u (1 - r_i)^(m-u)``.
    As T -> ∞ the first form tends to the count estimator's N/k weighting; at T = 1 it is exact.

    Args:
        alphas: ``(T + 1,)`` float64 α(i / T) for i = 0..T (α(0) = 1, α(1) = 0 on the endpoint-exact schedule).
        counts: ``(B,)`` k, masked digits per row; sizes: ``(B,)`` N, maskable digits per row.
        steps: ``(B,)`` sampled steps i in 1..T (time-conditioned networks), or None to integrate i out.
    Returns:
        ``(B, ℓ + 1, ℓ + 1)`` float64 ``W[b, u, m]`` (0 unless 1 <= u <= m <= ℓ).
    """
    alphas = alphas.to(torch.float64)
    num_steps = alphas.numel() - 1
    after, before = alphas[1:], alphas[:-1]  # α_i and α_{i-1}, i = 1..T
    reveal = ((before - after) / (1 - after).clamp_min(torch.finfo(torch.float64).tiny)).clamp(0.0, 1.0)  # (T,)
    counts, sizes = counts.to(torch.float64).unsqueeze(1), sizes.to(torch.float64).unsqueeze(1)
    if steps is None:
        log_joint = torch.xlogy(counts, 1 - after) + torch.xlogy(sizes - counts, after)  # (B, T), up to C(N, k)
        posterior = torch.softmax(log_joint, dim=1)
    else:
        posterior = F.one_hot(steps.long() - 1, num_steps).to(torch.float64)
    ell = num_sub_tokens
    weights = torch.zeros(counts.shape[0], ell + 1, ell + 1, dtype=torch.float64, device=counts.device)
    for m in range(1, ell + 1):
        for u in range(1, m + 1):
            weights[:, u, m] = num_steps * (posterior * reveal.pow(u) * (1 - reveal).pow(m - u)).sum(1)
    return weights


def discrete_expected_step_terms(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    weights: torch.Tensor,
    codec: SubTokenCodec,
    carry_over: bool = True,
) -> torch.Tensor:
    """A discrete-time step's bound terms with its reveal set summed out: ``Σ_{∅ ≠ U ⊆ M_n} W[|U|, |M_n|]
    (-log p̄(y^U = y0^U | y_t))`` per token, ``(N,)`` float64, where M_n are token n's masked digits.

    Args:
        logits: ``(N, C)``; targets: ``(N,)``; masked: ``(N, ℓ)`` bool, the masked digits of y_t.
        weights: ``(N, ℓ + 1, ℓ + 1)`` each token's row of :func:`discrete_reveal_weights`.
    """
    ell = codec.num_sub_tokens
    subsets = torch.arange(1 << ell, device=targets.device)  # every U as a bitmask (bit j <-> digit j)
    sizes = sum((subsets >> j) & 1 for j in range(ell))  # |U|
    masked_bits = codec.digits_to_bits(masked)  # (N,)
    inside = (subsets.unsqueeze(0) & ~masked_bits.unsqueeze(1)) == 0  # U ⊆ M_n; U = ∅ has weight 0 below
    u = sizes.unsqueeze(0).expand(len(targets), -1)
    m = masked.sum(-1, keepdim=True).expand_as(u)
    w = weights.gather(1, u.unsqueeze(-1).expand(-1, -1, ell + 1)).gather(2, m.unsqueeze(-1)).squeeze(-1)
    log_probs = digit_set_log_probs(logits, targets, ~masked, subsets.expand(len(targets), -1), codec, carry_over)
    return -(w * inside * log_probs.double()).sum(1)


# ---------------------------------------------------------------------------------------------------------------
# GenMD4: state-dependent schedules (docs/concepts/genmd4.md), ℓ = 1
# ---------------------------------------------------------------------------------------------------------------


def sample_state_dependent_masks(
    targets: torch.Tensor,
    log_masking_probability: torch.Tensor,
    maskable: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Forward process of a state-dependent schedule: position n is masked with probability ``1 - α_{t, x_n}``.

    Args:
        targets: ``(B, L)`` clean token ids (only their shape and device are used here).
        log_masking_probability: ``(B, L)`` float64 ``log(1 - α_{t, x_n})`` at each row's t.
        maskable: ``(B, L)`` bool; other positions stay clean.
    Returns:
        ``(B, L)`` bool, True where masked.
    """
    u = torch.rand(targets.shape, generator=generator, device=targets.device, dtype=torch.float64)
    return (u < log_masking_probability.detach().exp()) & maskable


def sample_masking_time_corruption(
    targets: torch.Tensor,
    powers: torch.Tensor,
    maskable: torch.Tensor,
    strata: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masking-time estimator of GenMD4's continuous-time NELBO: the count estimator generalised to
    state-dependent schedules.

    Why not the count estimator, nor plain t ~ U(0, 1): under α_{t,i} = 1 - t^{w_i} *which* positions are masked
    depends on their values, so given the number k of masked positions the masked set is not uniform and t | k is
    not a Beta law; and sampling t uniformly weighs each masked position by 1/t, whose second moment diverges
    near t = 0 (about 60 times the count estimator's standard deviation at L = 128, measured).

    Instead: position n is masked at t iff its masking time τ_n <= t, with τ_n = u_n^(1/w_{x_n}) independent
    (P(τ_n <= t) = t^{w_{x_n}}). Draw a maskable position J uniformly from the row's N, set t = τ_J, and mask every
    other position independently with probability t^{w_{x_n}} (J itself is masked). The pair (t, z) then has density

        r(t, z) = (1/N) Σ_{j ∈ z} w_{x_j} t^{w_{x_j} - 1} Π_{n ∈ z, n ≠ j} t^{w_{x_n}} Π_{n ∉ z} (1 - t^{w_{x_n}})
                = q(z | t) · W(z) / (N t),      W(z) = Σ_{j ∈ z} w_{x_j},

    so, for any per-sequence sum S over masked positions,

        ∫_0^1 (1/t) E_{q(z|t)}[S(z, t)] dt = E_r[ (N / W(z)) · S(z, t) ].

    The weight N / W(z) <= N / (|z| · min w) has no 1/t. For equal powers w it is N / (k w), the count estimator's
    N / k (times 1/w, which MD4's polynomial weight w/t restores), and t is then its Beta(k, N - k + 1) time.

    Args:
        targets: ``(B, L)`` clean ids; powers: ``(C,)``; maskable: ``(B, L)`` bool.
        strata: ``(B,)`` in [0, 1): ``J = floor(strata · N)`` and ``τ_J = (1 - frac(strata · N))^(1/w)`` (pass
            low-discrepancy values to stratify both).
    Returns:
        ``t`` ``(B,)`` float64 in (0, 1] (1 for rows with nothing maskable), ``masked`` ``(B, L)`` bool and
        ``W(z)`` ``(B,)`` float64, differentiable in the powers (the weight's denominator).
    """
    w = powers.double()
    total = maskable.sum(1)
    scaled = strata.double() * total
    index = torch.floor(scaled).long().clamp(max=(total - 1).clamp(min=0))
    fraction = (scaled - index).clamp(0.0, 1.0)
    rank = maskable.long().cumsum(1) - 1
    anchor = maskable & (rank == index.unsqueeze(1))  # (B, L): the position J
    w_anchor = (w.detach()[targets] * anchor).sum(1)
    t = torch.where(total > 0, torch.exp(torch.log1p(-fraction) / w_anchor.clamp(min=1e-30)), torch.ones_like(fraction))
    t = t.clamp(min=torch.finfo(torch.float64).tiny, max=1.0)
    u = torch.rand(targets.shape, generator=generator, device=targets.device, dtype=torch.float64)
    masked = ((u < torch.exp(w.detach()[targets] * torch.log(t).unsqueeze(1))) & maskable) | anchor
    return t, masked, (w[targets] * masked).sum(1)


def state_dependent_mask_log_prob(
    masked: torch.Tensor,
    log_masking_probability: torch.Tensor,
    log_alpha: torch.Tensor,
    maskable: torch.Tensor,
) -> torch.Tensor:
    """``log q(z | x0) = Σ_n [log(1 - α_{t,x_n}) if z_n masked else log α_{t,x_n}]`` over maskable positions.

    Args: ``(B, L)`` each (masks bool, log-probabilities float64, differentiable in the powers).
    Returns: ``(B,)`` float64, the score-function term of the REINFORCE gradient.
    """
    terms = torch.where(masked, log_masking_probability, log_alpha)
    return torch.where(maskable, terms, torch.zeros_like(terms)).sum(-1)


def genmd4_integrand(logits: torch.Tensor, targets: torch.Tensor, powers: torch.Tensor) -> torch.Tensor:
    """GenMD4's continuous-time NELBO integrand per masked position, without its 1/t factor (docs/concepts/genmd4.md):

        g = Σ_j w_j μ_j - w_x - w_x log μ_x   (>= 0; = -w log μ_x, MD4's polynomial integrand, if all w_j = w)

    where μ = softmax(logits) is the denoiser's distribution, x the clean token and w the powers. It is the
    continuous-time KL between the reverse jump rates of the forward process, ``(w_x / t) δ_{ix}``, and of the
    model, ``(w_i / t) μ_i``.

    Args:
        logits: ``(N, C)`` scores at masked positions; targets: ``(N,)``; powers: ``(C,)`` (differentiable).
    Returns:
        ``(N,)`` float32.
    """
    log_mu = torch.log_softmax(logits.float(), -1)
    w = powers.float()
    with torch.autocast(logits.device.type, enabled=False):  # autocast would run this product in bf16 / fp16
        expected_power = log_mu.exp() @ w
    w_x = w[targets]
    return expected_power - w_x - w_x * log_mu.gather(1, targets.unsqueeze(1)).squeeze(1)


def genmd4_step_kl(
    log_probs: torch.Tensor, targets: torch.Tensor, powers: torch.Tensor, t: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """Discrete-time GenMD4 bound term of one reverse step t -> s at a masked position (the KL of the
    state-dependent reverse kernels, summed over positions by the caller):

        q: reveals x w.p. r_x, stays masked w.p. 1 - r_x;   p: reveals i w.p. r_i μ_i, stays masked w.p.
        1 - Σ_i r_i μ_i = Σ_i (s/t)^{w_i} μ_i,   with r_i = 1 - (s/t)^{w_i};
        KL = -r_x log μ_x + (1 - r_x) [w_x log(s/t) - log Σ_i μ_i (s/t)^{w_i}]   (second term 0 at s = 0).

    Args:
        log_probs: ``(N, C)`` log μ (normalised); targets: ``(N,)``; powers: ``(C,)``;
        t, s: ``(N,)`` float64 times with 0 <= s < t.
    Returns:
        ``(N,)`` float64 nats.
    """
    log_mu = log_probs.double()
    w = powers.double()
    log_ratio = torch.log(s / t)  # -inf at s = 0
    last = s <= 0
    safe_ratio = torch.where(last, torch.zeros_like(log_ratio), log_ratio).unsqueeze(1)  # (N, 1)
    w_x = w[targets]
    keep_x = torch.exp(w_x * safe_ratio.squeeze(1))  # (s/t)^{w_x} = 1 - r_x
    reveal_x = -torch.expm1(w_x * safe_ratio.squeeze(1))
    log_mu_x = log_mu.gather(1, targets.unsqueeze(1)).squeeze(1)
    log_stay = torch.logsumexp(log_mu + w * safe_ratio, dim=-1)  # log Σ_i μ_i (s/t)^{w_i}
    stay_term = keep_x * (w_x * safe_ratio.squeeze(1) - log_stay)
    return torch.where(last, -log_mu_x, -reveal_x * log_mu_x + stay_term)


def reinforce_leave_one_out(
    loss_1: torch.Tensor, loss_2: torch.Tensor, log_q_1: torch.Tensor, log_q_2: torch.Tensor
) -> torch.Tensor:
    """Two-sample REINFORCE leave-one-out surrogate (docs/concepts/genmd4.md), per sequence:

        ½(L1 + L2) + ½ · stopgrad(L1 - L2) · (log q(z1 | x0) - log q(z2 | x0)).

    Its gradient adds to the pathwise one the score-function term that plain autodiff misses because the masks
    z1, z2 are drawn from q, which depends on the powers (leave-one-out: each mask's baseline is the other's loss).
    The score difference enters minus its own detached value, which changes no gradient but makes the returned
    value exactly the NELBO estimate ½(L1 + L2), so a logged loss means the same as the logged bound.
    All inputs and the output ``(B,)``.
    """
    score = log_q_1 - log_q_2
    return 0.5 * (loss_1 + loss_2) + 0.5 * (loss_1 - loss_2).detach() * (score - score.detach())


__all__ = [
    "discrete_expected_step_terms",
    "discrete_reveal_weights",
    "diffusion_terms",
    "genmd4_integrand",
    "genmd4_step_kl",
    "reinforce_leave_one_out",
    "sample_masking_time_corruption",
    "sample_state_dependent_masks",
    "state_dependent_mask_log_prob",
    "digit_set_log_probs",
    "discrete_step_terms",
    "sample_mask_counts",
    "sample_masks",
    "superset_logsumexp",
]
