"""GenMD4 (method.md §2): learnable state-dependent schedules, the REINFORCE leave-one-out gradient, the bound and
the state-dependent sampler."""

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import modeling_mdm_prime.estimators_mdm_prime as estimators
import modeling_mdm_prime.modeling_mdm_prime as modeling
from fresh_interpreter import interpreters
from modeling_mdm_prime import (
    MDMPrimeConfig,
    MDMPrimeForMaskedDiffusion,
    StateDependentPolynomialSchedule,
    StateDependentStrategy,
    diffusion_terms,
    genmd4_integrand,
    genmd4_step_kl,
    sample_masking_time_corruption,
)

POWERS = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)  # learned-looking, non-uniform


def genmd4_config(vocab: int = 4, **overrides) -> MDMPrimeConfig:
    settings = dict(
        vocab_size=vocab,
        num_sub_tokens=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        dropout=0.0,
        time_conditioning=True,
        noise_schedule="learnable_polynomial",
    )
    settings.update(overrides)
    return MDMPrimeConfig(**settings)


def set_powers(model: MDMPrimeForMaskedDiffusion, powers: torch.Tensor) -> None:
    """ŵ = softplus^-1(w) = log(expm1(w))."""
    with torch.no_grad():
        model.schedule_power_logits.copy_(torch.log(torch.expm1(powers.double())).float())


class StateDependentOracle(MDMPrimeForMaskedDiffusion):
    """The exact posterior marginals p(x_n | x_t, t) of a known distribution under α_{t,i} = 1 - t^{w_i}:
    p(x0 | x_t) ∝ p(x0) Π_{masked n} t^{w_{x0_n}} Π_{revealed n} 1{x0_n = x_t^n} (the revealed factors 1 - t^w are
    common to every consistent x0). Unlike the fixed-schedule oracle, it depends on t."""

    def __init__(self, config: MDMPrimeConfig, sequences: torch.Tensor, probs: torch.Tensor):
        super().__init__(config)
        self.sequences, self.probs = sequences, probs

    def token_logits(self, sub_ids, attention_mask=None, noise_level=None, positions=None, check_inputs=True):
        tokens = sub_ids[..., 0]  # (B, L)
        masked = (tokens == self.codec.mask_id).unsqueeze(1)  # (B, 1, L)
        log_t = torch.log(noise_level.double()).view(-1, 1, 1)
        w = self.powers.detach().double()[self.sequences].unsqueeze(0)  # (1, S, L)
        agree = self.sequences.unsqueeze(0) == tokens.unsqueeze(1)  # (B, S, L)
        factor = torch.where(masked, w * log_t, torch.where(agree, 0.0, -math.inf)).sum(-1)
        posterior = torch.softmax(self.probs.log().unsqueeze(0) + factor, -1)  # (B, S)
        batch, length = tokens.shape
        marginals = torch.zeros(batch, length, self.config.vocab_size, dtype=torch.float64)
        for n in range(length):
            marginals[:, n].index_add_(1, self.sequences[:, n], posterior)
        logits = marginals.log().float()
        return logits if positions is None else logits[positions]


class TableDenoiser(MDMPrimeForMaskedDiffusion):
    """A fixed, smooth denoiser of (x_t, t) that does not depend on the powers: logits = θ + t φ + (#masked) ψ."""

    def __init__(self, config: MDMPrimeConfig, length: int):
        super().__init__(config)
        gen = torch.Generator().manual_seed(7)
        self.theta, self.phi, self.psi = (torch.randn(length, config.vocab_size, generator=gen) for _ in range(3))

    def token_logits(self, sub_ids, attention_mask=None, noise_level=None, positions=None, check_inputs=True):
        masked = (sub_ids[..., 0] == self.codec.mask_id).float().sum(1).view(-1, 1, 1)
        logits = self.theta + noise_level.float().view(-1, 1, 1) * self.phi + masked * self.psi
        return logits if positions is None else logits[positions]


def oracle(length: int = 3, seed: int = 0) -> StateDependentOracle:
    gen = torch.Generator().manual_seed(seed)
    sequences = torch.cartesian_prod(*[torch.arange(4)] * length).view(-1, length)
    probs = torch.rand(len(sequences), generator=gen).pow(3)
    model = StateDependentOracle(genmd4_config(), sequences, (probs / probs.sum()).double()).eval()
    set_powers(model, POWERS)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Configuration, schedule, time sampler
# ---------------------------------------------------------------------------------------------------------------


def test_config_refuses_sub_tokens_and_time_independent_networks():
    with pytest.raises(ValueError, match="time_conditioning=True"):
        genmd4_config(time_conditioning=False)
    with pytest.raises(ValueError, match="num_sub_tokens=1"):
        genmd4_config(vocab=16, num_sub_tokens=2)
    model = MDMPrimeForMaskedDiffusion(genmd4_config(vocab=5))
    assert torch.allclose(model.powers, torch.ones(5))  # w = softplus(log(e - 1)) = 1 at initialisation
    assert "schedule_power_logits" in dict(model.named_parameters())
    assert MDMPrimeForMaskedDiffusion(genmd4_config(noise_schedule="linear")).schedule_power_logits is None


def test_state_dependent_schedule_closed_forms():
    w = POWERS.clone().requires_grad_(True)
    schedule = StateDependentPolynomialSchedule(w, eps=1e-3)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    tokens = torch.tensor([[0, 3], [2, 1]])
    expected = 1 - (1 - 1e-3) * t.unsqueeze(1) ** POWERS[tokens]
    assert torch.allclose(schedule.alpha(t.unsqueeze(1), tokens), expected)
    assert torch.allclose(schedule.log_alpha(t.unsqueeze(1), tokens), expected.log())
    assert schedule.alpha(t).shape == (2, 4)
    # weight = -α'/(1 - α) = w / t, by central differences
    h = 1e-6
    derivative = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    assert torch.allclose(-derivative / (1 - schedule.alpha(t)), schedule.weight(t), rtol=1e-6)
    # reveal probability (α_s - α_t) / (1 - α_t) = 1 - (s/t)^w (eps cancels); 1 at s = 0
    s = torch.tensor([0.1, 0.0], dtype=torch.float64)
    direct = (schedule.alpha(s) - schedule.alpha(t)) / (1 - schedule.alpha(t))
    assert torch.allclose(schedule.reveal_probability(t, s), direct)
    assert torch.equal(schedule.reveal_probability(t, s)[1], torch.ones(4, dtype=torch.float64))
    assert schedule.exact().eps == 0.0 and float(schedule.exact().alpha(torch.tensor(1.0)).detach().max()) == 0.0
    schedule.log_masking_probability(t.unsqueeze(1), tokens).sum().backward()
    assert w.grad is not None and bool((w.grad != 0).any())  # differentiable in the powers (for REINFORCE)


def test_masking_time_estimator_is_unbiased_with_bounded_weights():
    """E_r[(N / W(z)) S(z, t)] = ∫ (1/t) E_q[S] dt for S = Σ_{masked n} c_n f(t), checked against the closed forms
    ∫ Σ_n t^{w_n - 1} c_n dt = Σ_n c_n / w_n (f = 1) and Σ_n c_n / (w_n + 1) (f = t) on a stratified grid of 40,000
    draws; rows with nothing maskable get weight 0."""
    powers = torch.tensor([0.3, 0.8, 1.0, 2.5], dtype=torch.float64)
    targets = torch.tensor([[0, 1, 2, 3, 0, 3]]).expand(40_000, 6)
    maskable = torch.tensor([[True, True, True, True, False, True]]).expand(40_000, 6)
    c = torch.tensor([1.0, 2.0, 0.5, 3.0, 7.0, 1.5], dtype=torch.float64)
    strata = (torch.arange(40_000, dtype=torch.float64) + 0.5) / 40_000
    t, masked, total = sample_masking_time_corruption(
        targets, powers, maskable, strata, torch.Generator().manual_seed(0)
    )
    assert bool(((t > 0) & (t <= 1)).all()) and not bool((masked & ~maskable).any()) and bool(masked.any(1).all())
    assert torch.allclose(total, (powers[targets] * masked).sum(1))
    weight = 5 / total
    assert float(weight.max()) <= 5 / float(powers.min())  # no 1/t
    w = powers[targets[0]]
    for f, closed in ((torch.ones_like(t), (c / w)[maskable[0]].sum()), (t, (c / (w + 1))[maskable[0]].sum())):
        values = weight * (masked.double() * c).sum(1) * f
        stderr = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - float(closed)) < 4 * stderr + 1e-3, (float(values.mean()), float(closed))
    empty = sample_masking_time_corruption(targets[:1], powers, torch.zeros(1, 6, dtype=torch.bool), strata[:1])
    assert float(empty[0][0]) == 1.0 and not bool(empty[1].any()) and float(empty[2][0]) == 0.0


def test_bound_matches_md4_at_unit_powers_with_a_similar_standard_error():
    """At w = 1 GenMD4 is MD4's linear schedule (and both networks are told t): the same weights give the same bound
    within standard errors, and the masking-time estimator's per-sample spread is no worse than the count
    estimator's (t ~ U(0, 1) with 1/t weights was about 60 times worse at L = 128)."""
    kw = dict(vocab=50, max_position_embeddings=64)
    torch.manual_seed(0)
    genmd4 = MDMPrimeForMaskedDiffusion(genmd4_config(**kw)).eval()
    md4 = MDMPrimeForMaskedDiffusion(genmd4_config(noise_schedule="linear", **kw)).eval()
    state = {k: v for k, v in genmd4.state_dict().items() if k != "schedule_power_logits"}
    for key in state:
        if "adaLN" in key:  # a network that really depends on t
            state[key] = torch.randn_like(state[key]) * 0.1
    md4.load_state_dict(state)
    genmd4.load_state_dict(state, strict=False)
    ids = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(1))
    a = genmd4.nll_bound(ids, num_time_samples=128, generator=torch.Generator().manual_seed(0))
    b = md4.nll_bound(ids, num_time_samples=128, generator=torch.Generator().manual_seed(0))
    assert bool(((a.nll - b.nll).abs() < 4 * torch.hypot(a.nll_stderr, b.nll_stderr)).all())
    assert bool((a.nll_stderr < 2 * b.nll_stderr).all()), (a.nll_stderr, b.nll_stderr)


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------


def test_tied_fixed_powers_give_md4_polynomial_loss():
    """With every w = p, the GenMD4 integrand (1/t) g equals MD4's polynomial-schedule term (p/t)(-log μ_x) for the
    same masks; through the model at t = 1 (every position masked, noise level 1 for both) the NELBOs agree."""
    p = 1.7
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(50, 6, generator=gen), torch.randint(0, 6, (50,), generator=gen)
    masked = torch.rand(50, 1, generator=gen) < 0.5
    t = 0.37
    genmd4 = genmd4_integrand(logits[masked[:, 0]], targets[masked[:, 0]], torch.full((6,), p)) / t
    md4_schedule = modeling.get_noise_schedule("polynomial", 0.0, p)
    md4, _ = diffusion_terms(logits, targets, masked, MDMPrimeForMaskedDiffusion(genmd4_config(vocab=6)).codec)
    assert torch.allclose(genmd4, float(md4_schedule.weight(torch.tensor(t))) * md4[masked[:, 0]], rtol=1e-5)

    torch.manual_seed(0)
    gen4 = MDMPrimeForMaskedDiffusion(genmd4_config(vocab=6)).eval()
    set_powers(gen4, torch.full((6,), p))
    md4_model = MDMPrimeForMaskedDiffusion(
        genmd4_config(vocab=6, noise_schedule="polynomial", polynomial_exponent=p, noise_eps=0.0)
    ).eval()
    state = {k: v for k, v in gen4.state_dict().items() if k != "schedule_power_logits"}
    md4_model.load_state_dict(state)
    ids = torch.randint(0, 6, (3, 8), generator=gen)
    a = gen4(ids, timesteps=torch.ones(3))
    b = md4_model(ids, timesteps=torch.ones(3))
    assert float(a.elbo) == pytest.approx(float(b.elbo), rel=1e-5)
    assert float(a.loss.detach()) == pytest.approx(float(a.elbo), rel=1e-6)  # the surrogate's value is the NELBO
    assert float(a.power_max) == float(a.power_min) == pytest.approx(p)
    c = gen4(
        ids, generator=torch.Generator().manual_seed(0)
    )  # sampled t: the masks differ, the value is still ½(L1+L2)
    assert float(c.loss.detach()) == pytest.approx(float(c.elbo), rel=1e-5)


def exact_nelbo(model: TableDenoiser, x0: torch.Tensor, nodes: int = 160) -> torch.Tensor:
    """∫_0^1 Σ_z q(z | x0; t) (1/t) Σ_{n ∈ z} g_n dt by enumerating the 2^L masks z and Gauss-Legendre quadrature
    in v with t = v^4 (smooths the t^(w-1) behaviour at 0). Differentiable in ŵ."""
    length = x0.numel()
    v, weights = np.polynomial.legendre.leggauss(nodes)
    v = torch.tensor((v + 1) / 2, dtype=torch.float64)
    weights = torch.tensor(weights / 2, dtype=torch.float64) * 4 * v**3
    t = v**4
    masks = torch.cartesian_prod(*[torch.tensor([False, True])] * length).view(-1, length)  # (M, L)
    z = masks.repeat(nodes, 1)  # (M·G, L)
    tt = t.repeat_interleave(len(masks))  # (M·G,)
    powers = model.powers
    w = powers.double()[x0].unsqueeze(0)  # (1, L)
    log_t = tt.log().unsqueeze(1)
    log_q = torch.where(z, w * log_t, torch.log(-torch.expm1(w * log_t))).sum(1)
    sub_ids = x0.expand_as(z).masked_fill(z, model.codec.mask_id).unsqueeze(-1)
    logits = model.token_logits(sub_ids, noise_level=tt.float(), positions=z)
    g = genmd4_integrand(logits, x0.expand_as(z)[z], powers).double()
    row = torch.arange(len(z)).unsqueeze(1).expand_as(z)[z]
    per_row = torch.zeros(len(z), dtype=torch.float64).index_add(0, row, g) / tt
    return (per_row * log_q.exp() * weights.repeat_interleave(len(masks))).sum()


def test_reinforce_gradient_matches_the_exact_nelbo_gradient(monkeypatch):
    """Tiny enumerable case (L = 3, C = 4): the surrogate's mean gradient w.r.t. ŵ matches the exact NELBO gradient
    within 4 Monte-Carlo standard errors per component (R = 32 batches of 2,048 sequences); plain autodiff through
    ½(L1 + L2) misses the score-function term and is off by far more (|z| > 50 at seed 100; asserted > 10)."""
    model = TableDenoiser(genmd4_config(), length=3)
    set_powers(model, torch.tensor([0.6, 1.0, 1.6, 2.4]))
    x0 = torch.tensor([1, 3, 0])
    exact = exact_nelbo(model, x0)
    (exact_grad,) = torch.autograd.grad(exact, model.schedule_power_logits)
    coarse = exact_nelbo(model, x0, nodes=80)  # the quadrature has converged
    assert float(coarse.detach()) == pytest.approx(float(exact.detach()), rel=1e-6)

    def mean_gradient(repeats=32, batch=2048):
        grads = []
        for r in range(repeats):
            model.zero_grad()
            out = model(x0.expand(batch, 3), generator=torch.Generator().manual_seed(100 + r))
            (out.loss * 3).backward()  # loss is per token: x3 for the per-sequence NELBO
            grads.append(model.schedule_power_logits.grad.double().clone())
        grads = torch.stack(grads)
        return grads.mean(0), grads.std(0) / math.sqrt(repeats), out

    mean, stderr, out = mean_gradient()
    assert float(out.elbo * 3) == pytest.approx(float(exact.detach()), rel=0.03)  # the value estimates the NELBO
    z = (mean - exact_grad.double()) / stderr
    assert bool((z.abs() < 4).all()), (mean, exact_grad, stderr)

    monkeypatch.setattr(estimators, "reinforce_leave_one_out", lambda l1, l2, q1, q2: 0.5 * (l1 + l2))
    plain, plain_stderr, _ = mean_gradient(repeats=8)
    z_plain = (plain - exact_grad.double()) / torch.maximum(plain_stderr, stderr)
    assert float(z_plain.abs().max()) > 10, (plain, exact_grad)


# ---------------------------------------------------------------------------------------------------------------
# The bound, with an oracle denoiser of a state-dependent schedule
# ---------------------------------------------------------------------------------------------------------------


def test_bound_equals_nll_with_state_dependent_oracle():
    model = oracle()
    rows = torch.tensor([0, 5, 17, 42, 63])
    ids = model.sequences[rows]
    truth = -model.probs[rows].log()
    out = model.nll_bound(ids, num_time_samples=2048, generator=torch.Generator().manual_seed(0))
    z = (out.nll - truth) / out.nll_stderr
    assert bool((z.abs() < 4).all()), (out.nll, truth, out.nll_stderr)
    assert bool((out.nll_stderr < 0.05 * truth).all())  # a usable standard error (finite variance)
    # Discrete time, T = 1: one step from all-masked to clean reveals every position from its marginal: exact.
    one = model.nll_bound(ids, num_time_samples=2, num_steps=1, generator=torch.Generator().manual_seed(0))
    marginals = torch.stack([torch.zeros(4, dtype=torch.float64).index_add(0, model.sequences[:, n], model.probs)
                             for n in range(3)])  # fmt: skip
    closed = -torch.stack([marginals[n, ids[:, n]].log() for n in range(3)]).sum(0)
    assert torch.allclose(one.nll, closed, atol=1e-5) and bool((one.nll_stderr < 1e-5).all())
    # T steps: an upper bound that tightens towards -log p(x).
    fine = model.nll_bound(ids, num_time_samples=256, num_steps=64, generator=torch.Generator().manual_seed(1))
    assert bool((fine.nll - truth > -4 * fine.nll_stderr).all())
    assert float(fine.nll.sum()) < float(one.nll.sum())
    assert float((fine.nll.sum() - truth.sum()) / fine.nll_stderr.pow(2).sum().sqrt()) < 4


def test_step_kl_closed_form():
    """The per-position KL of the two reverse kernels, against the direct sum over outcomes {tokens, stay}."""
    gen = torch.Generator().manual_seed(3)
    log_mu = torch.log_softmax(torch.randn(5, 4, generator=gen, dtype=torch.float64), -1)
    targets = torch.tensor([0, 1, 2, 3, 1])
    t = torch.tensor([0.9, 0.5, 0.3, 0.8, 0.2], dtype=torch.float64)
    s = torch.tensor([0.7, 0.1, 0.0, 0.79, 0.19], dtype=torch.float64)
    r = 1 - (s.unsqueeze(1) / t.unsqueeze(1)) ** POWERS
    p_move, p_stay = r * log_mu.exp(), 1 - (r * log_mu.exp()).sum(1)
    r_x = r.gather(1, targets.unsqueeze(1)).squeeze(1)
    direct = r_x * (r_x.log() - p_move.gather(1, targets.unsqueeze(1)).squeeze(1).log())
    stay = torch.where(r_x < 1, (1 - r_x) * ((1 - r_x).log() - p_stay.log()), torch.zeros_like(r_x))
    assert torch.allclose(genmd4_step_kl(log_mu, targets, POWERS, t, s), direct + stay, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------------


def test_state_dependent_sampler_follows_the_distribution():
    """4,000 samples of 3 tokens with the oracle and 64 steps: total variation to p below 0.06 (seed 0: 0.042;
    4,000 exact draws from this p give 0.036; MD4's ancestral sampler with the same oracle gives 0.38). Idle
    skipping is exact (same samples with the cache off) and rows are scored on few of the 64 steps."""
    model = oracle()
    out = model.generate(max_new_tokens=3, num_steps=64, num_return_sequences=4000, seed=0,
                         return_dict_in_generate=True)  # fmt: skip
    index = (out.sequences * torch.tensor([16, 4, 1])).sum(1)
    empirical = torch.bincount(index, minlength=64).double() / len(index)
    order = (model.sequences * torch.tensor([16, 4, 1])).sum(1)
    tv = 0.5 * float((empirical[order] - model.probs).abs().sum())
    assert tv < 0.06, tv
    assert int(out.row_nfe.max()) < 64 and float(out.row_nfe.double().mean()) < 16  # idle steps are skipped
    few = model.generate(max_new_tokens=3, num_steps=16, num_return_sequences=64, seed=1)
    naive = model.generate(max_new_tokens=3, num_steps=16, num_return_sequences=64, seed=1, use_idle_cache=False)
    assert torch.equal(few, naive)


def test_generate_picks_the_state_dependent_strategy_and_is_batch_invariant():
    torch.manual_seed(0)
    model = MDMPrimeForMaskedDiffusion(genmd4_config(vocab=20, max_position_embeddings=16)).eval()
    set_powers(model, torch.linspace(0.3, 3.0, 20))
    chosen = []
    original = StateDependentStrategy.plan

    def spy(self, state):
        chosen.append(type(self).__name__)
        return original(self, state)

    StateDependentStrategy.plan = spy
    try:
        prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
        batched = model.generate(prompts, max_new_tokens=6, num_steps=6, seed=3)
    finally:
        StateDependentStrategy.plan = original
    assert chosen and set(chosen) == {"StateDependentStrategy"}
    for row in range(2):
        alone = model.generate(prompts[row : row + 1], max_new_tokens=6, num_steps=6, seed=3)
        assert torch.equal(batched[row], alone[0])
    named = model.generate(prompts, max_new_tokens=6, num_steps=6, seed=3, strategy="state_dependent")
    assert torch.equal(named, batched)
    md4 = MDMPrimeForMaskedDiffusion(genmd4_config(vocab=20, noise_schedule="linear"))
    with pytest.raises(ValueError, match="state-dependent schedule"):
        md4.generate(max_new_tokens=4, strategy="state_dependent")


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading, remote code, training script
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_genmd4(tmp_path_factory):
    root = tmp_path_factory.mktemp("genmd4")
    torch.manual_seed(0)
    model = MDMPrimeForMaskedDiffusion(genmd4_config(vocab=20, max_position_embeddings=16)).eval()
    set_powers(model, torch.linspace(0.3, 3.0, 20))
    model.save_pretrained(root / "checkpoint")
    ids = torch.randint(0, 20, (2, 10), generator=torch.Generator().manual_seed(0))
    expected = {
        "nll": model.nll_bound(ids, num_time_samples=4, generator=torch.Generator().manual_seed(0)).nll,
        "generated": model.generate(max_new_tokens=6, num_steps=6, seed=0),
        "powers": model.powers.detach(),
    }
    return root, model, ids, expected


def test_save_load_round_trip(saved_genmd4):
    root, model, ids, expected = saved_genmd4
    with safe_open(str(root / "checkpoint" / "model.safetensors"), "pt") as f:
        assert "schedule_power_logits" in set(f.keys())
    loaded = MDMPrimeForMaskedDiffusion.from_pretrained(root / "checkpoint").eval()
    assert torch.equal(loaded.powers, expected["powers"])
    assert torch.equal(loaded.nll_bound(ids, num_time_samples=4, generator=torch.Generator().manual_seed(0)).nll,
                       expected["nll"])  # fmt: skip


GENMD4_LOADER = r"""
import json, sys
sys.modules["modeling_mdm_prime"] = None  # only the checkpoint's code
import torch, transformers
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
print(json.dumps({
    "transformers": transformers.__version__,
    "module": type(model).__module__,
    "powers": model.powers.tolist(),
    "nll": model.nll_bound(ids, num_time_samples=4, generator=torch.Generator().manual_seed(0)).nll.tolist(),
    "generated": model.generate(max_new_tokens=6, num_steps=6, seed=0).tolist(),
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("python", "version"), list(interpreters()))
def test_genmd4_remote_code_loads_in_fresh_process(saved_genmd4, python, version, fresh_python):
    root, _, ids, expected = saved_genmd4
    result = fresh_python(python, GENMD4_LOADER, [root / "checkpoint", json.dumps(ids.tolist())], cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["transformers"].startswith(version) and report["module"].startswith("transformers_modules")
    assert torch.equal(torch.tensor(report["powers"]), expected["powers"])
    assert torch.allclose(torch.tensor(report["nll"], dtype=torch.float64), expected["nll"], rtol=1e-6)
    assert torch.equal(torch.tensor(report["generated"]), expected["generated"])


def test_power_gradient_is_finite_under_training():
    """A few optimiser steps on random data keep every quantity finite and move the powers."""
    torch.manual_seed(0)
    model = MDMPrimeForMaskedDiffusion(genmd4_config(vocab=20, max_position_embeddings=16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 20, (8, 16))
    for _ in range(5):
        out = model(ids)
        optimizer.zero_grad()
        out.loss.backward()
        assert bool(torch.isfinite(model.schedule_power_logits.grad).all())
        optimizer.step()
    assert not torch.allclose(model.powers, torch.ones(20))
    assert F.softplus(model.schedule_power_logits).min() > 0 and sys.float_info.max > float(out.loss.detach()) > 0


@pytest.mark.slow
def test_pretrain_keeps_schedule_parameters_out_of_weight_decay_and_trains_genmd4(tmp_path):
    from test_pretrain import TINY, load_pretrain, logged, run

    from modeling_mdm_prime.tools.training import optimizer_groups

    pretrain = load_pretrain()
    cfg = pretrain.parse_config(["--noise_schedule", "learnable_polynomial", "--weight_decay", "0.1"])
    assert cfg.num_sub_tokens == 1 and cfg.time_conditioning  # set for GenMD4
    model = MDMPrimeForMaskedDiffusion(genmd4_config(vocab=20))
    groups = optimizer_groups(model, cfg.weight_decay, cfg.decay_schedule_parameters)
    schedule = [g for g in groups if any(p is model.schedule_power_logits for p in g["params"])]
    assert len(schedule) == 1 and schedule[0]["weight_decay"] == 0.0 and len(schedule[0]["params"]) == 1
    assert [g["weight_decay"] for g in groups if g is not schedule[0]] == [0.1]
    cfg.decay_schedule_parameters = True
    assert all(g["weight_decay"] == 0.1 for g in optimizer_groups(model, cfg.weight_decay, True))

    out = tmp_path / "genmd4"
    run([*TINY, "--noise_schedule", "learnable_polynomial", "--max_steps", "4", "--output_dir", str(out)])
    powers = logged(out, "train/power_mean")
    assert sorted(powers) == [1, 2, 3, 4] and all(0 < v < 10 for v in powers.values())
    assert logged(out, "train/loss") == pytest.approx(logged(out, "train/elbo"), rel=1e-5)
    assert (out / "final" / "powers.png").stat().st_size > 1000
    assert json.loads((out / "final" / "config.json").read_text())["noise_schedule"] == "learnable_polynomial"


def test_benchmark_smoke(tmp_path):
    """benchmarks/genmd4.py --tiny: both models train, every row has a bound with a standard error, JSON + PNG."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "genmd4.py"
    spec = importlib.util.spec_from_file_location("genmd4_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--tiny", "--output-dir", str(tmp_path)])
    assert [(r["model"], r["steps"]) for r in results["rows"]] == [("MD4 (linear)", 4), ("MD4 (linear)", 8),
                                                                   ("GenMD4", 4)]  # fmt: skip
    assert results["rows"][2]["sequence_evaluations"] == results["rows"][1]["sequence_evaluations"]
    assert all(r["nelbo_stderr"] > 0 and math.isfinite(r["ppl_bound"]) for r in results["rows"])
    assert (tmp_path / "genmd4_tiny.json").exists() and (tmp_path / "genmd4_tiny_powers.png").stat().st_size > 1000


def test_genmd4_sampler_keeps_the_time_warp_and_refuses_the_corrector():
    """The image sampler's knobs on a GenMD4 model: the time warp carries over to the state-dependent sampler (so it
    changes the samples), and the corrector, derived for fixed schedules, is refused."""
    torch.manual_seed(0)
    model = MDMPrimeForMaskedDiffusion(genmd4_config(vocab=12)).eval()
    base = dict(max_new_tokens=6, num_steps=6, seed=0, num_return_sequences=8)
    plain, warped = model.generate(**base), model.generate(**base, time_warp=(1.0, 3.0, 0.0))
    assert not torch.equal(plain, warped)
    with pytest.raises(ValueError, match="corrector is defined for fixed schedules"):
        model.generate(**base, corrector=(16, 2))
