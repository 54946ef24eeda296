import math

import pytest
import torch

from modeling_mdm_prime import get_noise_schedule, sample_times

SCHEDULES = [
    ("linear", dict(eps=1e-3)),
    ("linear", dict(eps=0.0)),
    ("polynomial", dict(polynomial_exponent=2.0, eps=1e-3)),
    ("polynomial", dict(polynomial_exponent=0.5)),
    ("cosine", dict(eps=1e-3)),
    ("geometric", dict(geometric_beta_min=1e-5, geometric_beta_max=20.0)),
]
GRID = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


@pytest.mark.parametrize(("name", "params"), SCHEDULES)
def test_endpoints(name, params):
    schedule = get_noise_schedule(name, **params)
    ends = schedule.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert abs(ends[0] - 1) < 1e-4 and abs(ends[1]) < 1.1e-3
    exact = schedule.exact().alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(exact, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)
    values = schedule.alpha(GRID)
    assert bool((values[1:] < values[:-1]).all()), "alpha must decrease"


@pytest.mark.parametrize(("name", "params"), SCHEDULES)
@pytest.mark.parametrize("exact", [False, True])
def test_derivative_matches_autograd(name, params, exact):
    schedule = get_noise_schedule(name, **params)
    schedule = schedule.exact() if exact else schedule
    t = GRID.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(schedule.alpha(t).sum(), t)
    assert torch.allclose(schedule.alpha_derivative(GRID), grad, rtol=1e-10, atol=1e-12)
    generic = -schedule.alpha_derivative(GRID) / (1 - schedule.alpha(GRID))
    assert torch.allclose(schedule.weight(GRID), generic, rtol=1e-8)


def test_weights_match_method_md_table():
    t = GRID
    half_pi = math.pi / 2
    expected = {
        "linear": 1 / t,
        "polynomial": 3.0 / t,
        "cosine": half_pi * torch.tan(half_pi * (1 - t)),
    }
    params = {"polynomial": dict(polynomial_exponent=3.0)}
    for name, weight in expected.items():
        for eps in (0.0, 1e-3):
            schedule = get_noise_schedule(name, eps=eps, **params.get(name, {}))
            assert torch.allclose(schedule.weight(t), weight, rtol=1e-9), name
            generic = -schedule.alpha_derivative(t) / (1 - schedule.alpha(t))
            assert torch.allclose(generic, weight, rtol=1e-8), name
    geo = get_noise_schedule("geometric", geometric_beta_min=1e-5, geometric_beta_max=20.0)
    beta = 1e-5 ** (1 - t) * 20.0**t
    alpha = torch.exp(-beta)
    assert torch.allclose(geo.weight(t), alpha / (1 - alpha) * beta * math.log(20.0 / 1e-5), rtol=1e-9)


def test_linear_eps_matches_mdlm():
    schedule = get_noise_schedule("linear", eps=1e-3)
    assert torch.allclose(schedule.alpha(GRID), 1 - (1 - 1e-3) * GRID)
    assert torch.allclose(schedule.exact().alpha(GRID), 1 - GRID)


def test_reveal_probability():
    schedule = get_noise_schedule("linear").exact()
    t, s = torch.tensor([0.5, 1.0, 0.1]), torch.tensor([0.25, 0.75, 0.0])
    assert torch.allclose(schedule.reveal_probability(t, s), torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64))


def test_low_discrepancy_sampler():
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 7, 64):
        t = sample_times(batch, generator=gen, dtype=torch.float64)
        assert t.shape == (batch,) and bool(((t > 0) & (t <= 1)).all())
        # Exactly one sample in each stratum ((k-1)/B, k/B].
        strata = torch.ceil(t * batch).long().clamp(1, batch)
        assert sorted(strata.tolist()) == list(range(1, batch + 1))
    independent = sample_times(10000, antithetic=False, generator=gen)
    assert abs(float(independent.mean()) - 0.5) < 0.02
    with pytest.raises(ValueError):
        sample_times(0)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_noise_schedule("sigmoid")


ALL_SCHEDULES = SCHEDULES + [("geometric", dict(geometric_beta_min=1e-5, geometric_beta_max=20.0, eps=1e-3))]


@pytest.mark.parametrize(("name", "params"), ALL_SCHEDULES)
@pytest.mark.parametrize("exact", [False, True])
def test_near_both_end_points_in_float32(name, params, exact):
    """t handed over in float32 (as training code does): every quantity is computed in float64. Near t = 0 the
    endpoint-exact weight behaves like p/t (p the polynomial exponent, else 1); in float32 arithmetic 1 - α
    of the geometric schedule's exact version was 0 below t = 3e-4 (weight inf, loss NaN) and 23 % off at 1e-3."""
    schedule = get_noise_schedule(name, **params)
    schedule = schedule.exact() if exact else schedule
    small = torch.tensor([1e-12, 1e-8, 1e-5, 1e-3], dtype=torch.float32)
    near_one = torch.tensor([1 - 1e-6, 1.0], dtype=torch.float32)
    for t in (small, near_one):
        for value in (schedule.alpha(t), schedule.masking_probability(t), schedule.weight(t)):
            assert value.dtype == torch.float64 and bool(torch.isfinite(value).all())
        assert bool((schedule.masking_probability(t) > 0).all())
        assert torch.allclose(schedule.weight(t), schedule.weight(t.double()), rtol=1e-12)
    if exact:
        limit = params.get("polynomial_exponent", 1.0)
        assert torch.allclose(small.double() * schedule.weight(small), torch.full((4,), limit, dtype=torch.float64),
                              rtol=2e-2)  # fmt: skip
        masking = schedule.masking_probability(torch.tensor([0.0, 1.0]))
        assert torch.allclose(masking, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-15)
    p = schedule.reveal_probability(small, small / 2)
    assert bool(((p > 0) & (p < 1)).all())


def test_geometric_schedule_honours_noise_eps():
    plain = get_noise_schedule("geometric")
    shifted = get_noise_schedule("geometric", eps=0.1)
    t = GRID
    assert torch.allclose(1 - shifted.alpha(t), 0.9 * (1 - plain.alpha(t)), rtol=1e-12)
    assert abs(float(shifted.alpha(torch.tensor(1.0))) - 0.1) < 1e-8
    assert torch.allclose(shifted.weight(t), plain.weight(t), rtol=1e-12)  # eps cancels in the weight
