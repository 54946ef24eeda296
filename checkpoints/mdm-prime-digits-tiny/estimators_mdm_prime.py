"""Monte-Carlo estimators of the training objective and of the valid likelihood bound.

They sit between the math (``losses_mdm_prime``: mask sampling and per-token terms) and the models: an estimator
draws the forward process, asks a *denoiser* for token scores at the masked positions, and combines them. The
models' ``forward`` and ``nll_bound`` validate their inputs and delegate here; so do the image model (bits per
dimension) and the lm-eval adapter (through ``nll_bound(scored_mask=...)``). There is one estimator per kind of
forward process, chosen by the model from its config (:func:`estimator_for`):

* :class:`SubTokenEstimator`: MDM-Prime (ℓ > 1) and MD4 / MDLM (ℓ = 1) on a fixed schedule α(t): every sub-token is
  masked independently (docs/concepts/honest-likelihoods.md);
* :class:`StateDependentEstimator`: GenMD4 (``noise_schedule="learnable_polynomial"``, ℓ = 1), whose masking
  probability depends on the token value (docs/concepts/genmd4.md).

A denoiser is any callable with the signature of the models' ``token_logits``::

    denoiser(sub_ids (B, L, ℓ), attention_mask (B, L) | None, noise_level (B,) | None, positions (B, L) | None,
             check_inputs=bool, **network_kwargs) -> (N, C) logits at ``positions`` (row-major)

so the estimators can be checked against exact likelihoods with an oracle in place of a network. Plain torch: no
I/O, and no model other than the denoiser they are handed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .codec_mdm_prime import SubTokenCodec
from .losses_mdm_prime import (
    diffusion_terms,
    discrete_expected_step_terms,
    discrete_reveal_weights,
    genmd4_integrand,
    genmd4_step_kl,
    reinforce_leave_one_out,
    sample_mask_counts,
    sample_masking_time_corruption,
    sample_masks,
    sample_state_dependent_masks,
    state_dependent_mask_log_prob,
)
from .schedules_mdm_prime import NoiseSchedule, StateDependentPolynomialSchedule, sample_times

Denoiser = Callable[..., torch.Tensor]


@dataclass
class Corruption:
    """One draw of the forward process: ``masked`` ``(B, L, ℓ)``, the per-sequence ``weight`` ``(B,)`` of the
    continuous-time estimators, α and t ``(B,)`` (None for the count estimator), and the discrete-time
    ``step`` i in 1..T ``(B,)``."""

    masked: torch.Tensor
    weight: torch.Tensor | None
    alpha: torch.Tensor | None
    t: torch.Tensor | None
    step: torch.Tensor | None = None


@dataclass
class ObjectiveTerms:
    """What one training draw gives, per scored token: ``loss`` (differentiable), the valid bound ``elbo`` and the
    paper objective (detached), the ``(B,)`` times (None when drawn by count), the scored token count, and for
    GenMD4 the learned powers ``w`` ``(C,)`` (detached)."""

    loss: torch.Tensor
    elbo: torch.Tensor
    paper_objective: torch.Tensor
    timesteps: torch.Tensor | None
    num_tokens: torch.Tensor
    powers: torch.Tensor | None = None


@dataclass
class BoundSamples:
    """``(B, K)`` float64 Monte-Carlo samples of the valid bound, and of the paper objective where it is estimated
    from the same draws (None otherwise)."""

    nll: torch.Tensor
    paper_objective: torch.Tensor | None


def mean_and_stderr(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, K)`` Monte-Carlo samples -> their ``(B,)`` means and standard errors (NaN for K = 1)."""
    num_samples = samples.shape[1]
    if num_samples > 1:
        return samples.mean(1), samples.std(1) / math.sqrt(num_samples)
    return samples.mean(1), torch.full_like(samples[:, 0], float("nan"))


def stratified_uniforms(
    batch: int, num_samples: int, generator: torch.Generator | Sequence[torch.Generator] | None, device
) -> torch.Tensor:
    """``(B, K)`` float64 strata ``(u_b + k/K) mod 1``: one uniform per row (from the row's own generator when
    ``generator`` is a sequence), spread evenly over the K samples."""
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, 1, generator=g, device=g.device, dtype=torch.float64) for g in generator])
        u = u.to(device)
    else:
        u = torch.rand(batch, 1, generator=generator, device=device, dtype=torch.float64)
    return torch.remainder(u + torch.arange(num_samples, device=device) / num_samples, 1.0)


class SubTokenEstimator:
    """MDM-Prime / MD4 on a fixed schedule: sub-tokens masked independently with probability 1 - α(t).

    Args:
        codec: the model's sub-token codec (ℓ digits of base b per token).
        schedule: the training schedule (``nll_bound`` uses its endpoint-exact version, ``schedule.exact()``).
        time_conditioning: whether the network is told the noise level 1 - α.
        carry_over: whether the network's distribution is restricted to the tokens consistent with the revealed
            digits (the paper's carry-over / consistency filter).
    """

    def __init__(self, codec: SubTokenCodec, schedule: NoiseSchedule, time_conditioning: bool, carry_over: bool):
        self.codec, self.schedule = codec, schedule
        self.time_conditioning, self.carry_over = time_conditioning, carry_over

    def noise_level(self, alpha: torch.Tensor | None) -> torch.Tensor | None:
        """What a time-conditioned network is told: ``1 - α`` (None for time-independent networks)."""
        return (1.0 - alpha) if self.time_conditioning and alpha is not None else None

    def corrupt(
        self,
        clean: torch.Tensor,
        maskable: torch.Tensor,
        strata: torch.Tensor,
        schedule: NoiseSchedule,
        generator: torch.Generator | None,
        *,
        timesteps: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> Corruption:
        """The forward process for one Monte-Carlo sample per sequence, shared by training and the bound.

        Args:
            clean: ``(B, L, ℓ)`` clean digits; maskable: ``(B, L)`` positions that may be masked.
            strata: ``(B,)`` low-discrepancy numbers in [0, 1) that place each sequence's sample.
            timesteps: explicit ``(B,)`` times (continuous time).
            num_steps: T for the discrete-time bound.
        Three estimators of the same bound (docs/concepts/honest-likelihoods.md):

        * count (continuous time, the default): k = 1 + floor(strata · N) of the N maskable elements, a
          uniform k-subset, weight N/k; a time-conditioned network is told the noise level
          t ~ Beta(k, N - k + 1) (:func:`sample_mask_counts`). Unbiased, weights bounded by N;
        * continuous time at given ``timesteps``: mask with probability 1 - α_t, weight ``w(t) = -α'/(1 - α)``;
        * discrete time: step i = 1 + floor(strata · T), t = i/T, s = (i-1)/T, mask with probability 1 - α_t;
          the caller sums the step's reveal set out (:func:`discrete_reveal_weights`).
        """
        if timesteps is None and num_steps is None:
            masked, weight, level = sample_mask_counts(
                maskable, self.codec.num_sub_tokens, strata, generator, return_level=True
            )
            # A time-conditioned network is told the masking probability t ~ Beta(k, N - k + 1) (see
            # sample_mask_counts); a time-independent one needs no t at all.
            alpha = 1.0 - level if self.time_conditioning else None
            return Corruption(masked, weight.double(), alpha, None)
        if num_steps is not None:
            step = torch.floor(strata.double() * num_steps) + 1
            t = step / num_steps
            alpha = schedule.alpha(t)
            return Corruption(sample_masks(clean.shape, alpha, maskable, generator), None, alpha, t, step.long())
        t = timesteps
        alpha = schedule.alpha(t)
        return Corruption(sample_masks(clean.shape, alpha, maskable, generator), schedule.weight(t).double(), alpha, t)

    def corrupt_rows(
        self,
        clean: torch.Tensor,
        maskable: torch.Tensor,
        real: torch.Tensor,
        strata: torch.Tensor,
        schedule: NoiseSchedule,
        generators: Sequence[torch.Generator],
        num_steps: int | None,
    ) -> Corruption:
        """:meth:`corrupt` with one generator per row, each drawing over its own row's real tokens only (so the
        draws of a row do not depend on the other rows, the padding or the batch width)."""
        masked = torch.zeros_like(clean, dtype=torch.bool)
        rows = []
        for b, g in enumerate(generators):
            keep = real[b]
            row = self.corrupt(
                clean[b : b + 1, keep].to(g.device),
                maskable[b : b + 1, keep].to(g.device),
                strata[b : b + 1].to(g.device),
                schedule,
                g,
                num_steps=num_steps,
            )
            masked[b, keep] = row.masked[0].to(clean.device)
            rows.append(row)

        def gather(name: str) -> torch.Tensor | None:
            values = [getattr(row, name) for row in rows]
            return None if values[0] is None else torch.cat(values).to(clean.device)

        return Corruption(masked, gather("weight"), gather("alpha"), gather("t"), gather("step"))

    def objective(
        self,
        denoiser: Denoiser,
        ids: torch.Tensor,
        scored: torch.Tensor,
        attention_mask: torch.Tensor | None,
        timesteps: torch.Tensor | None,
        generator: torch.Generator | None,
        loss_type: str,
        **network_kwargs,
    ) -> ObjectiveTerms:
        """One draw per sequence of ``weight · Σ_tokens (per-token term)``, per scored token, where the per-token
        term is the valid bound's ``Σ_{j masked} -log p̄(y0^j | y_t)`` or the paper's ``-log p_θ(x0 | y_t)``
        (``loss_type`` "elbo" or the paper objective); masks by count, or at the given ``timesteps`` ``(B,)``.

        Args:
            ids: ``(B, L)`` clean token ids (padding replaced by any valid id); scored: ``(B, L)`` bool, the
                positions that may be masked and are scored.
        """
        batch = ids.shape[0]
        clean = self.codec.encode(ids, check=False)
        strata = 1.0 - sample_times(batch, generator=generator, device=ids.device, dtype=torch.float64)
        noise = self.corrupt(clean, scored, strata, self.schedule, generator, timesteps=timesteps)
        masked, seq_weight = noise.masked, noise.weight.float()
        rows = masked.any(-1)
        logits = denoiser(
            clean.masked_fill(masked, self.codec.mask_id),
            attention_mask,
            self.noise_level(noise.alpha),
            rows,
            **network_kwargs,
        )
        valid, prime = diffusion_terms(logits, ids[rows], masked[rows], self.codec, self.carry_over)
        weight = seq_weight.unsqueeze(1).expand_as(rows)[rows]
        num_tokens = scored.sum()
        denom = num_tokens.clamp(min=1)
        elbo = (weight * valid).sum() / denom
        paper_objective = (weight * prime).sum() / denom
        return ObjectiveTerms(
            loss=elbo if loss_type == "elbo" else paper_objective,
            elbo=elbo.detach(),
            paper_objective=paper_objective.detach(),
            timesteps=None if noise.t is None else noise.t.float(),
            num_tokens=num_tokens,
        )

    def bound_samples(
        self,
        denoiser: Denoiser,
        ids: torch.Tensor,
        scored: torch.Tensor,
        real: torch.Tensor,
        attention_mask: torch.Tensor | None,
        num_samples: int,
        num_steps: int | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        **network_kwargs,
    ) -> BoundSamples:
        """``num_samples`` draws per sequence of the valid NELBO (an upper bound on ``-log p_θ(x_scored |
        x_context)``, nats per sequence), on the endpoint-exact schedule.

        Continuous time (``num_steps=None``): the count estimator, ``w Σ_i Σ_{j masked} -log p̄(y0^{i,j} | y_t)``,
        with the paper objective from the same draws. Discrete time with T steps (t_i = i/T): the step drawn
        (stratified), the reveal set U summed out exactly and, for a time-independent network, the step given
        how many digits are masked too (:func:`discrete_reveal_weights`). Draws are stratified over the K samples
        (:func:`stratified_uniforms`); with one generator per row each row draws over its own real tokens only.

        Args:
            scored: ``(B, L)`` bool, the positions that are masked and scored; the other ``real`` ``(B, L)``
                positions stay clean as context.
        """
        batch, device = ids.shape[0], ids.device
        schedule = self.schedule.exact()
        clean = self.codec.encode(ids, check=False)
        row_generators = isinstance(generator, (list, tuple))
        strata = stratified_uniforms(batch, num_samples, generator, device)
        if num_steps is not None:
            alphas = schedule.alpha(torch.arange(num_steps + 1, device=device, dtype=torch.float64) / num_steps)
        valid_samples = torch.zeros(batch, num_samples, dtype=torch.float64, device=device)
        prime_samples = torch.zeros_like(valid_samples)
        for k in range(num_samples):
            if row_generators:
                noise = self.corrupt_rows(clean, scored, real, strata[:, k], schedule, generator, num_steps)
            else:
                noise = self.corrupt(clean, scored, strata[:, k], schedule, generator, num_steps=num_steps)
            masked = noise.masked
            rows = masked.any(-1)
            logits = denoiser(
                clean.masked_fill(masked, self.codec.mask_id),
                attention_mask,
                self.noise_level(noise.alpha),
                rows,
                **network_kwargs,
            )
            row_batch = torch.arange(batch, device=device).unsqueeze(1).expand_as(rows)[rows]
            if num_steps is None:
                valid, prime = diffusion_terms(logits, ids[rows], masked[rows], self.codec, self.carry_over)
                valid_samples[:, k].index_add_(0, row_batch, valid.double())
                prime_samples[:, k].index_add_(0, row_batch, prime.double())
                valid_samples[:, k] *= noise.weight
                prime_samples[:, k] *= noise.weight
            else:
                # The reveal set is summed out exactly and, for a time-independent network, so is the step given
                # the number of masked digits (discrete_reveal_weights): far less variance than one sampled step
                # and reveal set times T.
                weights = discrete_reveal_weights(
                    alphas,
                    masked.sum((1, 2)),
                    scored.sum(1) * self.codec.num_sub_tokens,
                    self.codec.num_sub_tokens,
                    steps=noise.step if self.time_conditioning else None,
                )
                terms = discrete_expected_step_terms(
                    logits, ids[rows], masked[rows], weights[row_batch], self.codec, self.carry_over
                )
                valid_samples[:, k].index_add_(0, row_batch, terms)
        return BoundSamples(valid_samples, prime_samples if num_steps is None else None)


class StateDependentEstimator:
    """GenMD4 (ℓ = 1) on the endpoint-exact schedule ``α_{t,i} = 1 - t^{w_i}`` of the token values' powers ``w``
    (α(0) = 1 and α(1) = 0 exactly: no prior or reconstruction term is dropped or needed).

    Args:
        codec: the model's codec (ℓ = 1: its mask id).
        powers: ``(C,)`` the powers ``w = softplus(ŵ)``, differentiable for training (the score-function term of
            the objective's gradient flows into them).
    """

    def __init__(self, codec: SubTokenCodec, powers: torch.Tensor):
        self.codec, self.powers = codec, powers

    def sample(
        self,
        denoiser: Denoiser,
        ids: torch.Tensor,
        scored: torch.Tensor,
        attention_mask: torch.Tensor | None,
        powers: torch.Tensor,
        generator: torch.Generator | None,
        *,
        strata: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draw of the forward process per row, scored by one network call.

        With ``strata`` ``(B,)``: the masking-time estimator (:func:`sample_masking_time_corruption`): t = τ_J, the
        estimate is ``(N / W(z)) Σ_{masked n} g_n`` and the sample's log-density ``log r = log q(z | t) + log W(z)``
        (+ terms without powers). With ``t`` ``(B,)``: masks from q(z | t), the estimate is the integrand at t,
        ``(1/t) Σ g_n``, and ``log r = log q(z | t)``. ``g`` is :func:`genmd4_integrand`.

        Returns:
            ``(B,)`` float32 estimates (differentiable in the network and the powers), ``(B,)`` float64 ``log r``
            (differentiable in the powers: the score-function term), ``(B, L)`` masks, the ``(N, C)`` logits at
            the masked positions (row-major) and the ``(B,)`` float64 times.
        """
        schedule = StateDependentPolynomialSchedule(powers, 0.0)
        if strata is not None:
            t, masked, total_power = sample_masking_time_corruption(ids, powers, scored, strata, generator)
        else:
            log_mask = schedule.log_masking_probability(t.unsqueeze(1), ids)
            masked = sample_state_dependent_masks(ids, log_mask, scored, generator)
        log_mask = schedule.log_masking_probability(t.unsqueeze(1), ids)  # (B, L) float64
        log_r = state_dependent_mask_log_prob(masked, log_mask, schedule.log_alpha(t.unsqueeze(1), ids), scored)
        sub_ids = ids.masked_fill(masked, self.codec.mask_id).unsqueeze(-1)
        # The network is told t itself: under a state-dependent schedule there is no single masking probability to
        # tell it, and the posterior q(x0 | x_t) depends on t through every t^{w_i} (at w = 1, t is MD4's 1 - α_t).
        logits = denoiser(sub_ids, attention_mask, t.float(), masked, check_inputs=False)
        g = genmd4_integrand(logits, ids[masked], powers)
        row_of = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(masked)[masked]
        sums = torch.zeros(ids.shape[0], dtype=g.dtype, device=ids.device).index_add(0, row_of, g)
        if strata is not None:
            tiny = torch.finfo(torch.float64).tiny
            count = scored.sum(1).to(total_power.dtype)
            weight = torch.where(count > 0, count / total_power.clamp(min=tiny), torch.zeros_like(total_power))
            log_r = log_r + torch.log(total_power.clamp(min=tiny))
        else:
            weight = 1.0 / t
        return weight.to(sums.dtype) * sums, log_r, masked, logits, t

    def objective(
        self,
        denoiser: Denoiser,
        ids: torch.Tensor,
        scored: torch.Tensor,
        attention_mask: torch.Tensor | None,
        timesteps: torch.Tensor | None,
        generator: torch.Generator | None,
        loss_type: str,
        **network_kwargs,
    ) -> ObjectiveTerms:
        """GenMD4's training objective (docs/concepts/genmd4.md), per scored token.

        Per sequence, two independent draws k = 1, 2 (scored in one network call of 2B rows) give unbiased
        estimates of the continuous-time NELBO ``∫ (1/t) E_q[Σ_{masked n} g_n] dt``,
        ``g = Σ_j w_j μ_j - w_{x_n} - w_{x_n} log μ_{x_n}``:

        * by default, the masking-time estimator (:func:`sample_masking_time_corruption`): t is the masking time
          of a uniformly chosen position (antithetic strata over the batch), ``L_k = (N / W(z_k)) Σ g``. The count
          estimator does not apply (which positions are masked depends on their values), and t ~ U(0, 1) with the
          1/t weight has a divergent second moment; this estimator has neither problem;
        * with explicit ``timesteps``: two masks at that t, ``L_k = (1/t) Σ g``.

        ``loss`` is the REINFORCE leave-one-out surrogate (:func:`reinforce_leave_one_out`, with the log-density
        of each draw), ``elbo`` = ½(L1 + L2); ℓ = 1, so the paper objective is the bound.
        """
        if network_kwargs:
            raise ValueError(
                f"{sorted(network_kwargs)} not supported with GenMD4 (learnable_polynomial) models: their network "
                "takes only the tokens and the time."
            )
        batch = ids.shape[0]
        powers = self.powers
        pair = dict(
            ids=ids.repeat(2, 1),
            scored=scored.repeat(2, 1),
            attention_mask=None if attention_mask is None else attention_mask.repeat(2, 1),
        )
        if timesteps is None:
            # Two independent antithetic sets: the two draws of a row must be independent for the LOO baseline.
            strata = torch.cat(
                [1.0 - sample_times(batch, generator=generator, device=ids.device, dtype=torch.float64) for _ in "12"]
            )
            estimates, log_r, _, _, t = self.sample(denoiser, **pair, powers=powers, generator=generator, strata=strata)
        else:
            estimates, log_r, _, _, t = self.sample(
                denoiser, **pair, powers=powers, generator=generator, t=timesteps.repeat(2)
            )
        per_sequence = estimates.view(2, batch)
        log_r = log_r.to(per_sequence.dtype).view(2, batch)
        surrogate = reinforce_leave_one_out(per_sequence[0], per_sequence[1], log_r[0], log_r[1])
        num_tokens = scored.sum()
        denom = num_tokens.clamp(min=1)
        elbo = (0.5 * per_sequence.sum(0)).sum().detach() / denom
        return ObjectiveTerms(
            loss=surrogate.sum() / denom,
            elbo=elbo,
            paper_objective=elbo,
            timesteps=t[:batch].float(),
            num_tokens=num_tokens,
            powers=powers.detach(),
        )

    def bound_samples(
        self,
        denoiser: Denoiser,
        ids: torch.Tensor,
        scored: torch.Tensor,
        real: torch.Tensor,
        attention_mask: torch.Tensor | None,
        num_samples: int,
        num_steps: int | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        **network_kwargs,
    ) -> BoundSamples:
        """The valid NELBO per sequence in ``num_samples`` draws (nats), on the endpoint-exact schedule.

        Continuous time: per sample, one draw of the masking-time estimator (stratified over the K samples:
        :func:`sample_masking_time_corruption`), ``(N / W(z)) Σ_{masked n} [Σ_j w_j μ_j - w_x - w_x log μ_x]``,
        unbiased with weights bounded by N / (|z| min w). Discrete time (T steps, t = i/T, s = (i-1)/T,
        i ~ U{1..T}): ``T Σ_{masked n} KL_n`` with the per-position KL of the state-dependent reverse kernels in
        closed form (:func:`genmd4_step_kl`), so the reveal sets need not be sampled. The whole real sequence is
        scored: the masking-time estimator has no clean context, and draws are made for the batch as a whole.
        """
        if not bool((scored == real).all()) or isinstance(generator, (list, tuple)) or network_kwargs:
            raise ValueError(
                "GenMD4 models (noise_schedule='learnable_polynomial') take neither scored_mask nor per-row "
                "generators: their masking-time estimator scores whole sequences."
            )
        batch, device = ids.shape[0], ids.device
        powers = self.powers.detach()
        strata = stratified_uniforms(batch, num_samples, generator, device)
        samples = torch.zeros(batch, num_samples, dtype=torch.float64, device=device)
        for k in range(num_samples):
            if num_steps is None:
                estimate, *_ = self.sample(
                    denoiser, ids, scored, attention_mask, powers, generator, strata=strata[:, k]
                )
                samples[:, k] = estimate.double()
            else:
                step = torch.floor(strata[:, k] * num_steps) + 1
                t, s = step / num_steps, (step - 1) / num_steps
                _, _, masked, logits, _ = self.sample(denoiser, ids, scored, attention_mask, powers, generator, t=t)
                row_of = torch.arange(batch, device=device).unsqueeze(1).expand_as(masked)[masked]
                kl = genmd4_step_kl(logits.float().log_softmax(-1), ids[masked], powers, t[row_of], s[row_of])
                samples[:, k].index_add_(0, row_of, kl * num_steps)
        # ℓ = 1: the paper objective is the bound itself (continuous time).
        return BoundSamples(samples, samples if num_steps is None else None)


def estimator_for(config, codec: SubTokenCodec, schedule, powers: torch.Tensor | None):
    """The estimator of a model's forward process: :class:`StateDependentEstimator` for GenMD4 (``powers`` given),
    :class:`SubTokenEstimator` otherwise."""
    if powers is not None:
        return StateDependentEstimator(codec, powers)
    return SubTokenEstimator(codec, schedule, config.time_conditioning, config.carry_over)


__all__ = [
    "BoundSamples",
    "Corruption",
    "ObjectiveTerms",
    "StateDependentEstimator",
    "SubTokenEstimator",
    "estimator_for",
    "mean_and_stderr",
    "stratified_uniforms",
]
