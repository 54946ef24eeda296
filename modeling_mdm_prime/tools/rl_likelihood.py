"""Sequence log-likelihood estimators for reinforcement learning: ``log π(completion | prompt)`` of a masked
diffusion model, differentiable, behind one interface, and the exact value they estimate (by enumeration) to
check them against. Not shipped as remote code.

Policy-gradient methods for diffusion LMs (d1 / diffu-GRPO, coupled-GRPO, SPG, wd1, VRPO) need a log-likelihood
that the model cannot compute exactly; each uses an estimator. Here (docs/guides/rl.md):

* ``elbo``: the count estimator of ``nll_bound`` with the prompt clean: k of the N completion digits masked,
  k ~ U{1..N}, weight N/k; one network call per sample. Unbiased for the ELBO, a lower bound on log π.
* ``coupled``: a uniform k-subset M of the digits and its complement (k ~ U{1..N-1}), weights N/k and N/(N-k), plus
  the fully masked term once: coupled-GRPO's complementary masks, made unbiased for the same ELBO (every digit is
  scored once per pair); two calls per sample and one shared.
* ``one_pass``: d1's estimate, every completion token scored once with the whole completion masked,
  ``Σ_i log p_θ(x_i | prompt)``; one call, no randomness. Biased and not a bound (``lower_bound=False``).
* ``upper``: an upper bound. With a time-independent network the model's likelihood is an average over reveal
  orders σ of the N completion digits (the continuous-time sampler reveals one digit at a time, uniformly):
  ``π(x) = E_σ[w_σ]``, ``w_σ = Π_k p̄(x^{σ_k} | prompt, digits σ_<k revealed)``, and the ELBO is ``E_σ[log w_σ]``.
  The tangent of the logarithm gives ``log π ≤ log ψ + π/ψ - 1`` for any ψ > 0 (TUBE, Ivanov et al. 2026), whose
  right side has an unbiased estimate; ψ is the geometric mean of the *other* samples' ``w`` (leave one out), so
  each sample's term estimates an upper bound without bias. N network calls per sample, K >= 2.

The ELBO here is the valid bound of docs/concepts/honest-likelihoods.md conditioned on a clean prompt:
``ELBO = -(1/N) Σ_{k=1}^{N} E_{|M|=k}[(N/k) Σ_{i ∈ M} ℓ_i(M)]``, with ``ℓ_i`` the digit terms of
``losses_mdm_prime.diffusion_terms``. :func:`exact_elbo` computes it by enumerating every mask (small N only).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..losses_mdm_prime import diffusion_terms, digit_set_log_probs

ESTIMATORS = ("elbo", "coupled", "one_pass", "upper")
MAX_ENUMERATED_DIGITS = 16


@dataclass
class LikelihoodEstimate:
    """``log_likelihood`` ``(B,)`` the mean of the ``samples`` ``(B, K)`` (differentiable), ``stderr`` ``(B,)``
    (NaN for one sample), ``nfe`` the network calls made, ``lower_bound`` whether the estimated quantity is a
    lower bound on ``log π(completion | prompt)`` (the ELBO) rather than a biased surrogate."""

    log_likelihood: torch.Tensor
    samples: torch.Tensor
    stderr: torch.Tensor
    nfe: int
    lower_bound: bool


@dataclass
class _Batch:
    ids: torch.Tensor  # (B, L) prompt then completion, padding replaced by a valid id
    real: torch.Tensor  # (B, L) bool
    scored: torch.Tensor  # (B, L) bool, the completion's real tokens
    attention_mask: torch.Tensor | None

    def row(self, b: int) -> _Batch:
        """Row b alone, as a batch of one."""
        mask = None if self.attention_mask is None else self.attention_mask[b : b + 1]
        return _Batch(self.ids[b : b + 1], self.real[b : b + 1], self.scored[b : b + 1], mask)


def _check_padding(mask: torch.Tensor, side: str, name: str) -> None:
    """Left padding: zeros then ones in every row; right padding: ones then zeros."""
    mask = mask.long()
    ordered = mask.cummax(1).values if side == "left" else mask.flip(1).cummax(1).values.flip(1)
    if not torch.equal(ordered, mask):
        row = int((ordered != mask).any(1).nonzero()[0])
        raise ValueError(
            f"{name} row {row} is not {side}-padded: prompts must be left-padded and completions right-padded, so "
            "that prompt and completion meet in the middle of the canvas."
        )


def prepare_batch(model, prompt_ids, completion_ids, prompt_attention_mask=None, completion_mask=None) -> _Batch:
    """Validate and join ``prompt_ids`` ``(B, P)`` (left-padded) and ``completion_ids`` ``(B, A)`` (right-padded)
    into one canvas; the completion's real tokens are the scored ones."""
    if getattr(model, "state_dependent", False):
        raise ValueError(
            "GenMD4 models (noise_schedule='learnable_polynomial') have no conditional bound with a clean prompt "
            "(their masking-time estimator scores whole sequences), so none of these estimators applies to them."
        )
    if prompt_ids.dim() != 2 or completion_ids.dim() != 2 or prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(
            f"prompt_ids (B, P) and completion_ids (B, A) with the same B, got {tuple(prompt_ids.shape)} and "
            f"{tuple(completion_ids.shape)}."
        )
    prompt_real = (
        torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_attention_mask is None else prompt_attention_mask.bool()
    )
    done = torch.ones_like(completion_ids, dtype=torch.bool) if completion_mask is None else completion_mask.bool()
    _check_padding(prompt_real, "left", "prompt_attention_mask")
    _check_padding(done, "right", "completion_mask")
    if not bool(done.any(1).all()):
        raise ValueError("every row needs at least one completion token to score.")
    length = prompt_ids.shape[1] + completion_ids.shape[1]
    if length > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt plus completion is {length} positions, more than the model's canvas "
            f"(max_position_embeddings={model.config.max_position_embeddings}); shorten the completion or the prompt."
        )
    ids = torch.cat([prompt_ids, completion_ids], 1).to(model.device)
    real = torch.cat([prompt_real, done], 1).to(model.device)
    model.codec.check_ids(ids[real])
    scored = torch.cat([torch.zeros_like(prompt_real), done], 1).to(model.device)
    ids = ids.masked_fill(~real, 0)
    return _Batch(ids, real, scored, None if bool(real.all()) else real.long())


def _terms(model, clean, masked, batch: _Batch) -> torch.Tensor:
    """``(B,)`` Σ over positions of the valid-bound digit terms ``ℓ_i`` for the given ``masked`` digits."""
    codec = model.codec
    rows = masked.any(-1)
    out = torch.zeros(clean.shape[0], dtype=torch.float64, device=clean.device)
    if not bool(rows.any()):
        return out
    # Time-independent networks only ('coupled' and exact_elbo refuse the others): no noise level to tell.
    logits = model.token_logits(clean.masked_fill(masked, codec.mask_id), batch.attention_mask, None, rows,
                                check_inputs=False)  # fmt: skip
    valid, _ = diffusion_terms(logits, batch.ids[rows], masked[rows], codec, model.config.carry_over)
    row_of = torch.arange(clean.shape[0], device=clean.device).unsqueeze(1).expand_as(rows)[rows]
    return out.index_add(0, row_of, valid.double())


def _one_pass(model, clean, batch: _Batch) -> torch.Tensor:
    """``(B,)`` d1's ``Σ_i log p_θ(x_i | prompt, completion masked)`` (token-level, the paper objective's term)."""
    masked = batch.scored.unsqueeze(-1).expand_as(clean)
    logits = model.token_logits(clean.masked_fill(masked, model.codec.mask_id), batch.attention_mask,
                                _noise_level(model, clean.shape[0], 1.0, clean.device), batch.scored,
                                check_inputs=False)  # fmt: skip
    _, prime = diffusion_terms(
        logits, batch.ids[batch.scored], masked[batch.scored], model.codec, model.config.carry_over
    )
    row_of = torch.arange(clean.shape[0], device=clean.device).unsqueeze(1).expand_as(batch.scored)[batch.scored]
    return -torch.zeros(clean.shape[0], dtype=torch.float64, device=clean.device).index_add(0, row_of, prime.double())


def completion_entropy(
    model, prompt_ids, completion_ids, prompt_attention_mask=None, completion_mask=None
) -> torch.Tensor:
    """``(B, A)`` entropy in nats of the one-pass predictive distribution ``p_θ(x_i | prompt, completion masked)`` at
    each completion token (0 on padding): how undecided the policy is, for logging (TRL reports entropies)."""
    batch = prepare_batch(model, prompt_ids, completion_ids, prompt_attention_mask, completion_mask)
    clean = model.codec.encode(batch.ids, check=False)
    masked = clean.masked_fill(batch.scored.unsqueeze(-1), model.codec.mask_id)
    noise = _noise_level(model, clean.shape[0], 1.0, clean.device)
    logits = model.token_logits(masked, batch.attention_mask, noise, batch.scored, check_inputs=False)
    logp = torch.log_softmax(logits.double(), -1)
    entropy = torch.zeros(batch.scored.shape, dtype=torch.float64, device=clean.device)
    entropy[batch.scored] = -(logp.exp() * logp).sum(-1)
    return entropy[:, prompt_ids.shape[1] :]


def _path_terms(model, clean, batch: _Batch, revealed: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``(R,)`` ``log p̄(x^j | state)`` for R states: ``revealed`` ``(R, L, ℓ)`` bool digits visible besides the
    prompt, ``query`` ``(R, 3)`` long (batch row, position, digit j) of the digit scored. One network call."""
    codec = model.codec
    rows, position, digit = query.unbind(1)
    state = clean[rows].masked_fill(batch.scored[rows].unsqueeze(-1) & ~revealed, codec.mask_id)
    at = torch.zeros(state.shape[:2], dtype=torch.bool, device=clean.device)
    at[torch.arange(len(rows), device=clean.device), position] = True
    mask = None if batch.attention_mask is None else batch.attention_mask[rows]
    logits = model.token_logits(state, mask, None, at, check_inputs=False)
    own = revealed[torch.arange(len(rows), device=clean.device), position]  # the position's visible digits
    bits = (1 << digit).unsqueeze(1)
    return digit_set_log_probs(logits, batch.ids[rows, position], own, bits, codec, True)[:, 0].double()


def _check_order_model(model, name: str) -> None:
    if model.config.time_conditioning:
        raise ValueError(f"{name} averages reveal orders of a time-independent network; this one is time-conditioned.")
    if model.codec.num_sub_tokens > 1 and not model.config.carry_over:
        raise ValueError(f"{name} needs carry_over=True (the sampler's digit conditionals) for ℓ > 1.")


def _order_log_weights(model, clean, batch: _Batch, num_samples: int, generator) -> torch.Tensor:
    """``(B, K)`` ``log w_σ`` for K uniformly random reveal orders σ of each row's completion digits (one network
    call for all B · K · N states)."""
    generators = generator if isinstance(generator, (list, tuple)) else [generator] * clean.shape[0]
    revealed, queries, owner = [], [], []
    for b, g in enumerate(generators):
        places = batch.scored[b].unsqueeze(-1).expand_as(clean[b]).nonzero()  # (N, 2): position, digit
        for k in range(num_samples):
            order = places[torch.randperm(len(places), generator=g).to(places.device)]
            seen = torch.zeros(len(order), *clean.shape[1:], dtype=torch.bool, device=clean.device)
            for step in range(1, len(order)):  # state of step i: the first i digits of the order revealed
                seen[step] = seen[step - 1]
                seen[step, order[step - 1, 0], order[step - 1, 1]] = True
            revealed.append(seen)
            queries.append(torch.cat([torch.full_like(order[:, :1], b), order], 1))
            owner.append(torch.full((len(order),), b * num_samples + k, device=clean.device))
    terms = _path_terms(model, clean, batch, torch.cat(revealed), torch.cat(queries))
    out = torch.zeros(clean.shape[0] * num_samples, dtype=torch.float64, device=clean.device)
    return out.index_add(0, torch.cat(owner), terms).view(clean.shape[0], num_samples)


def _noise_level(model, batch: int, value: float, device) -> torch.Tensor | None:
    return torch.full((batch,), value, device=device) if model.config.time_conditioning else None


def _uniforms(size: int, generator, device) -> torch.Tensor:
    """``(B,)`` uniforms, from one generator or one per row (``generator`` a list)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator]).to(device)
    return torch.rand(size, generator=generator, device=device)


def _random_subsets(scored_digits: torch.Tensor, counts: torch.Tensor, generator) -> torch.Tensor:
    """``(B, L, ℓ)`` bool: per row a uniform subset of ``counts[b]`` of the row's ``scored_digits``. With one
    generator per row, row b draws over its own scored digits only, so the subset does not depend on padding or
    on the other rows."""
    if isinstance(generator, (list, tuple)):
        keys = torch.full(scored_digits.shape, 2.0, device=scored_digits.device)
        for b, g in enumerate(generator):
            place = scored_digits[b]
            keys[b][place] = torch.rand(int(place.sum()), generator=g, device=g.device).to(keys.device)
    else:
        keys = torch.rand(scored_digits.shape, generator=generator, device=scored_digits.device)
    keys = keys.masked_fill(~scored_digits, 2.0)  # never chosen
    rank = keys.flatten(1).argsort(1).argsort(1).view_as(keys)
    return (rank < counts.view(-1, 1, 1)) & scored_digits


def sequence_log_likelihood(
    model,
    prompt_ids: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    prompt_attention_mask: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    estimator: str = "elbo",
    num_samples: int = 4,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> LikelihoodEstimate:
    """Estimate ``log π(completion | prompt)`` per row, differentiably (gradients flow into the model).

    Args:
        prompt_ids: ``(B, P)``, left-padded (``prompt_attention_mask``); completion_ids: ``(B, A)``, right-padded
            (``completion_mask``: 1 for the completion's tokens, including a final EOS if it is part of it).
        estimator: ``"elbo"``, ``"coupled"`` or ``"one_pass"`` (module docstring).
        num_samples: Monte-Carlo samples K per row (``one_pass`` is deterministic and takes 1).
        generator: one generator, or one per row: row b then draws its masks from ``generator[b]`` over its own
            completion only, so its estimate is the same in any batch, padding or process (``tools.grpo`` seeds
            them from each sequence's content, so a sequence is scored with the same masks before and after an
            update).
    Returns:
        :class:`LikelihoodEstimate`. The model's mode (train / eval) is left as it is: RL computes ratios with
        and without dropout as its recipe says.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    if isinstance(generator, (list, tuple)) and len(generator) != prompt_ids.shape[0]:
        raise ValueError(f"generator: one per row expected ({prompt_ids.shape[0]}), got {len(generator)}.")
    batch = prepare_batch(model, prompt_ids, completion_ids, prompt_attention_mask, completion_mask)
    clean = model.codec.encode(batch.ids, check=False)
    size = clean.shape[0]
    if estimator == "one_pass":
        value = _one_pass(model, clean, batch)
        samples = value.unsqueeze(1)
        return LikelihoodEstimate(value, samples, torch.full_like(value, float("nan")), 1, False)
    if estimator == "upper":
        _check_order_model(model, "estimator 'upper'")
        if num_samples < 2:
            raise ValueError("estimator 'upper' needs num_samples >= 2 (each sample's ψ comes from the others).")
        log_w = _order_log_weights(model, clean, batch, num_samples, generator)
        # ψ_k: geometric mean of the other samples' w, held fixed (the bound holds for any ψ > 0).
        log_psi = ((log_w.sum(1, keepdim=True) - log_w) / (num_samples - 1)).detach()
        samples = log_psi + torch.exp(log_w - log_psi) - 1
        nfe = int(batch.scored.sum(1).max()) * model.codec.num_sub_tokens * num_samples
        return _estimate(samples, nfe, False)
    if estimator == "elbo":
        samples = -model.estimator.bound_samples(
            model.token_logits, batch.ids, batch.scored, batch.real, batch.attention_mask, num_samples, None, generator
        ).nll
        return _estimate(samples, num_samples, True)
    if model.config.time_conditioning:
        raise ValueError(
            "estimator 'coupled' needs a time-independent network; this model is time-conditioned (its noise level "
            "would have to be drawn per mask as the 'elbo' estimator does). Use estimator='elbo'."
        )
    digits = batch.scored.unsqueeze(-1).expand_as(clean)
    total = digits.sum((1, 2))  # N per row
    everything = _terms(model, clean, digits, batch)  # f(N): the fully masked completion, once
    columns = []
    for _ in range(num_samples):
        # k ~ U{1..N-1}: M and its complement are both uniform subsets with sizes uniform on 1..N-1.
        u = _uniforms(size, generator, clean.device)
        k = 1 + torch.floor(u * (total - 1).clamp(min=1)).long()
        first = _random_subsets(digits, k, generator)
        second = digits & ~first
        pair = (
            _terms(model, clean, first, batch) * total / k
            + _terms(model, clean, second, batch) * total / (total - k).clamp(min=1)
        ) / 2
        # E[pair] = (1/(N-1)) Σ_{k<N} f(k); adding f(N)/N gives the count estimator's (1/N) Σ_{k≤N} f(k).
        bound = torch.where(total > 1, (total - 1) / total * pair + everything / total, everything)
        columns.append(-bound)
    return _estimate(torch.stack(columns, 1), 2 * num_samples + 1, True)


def _estimate(samples: torch.Tensor, nfe: int, lower_bound: bool) -> LikelihoodEstimate:
    k = samples.shape[1]
    stderr = samples.detach().std(1) / math.sqrt(k) if k > 1 else torch.full_like(samples[:, 0], float("nan"))
    return LikelihoodEstimate(samples.mean(1), samples, stderr, nfe, lower_bound)


def _enumerable_rows(model, name: str, prompt_ids, completion_ids, prompt_attention_mask, completion_mask):
    """Per row: its clean digits ``(1, L, ℓ)``, the row as a batch of one, and the ``(N, 2)`` (position, digit)
    places of its completion digits. Refuses N over ``MAX_ENUMERATED_DIGITS``: the callers enumerate 2^N sets."""
    batch = prepare_batch(model, prompt_ids, completion_ids, prompt_attention_mask, completion_mask)
    clean = model.codec.encode(batch.ids, check=False)
    for b in range(clean.shape[0]):
        places = batch.scored[b].unsqueeze(-1).expand_as(clean[b]).nonzero()
        if len(places) > MAX_ENUMERATED_DIGITS:
            raise ValueError(f"{name} enumerates 2^N sets of completion digits; row {b} has N = {len(places)}, over "
                             f"{MAX_ENUMERATED_DIGITS}.")  # fmt: skip
        yield clean[b : b + 1], batch.row(b), places


def exact_elbo(
    model,
    prompt_ids: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    prompt_attention_mask: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B,)`` the ELBO of ``log π(completion | prompt)`` exactly, by enumerating every mask of the N completion
    digits (N ≤ 16), differentiable: the value and gradient that the unbiased estimators estimate.
    Time-independent networks only (a time-conditioned one would need the integral over t too)."""
    if model.config.time_conditioning:
        raise ValueError("exact_elbo enumerates masks of a time-independent network; this one is time-conditioned.")
    out = []
    for clean, row, places in _enumerable_rows(
        model, "exact_elbo", prompt_ids, completion_ids, prompt_attention_mask, completion_mask
    ):
        n = len(places)
        total = torch.zeros((), dtype=torch.float64, device=clean.device)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            masks = torch.zeros(len(subsets), *clean.shape[1:], dtype=torch.bool, device=clean.device)
            for s, subset in enumerate(subsets):
                chosen = places[list(subset)]
                masks[s, chosen[:, 0], chosen[:, 1]] = True
            mask = None if row.attention_mask is None else row.attention_mask.expand(len(subsets), -1)
            many = _Batch(row.ids.expand(len(subsets), -1), row.real.expand(len(subsets), -1),
                          row.scored.expand(len(subsets), -1), mask)  # fmt: skip
            terms = _terms(model, clean.expand(len(subsets), -1, -1), masks, many)
            total = total + terms.mean() / k  # (1/N) · (N/k) · E_{|M|=k}[Σ_{i∈M} ℓ_i]
        out.append(-total)
    return torch.stack(out)


def exact_log_likelihood(
    model,
    prompt_ids: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    prompt_attention_mask: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B,)`` ``log π(completion | prompt)`` of a time-independent network exactly: the average over every reveal
    order of the N completion digits (N ≤ 16), by dynamic programming over the revealed sets R:
    ``f(R) = 1/(N - |R|) Σ_{i ∉ R} p̄(x^i | R) f(R ∪ {i})``, ``f(all) = 1``, ``π = f(∅)``. Differentiable.
    The ELBO (:func:`exact_elbo`) is ``E_σ[log w_σ]`` of the same orders, so ``exact_elbo <= exact_log_likelihood``."""
    _check_order_model(model, "exact_log_likelihood")
    out = []
    for clean, row, places in _enumerable_rows(
        model, "exact_log_likelihood", prompt_ids, completion_ids, prompt_attention_mask, completion_mask
    ):
        n = len(places)
        subsets = torch.arange(1 << n, device=clean.device)
        member = (subsets.unsqueeze(1) >> torch.arange(n, device=clean.device)) & 1  # (2^N, N)
        # Every (R, i ∉ R): the state with R revealed, digit i scored.
        pairs = (member == 0).nonzero()  # (M, 2): subset, digit
        revealed = torch.zeros(len(pairs), *clean.shape[1:], dtype=torch.bool, device=clean.device)
        chosen = member[pairs[:, 0]].bool()  # (M, N)
        index = chosen.nonzero()
        revealed[index[:, 0], places[index[:, 1], 0], places[index[:, 1], 1]] = True
        queries = torch.cat([torch.zeros_like(pairs[:, :1]), places[pairs[:, 1]]], 1)
        terms = _path_terms(model, clean, row, revealed, queries)
        log_f = [None] * (1 << n)
        log_f[(1 << n) - 1] = torch.zeros((), dtype=torch.float64, device=clean.device)
        by_subset: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for (subset, digit), term in zip(pairs.tolist(), terms, strict=True):
            by_subset.setdefault(subset, []).append((digit, term))
        for subset in sorted(by_subset, key=lambda r: -bin(r).count("1")):  # largest revealed sets first
            options = torch.stack([term + log_f[subset | (1 << digit)] for digit, term in by_subset[subset]])
            log_f[subset] = torch.logsumexp(options, 0) - math.log(len(options))
        out.append(log_f[0])
    return torch.stack(out)


def oracle_logits(codec, sequences: torch.Tensor, probs: torch.Tensor, sub_ids: torch.Tensor, positions=None):
    """A network that knows the data: the exact conditionals ``log q(x_i | y_t)`` of the distribution ``probs``
    (unnormalised is fine) over ``sequences`` ``(S, L)``, given partially masked digits ``sub_ids`` ``(B, L, ℓ)``;
    ``(B, L, C)``, or ``(N, C)`` at ``positions``. Its ELBO is tight: the estimators' target becomes log q itself.
    """
    allowed = codec.consistency_mask(sub_ids).double()  # (B, L, C)
    batch, length, vocab = allowed.shape
    weight = probs.double().expand(batch, -1).clone()  # (B, S)
    for i in range(length):
        weight *= allowed[:, i].index_select(1, sequences[:, i])
    marginals = torch.zeros(batch, length, vocab, dtype=torch.float64, device=sub_ids.device)
    for i in range(length):
        marginals[:, i].index_add_(1, sequences[:, i], weight)
    logits = marginals.log().float()
    return logits if positions is None else logits[positions]
