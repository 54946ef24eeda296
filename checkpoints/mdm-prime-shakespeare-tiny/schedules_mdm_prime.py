"""Masking schedules α(t) and the training time sampler (docs/concepts/honest-likelihoods.md).

α(t) is the probability that a (sub-)token is still unmasked at time t ∈ [0, 1]; t = 0 is clean data.
Every schedule gives α(t), α'(t) and the continuous-time ELBO weight ``w(t) = -α'(t) / (1 - α(t))``.

The ``eps`` of a schedule scales the masking probability, ``1 - α = (1 - eps)(1 - α̃)``: α(0) = 1 still,
α(1) = eps, and the weights keep their closed forms (each class's ``weight``) (MDLM's linear schedule is
``α = 1 - (1 - eps) t``; the geometric schedule takes the same shift). Likelihood bounds and the sampler call
:meth:`NoiseSchedule.exact`, the endpoint-exact version (α(0) = 1, α(1) = 0), so the reverse process starts
from the all-masked prior and no prior or reconstruction term is dropped.

Plain torch: no model, no I/O.
"""

from __future__ import annotations

import math

import torch


def _float64(t: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class NoiseSchedule:
    """Base class. Subclasses implement :meth:`alpha` and :meth:`alpha_derivative` on tensors t (any shape).

    Every quantity is computed and returned in float64, whatever the dtype of t: in float32, 1 - α loses every
    digit near t = 0 for schedules whose α(0) is not exactly 1 (the geometric one, or any endpoint-exact
    version), which turns the weight into inf and the loss into NaN. :meth:`masking_probability` (1 - α) is
    the number to use in denominators; subclasses compute it without cancellation where they can.
    """

    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def masking_probability(self, t: torch.Tensor) -> torch.Tensor:
        """``1 - α(t)``, the probability that an element is masked at t."""
        return 1.0 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight ``w(t) = -α'(t) / (1 - α(t))``."""
        return -self.alpha_derivative(t) / self.masking_probability(t)

    def reveal_probability(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Probability that an element masked at t is revealed by s < t: ``(α_s - α_t) / (1 - α_t)``
        ``= (m_t - m_s) / m_t`` with m = 1 - α.

        This is also the discrete-time ELBO weight that replaces ``w(t) dt``.
        """
        m_t = self.masking_probability(t)
        return ((m_t - self.masking_probability(s)) / m_t).clamp(0.0, 1.0)

    def exact(self) -> NoiseSchedule:
        """The endpoint-exact schedule ``(α(t) - α(1)) / (α(0) - α(1))`` with α(0) = 1, α(1) = 0."""
        return _EndpointExact(self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class LinearSchedule(NoiseSchedule):
    """``α_t = 1 - (1 - eps) t``, ``w(t) = 1 / t``."""

    name = "linear"

    def __init__(self, eps: float = 0.0):
        self.eps = float(eps)

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * _float64(t)

    def alpha_derivative(self, t):
        return torch.full_like(_float64(t), -(1.0 - self.eps))

    def masking_probability(self, t):
        return (1.0 - self.eps) * _float64(t)

    def weight(self, t):
        return 1.0 / _float64(t)


class PolynomialSchedule(NoiseSchedule):
    """``α_t = 1 - (1 - eps) t^p``, ``w(t) = p / t``."""

    name = "polynomial"

    def __init__(self, exponent: float = 1.0, eps: float = 0.0):
        self.exponent = float(exponent)
        self.eps = float(eps)

    def alpha(self, t):
        return 1.0 - self.masking_probability(t)

    def alpha_derivative(self, t):
        return -(1.0 - self.eps) * self.exponent * _float64(t) ** (self.exponent - 1.0)

    def masking_probability(self, t):
        return (1.0 - self.eps) * _float64(t) ** self.exponent

    def weight(self, t):
        return self.exponent / _float64(t)


class CosineSchedule(NoiseSchedule):
    """``α_t = 1 - (1 - eps) cos(π/2 (1 - t))``, ``w(t) = (π/2) tan(π/2 (1 - t))``."""

    name = "cosine"

    def __init__(self, eps: float = 0.0):
        self.eps = float(eps)

    def alpha(self, t):
        return 1.0 - self.masking_probability(t)

    def alpha_derivative(self, t):
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - _float64(t)))

    def masking_probability(self, t):
        # cos(π/2 (1 - t)) = sin(π/2 t): exact near t = 0, where the cosine form rounds to 6e-17 at t = 0.
        return (1.0 - self.eps) * torch.sin(0.5 * math.pi * _float64(t))

    def weight(self, t):
        return 0.5 * math.pi * torch.tan(0.5 * math.pi * (1.0 - _float64(t)))


class GeometricSchedule(NoiseSchedule):
    """``α_t = 1 - (1 - eps)(1 - exp(-β_min^(1-t) β_max^t))`` (MD4, with the ``eps`` shift of the other
    schedules), ``w(t) = e^-β / (1 - e^-β) · β · log(β_max/β_min)`` (eps cancels in the weight).

    Its endpoints are only approximately 1 and 0 (α(0) = e^-β_min up to eps, α(1) ≈ eps + e^-β_max).
    """

    name = "geometric"

    def __init__(self, beta_min: float = 1e-5, beta_max: float = 20.0, eps: float = 0.0):
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.eps = float(eps)

    def _beta(self, t):
        t = _float64(t)
        return self.beta_min ** (1.0 - t) * self.beta_max**t

    def alpha(self, t):
        return 1.0 - self.masking_probability(t)

    def alpha_derivative(self, t):
        beta = self._beta(t)
        return -(1.0 - self.eps) * torch.exp(-beta) * beta * math.log(self.beta_max / self.beta_min)

    def masking_probability(self, t):
        return -(1.0 - self.eps) * torch.expm1(-self._beta(t))  # 1 - e^-β without cancellation

    def weight(self, t):
        beta = self._beta(t)
        return -torch.exp(-beta) / torch.expm1(-beta) * beta * math.log(self.beta_max / self.beta_min)


class _EndpointExact(NoiseSchedule):
    """``α̂ = (α - α(1)) / (α(0) - α(1))``; ``1 - α̂ = (m - m(0)) / (m(1) - m(0))`` with m = 1 - α."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.name = f"{schedule.name}-exact"
        ends = schedule.masking_probability(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()
        self._m0, self._m1 = ends
        self._range = ends[1] - ends[0]

    def alpha(self, t):
        return 1.0 - self.masking_probability(t)

    def alpha_derivative(self, t):
        return self.schedule.alpha_derivative(t) / self._range

    def masking_probability(self, t):
        if isinstance(self.schedule, GeometricSchedule):
            # m - m(0) = (1 - eps)(e^-β_min - e^-β) = -(1 - eps) e^-β_min expm1(β_min - β): exact near t = 0.
            g = self.schedule
            difference = -(1.0 - g.eps) * math.exp(-g.beta_min) * torch.expm1(g.beta_min - g._beta(t))
            return difference / self._range
        return (self.schedule.masking_probability(t) - self._m0) / self._range

    def weight(self, t):
        # For the linear family the exact schedule is α = 1 - t^p; keep the closed form (no cancellation).
        if isinstance(self.schedule, (LinearSchedule, PolynomialSchedule)):
            return self.schedule.weight(t)
        return super().weight(t)

    def exact(self):
        return self


class StateDependentPolynomialSchedule:
    """GenMD4's state-dependent schedule (docs/concepts/genmd4.md): ``α_{t,i} = 1 - (1 - eps) t^{w_i}`` for token
    value i.

    ``powers`` ``(C,)`` are the w_i (the model passes ``softplus(ŵ)``; gradients flow through every method).
    Everything is computed in float64. A masked element with clean value i is revealed by s < t with probability
    ``r_i = (α_{s,i} - α_{t,i}) / (1 - α_{t,i}) = 1 - (s/t)^{w_i}`` (eps cancels), and the continuous-time
    weight of a masked element with value i is ``-α'_{t,i} / (1 - α_{t,i}) = w_i / t``.

    There is no single α(t), so this is not a :class:`NoiseSchedule`; ``state_dependent = True`` marks it.
    """

    name = "learnable_polynomial"
    state_dependent = True

    def __init__(self, powers: torch.Tensor, eps: float = 0.0):
        if powers.dim() != 1:
            raise ValueError(f"powers must have shape (vocab_size,), got {tuple(powers.shape)}.")
        self.powers = powers
        self.eps = float(eps)

    def _w(self, tokens: torch.Tensor | None) -> torch.Tensor:
        w = self.powers.double()
        return w if tokens is None else w[tokens]

    def log_masking_probability(self, t: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``log(1 - α_{t,i}) = log(1 - eps) + w_i log t``: ``t`` ``(...)`` broadcast against ``tokens``
        ``(...)`` (the values' powers), or ``(..., C)`` for every value when ``tokens`` is None."""
        t = _float64(t).to(self.powers.device)
        w = self._w(tokens)
        log_t = torch.log(t) if tokens is not None else torch.log(t).unsqueeze(-1)
        return math.log1p(-self.eps) + w * log_t

    def masking_probability(self, t: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``1 - α_{t,i} = (1 - eps) t^{w_i}`` (shapes as :meth:`log_masking_probability`)."""
        return torch.exp(self.log_masking_probability(t, tokens))

    def log_alpha(self, t: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``log α_{t,i} = log(1 - (1 - eps) t^{w_i})`` without cancellation near t = 0 (-inf where α = 0)."""
        return torch.log(-torch.expm1(self.log_masking_probability(t, tokens)))

    def alpha(self, t: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        return -torch.expm1(self.log_masking_probability(t, tokens))

    def weight(self, t: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``-α'_{t,i} / (1 - α_{t,i}) = w_i / t``."""
        t = _float64(t).to(self.powers.device)
        return self._w(tokens) / (t if tokens is not None else t.unsqueeze(-1))

    def reveal_probability(self, t: torch.Tensor, s: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``r_i = 1 - (s/t)^{w_i}`` for s < t (1 when s = 0): shapes as :meth:`log_masking_probability`."""
        t = _float64(t).to(self.powers.device)
        s = _float64(s).to(self.powers.device)
        log_ratio = torch.log(s / t)  # -inf at s = 0 -> r = 1
        if tokens is None:
            log_ratio = log_ratio.unsqueeze(-1)
        return (-torch.expm1(self._w(tokens) * log_ratio)).clamp(0.0, 1.0)

    def exact(self) -> StateDependentPolynomialSchedule:
        """The endpoint-exact schedule (eps = 0): α_{0,i} = 1 and α_{1,i} = 0 for every i."""
        return StateDependentPolynomialSchedule(self.powers, 0.0)

    def __repr__(self) -> str:
        w = self.powers.detach().double()
        low, high = float(w.min()), float(w.max())
        return f"{type(self).__name__}(C={w.numel()}, w in [{low:.3g}, {high:.3g}], eps={self.eps})"


def get_noise_schedule(
    name: str,
    eps: float = 0.0,
    polynomial_exponent: float = 1.0,
    geometric_beta_min: float = 1e-5,
    geometric_beta_max: float = 20.0,
    powers: torch.Tensor | None = None,
) -> NoiseSchedule | StateDependentPolynomialSchedule:
    """Build a schedule by name: ``linear``, ``polynomial``, ``cosine``, ``geometric`` or ``learnable_polynomial``
    (which needs the ``(C,)`` ``powers``)."""
    if name == "learnable_polynomial":
        if powers is None:
            raise ValueError("the learnable_polynomial schedule needs its powers (one per token value).")
        return StateDependentPolynomialSchedule(powers, eps)
    if name == "linear":
        return LinearSchedule(eps)
    if name == "polynomial":
        return PolynomialSchedule(polynomial_exponent, eps)
    if name == "cosine":
        return CosineSchedule(eps)
    if name == "geometric":
        return GeometricSchedule(geometric_beta_min, geometric_beta_max, eps)
    raise ValueError(
        f"unknown noise schedule {name!r}; expected linear, polynomial, cosine, geometric or learnable_polynomial."
    )


def sample_times(
    batch_size: int,
    *,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Training times ``(batch_size,)`` in (0, 1].

    Low-discrepancy sampling: one ``u ~ U[0, 1)`` per batch and ``t_k = 1 - ((u + k / B) mod 1)``, so the
    batch covers [0, 1] evenly (one point per stratum). ``1 - (·)`` keeps t > 0, where ``w(t) = 1/t`` is
    finite. With ``antithetic=False`` every t is independent.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if antithetic:
        u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        offsets = torch.arange(batch_size, device=device, dtype=torch.float64) / batch_size
        u = torch.remainder(u + offsets, 1.0)
    else:
        u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    return (1.0 - u).to(dtype)


__all__ = [
    "CosineSchedule",
    "GeometricSchedule",
    "LinearSchedule",
    "NoiseSchedule",
    "PolynomialSchedule",
    "StateDependentPolynomialSchedule",
    "get_noise_schedule",
    "sample_times",
]
