"""Masking schedules α(t) and the training time sampler (method.md §1).

α(t) is the probability that a (sub-)token is still unmasked at time t ∈ [0, 1]; t = 0 is clean data.
Every schedule gives α(t), α'(t) and the continuous-time ELBO weight ``w(t) = -α'(t) / (1 - α(t))``.

The ``eps`` of a schedule scales the masking probability, ``1 - α = (1 - eps)(1 - α̃)``: α(0) = 1 still,
α(1) = eps, and the weights keep the closed forms of method.md's table (MDLM's linear schedule is
``α = 1 - (1 - eps) t``). Likelihood bounds and the sampler call :meth:`NoiseSchedule.exact`, the
endpoint-exact version (α(0) = 1, α(1) = 0), so the reverse process starts from the all-masked prior and
no prior or reconstruction term is dropped.

Plain torch: no model, no I/O.
"""

from __future__ import annotations

import math

import torch


class NoiseSchedule:
    """Base class. Subclasses implement :meth:`alpha` and :meth:`alpha_derivative` on tensors t (any shape)."""

    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_derivative(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight ``w(t) = -α'(t) / (1 - α(t))``."""
        return -self.alpha_derivative(t) / (1.0 - self.alpha(t))

    def reveal_probability(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Probability that an element masked at t is revealed by s < t: ``(α_s - α_t) / (1 - α_t)``.

        This is also the discrete-time ELBO weight that replaces ``w(t) dt``.
        """
        alpha_t = self.alpha(t)
        return ((self.alpha(s) - alpha_t) / (1.0 - alpha_t)).clamp(0.0, 1.0)

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
        return 1.0 - (1.0 - self.eps) * t

    def alpha_derivative(self, t):
        return torch.full_like(t, -(1.0 - self.eps))

    def weight(self, t):
        return 1.0 / t


class PolynomialSchedule(NoiseSchedule):
    """``α_t = 1 - (1 - eps) t^p``, ``w(t) = p / t``."""

    name = "polynomial"

    def __init__(self, exponent: float = 1.0, eps: float = 0.0):
        self.exponent = float(exponent)
        self.eps = float(eps)

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t**self.exponent

    def alpha_derivative(self, t):
        return -(1.0 - self.eps) * self.exponent * t ** (self.exponent - 1.0)

    def weight(self, t):
        return self.exponent / t


class CosineSchedule(NoiseSchedule):
    """``α_t = 1 - (1 - eps) cos(π/2 (1 - t))``, ``w(t) = (π/2) tan(π/2 (1 - t))``."""

    name = "cosine"

    def __init__(self, eps: float = 0.0):
        self.eps = float(eps)

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * torch.cos(0.5 * math.pi * (1.0 - t))

    def alpha_derivative(self, t):
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))

    def weight(self, t):
        return 0.5 * math.pi * torch.tan(0.5 * math.pi * (1.0 - t))


class GeometricSchedule(NoiseSchedule):
    """``α_t = exp(-β_min^(1-t) β_max^t)`` (MD4), ``w(t) = α/(1-α) · β_min^(1-t) β_max^t · log(β_max/β_min)``.

    Its endpoints are only approximately 1 and 0 (α(0) = e^-β_min, α(1) = e^-β_max).
    """

    name = "geometric"

    def __init__(self, beta_min: float = 1e-5, beta_max: float = 20.0):
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def _beta(self, t):
        return self.beta_min ** (1.0 - t) * self.beta_max**t

    def alpha(self, t):
        return torch.exp(-self._beta(t))

    def alpha_derivative(self, t):
        beta = self._beta(t)
        return -torch.exp(-beta) * beta * math.log(self.beta_max / self.beta_min)

    def weight(self, t):
        alpha, beta = self.alpha(t), self._beta(t)
        return alpha / (1.0 - alpha) * beta * math.log(self.beta_max / self.beta_min)


class _EndpointExact(NoiseSchedule):
    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.name = f"{schedule.name}-exact"
        ends = schedule.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()
        self._alpha0, self._alpha1 = ends
        self._range = ends[0] - ends[1]

    def alpha(self, t):
        return (self.schedule.alpha(t) - self._alpha1) / self._range

    def alpha_derivative(self, t):
        return self.schedule.alpha_derivative(t) / self._range

    def weight(self, t):
        # For the linear family the exact schedule is α = 1 - t^p; keep the closed form (no cancellation).
        if isinstance(self.schedule, (LinearSchedule, PolynomialSchedule)):
            return self.schedule.weight(t)
        return super().weight(t)

    def exact(self):
        return self


def get_noise_schedule(
    name: str,
    eps: float = 0.0,
    polynomial_exponent: float = 1.0,
    geometric_beta_min: float = 1e-5,
    geometric_beta_max: float = 20.0,
) -> NoiseSchedule:
    """Build a schedule by name: ``linear``, ``polynomial``, ``cosine`` or ``geometric``."""
    if name == "linear":
        return LinearSchedule(eps)
    if name == "polynomial":
        return PolynomialSchedule(polynomial_exponent, eps)
    if name == "cosine":
        return CosineSchedule(eps)
    if name == "geometric":
        return GeometricSchedule(geometric_beta_min, geometric_beta_max)
    raise ValueError(f"unknown noise schedule {name!r}; expected linear, polynomial, cosine or geometric.")


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
    "get_noise_schedule",
    "sample_times",
]
