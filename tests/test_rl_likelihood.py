"""Sequence log-likelihood estimators for RL (``modeling_mdm_prime.tools.rl_likelihood``) against exact values:
the ELBO by enumerating every mask, its gradient, the true log-likelihood for an oracle denoiser, and the closed
form of d1's one-pass estimate."""

import json
from pathlib import Path

import pytest
import torch

from conftest import load_benchmark, oracle_logits, random_distribution, tiny_model
from modeling_mdm_prime.tools.rl_likelihood import exact_elbo, exact_log_likelihood, sequence_log_likelihood

REPO = Path(__file__).resolve().parents[1]
PROMPT = torch.tensor([[3, 4], [5, 6]])
COMPLETION = torch.tensor([[1, 2, 7], [8, 9, 0]])
COMPLETION_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second completion is two tokens


def _model(ell: int, **overrides):
    settings = dict(num_sub_tokens=ell, time_conditioning=False, vocab_size=12, max_position_embeddings=16)
    return tiny_model(**{**settings, **overrides})


def _estimate(model, estimator, num_samples, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return sequence_log_likelihood(model, PROMPT, COMPLETION, completion_mask=COMPLETION_MASK, estimator=estimator,
                                   num_samples=num_samples, generator=generator, **kwargs)  # fmt: skip


@pytest.mark.parametrize("ell", [1, 2])
def test_elbo_and_coupled_estimate_the_enumerated_elbo_without_bias(ell):
    """Each estimator's mean over many draws is within 4 standard errors of the ELBO computed over all 2^N masks;
    the coupled pairs have smaller variance per sample."""
    model = _model(ell)
    with torch.no_grad():
        exact = exact_elbo(model, PROMPT, COMPLETION, completion_mask=COMPLETION_MASK)
        elbo = _estimate(model, "elbo", 1500)
        coupled = _estimate(model, "coupled", 600, seed=1)
    for estimate in (elbo, coupled):
        assert estimate.lower_bound
        # + 1e-6: float32 network terms (a two-digit completion's coupled pair has almost no variance)
        assert ((estimate.log_likelihood - exact).abs() <= 4 * estimate.stderr + 1e-6).all(), (estimate, exact)
    assert (coupled.samples.std(1) < elbo.samples.std(1)).all()
    assert elbo.nfe == 1500 and coupled.nfe == 2 * 600 + 1
    # The same ELBO that nll_bound estimates (its conditional form, prompt clean).
    ids, real = torch.cat([PROMPT, COMPLETION], 1), torch.cat([torch.ones_like(PROMPT), COMPLETION_MASK], 1)
    scored = torch.cat([torch.zeros_like(PROMPT), COMPLETION_MASK], 1).bool()
    bound = model.nll_bound(ids, attention_mask=real, scored_mask=scored, num_time_samples=1500,
                            generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert ((-bound.nll - exact).abs() <= 4 * bound.nll_stderr).all()


@pytest.mark.parametrize("ell", [1, 2])
def test_the_elbo_is_the_true_log_likelihood_for_an_oracle_denoiser(ell, monkeypatch):
    """With the exact conditionals of a known distribution q as the network, the enumerated ELBO equals
    log q(completion | prompt): the bound is tight, so the estimators target the true log-likelihood."""
    vocab, length = 3, 4
    sequences, probs = random_distribution(vocab, length, seed=ell)
    model = tiny_model(num_sub_tokens=ell, time_conditioning=False, vocab_size=vocab, max_position_embeddings=8)

    def oracle(sub_ids, attention_mask=None, noise_level=None, positions=None, check_inputs=True):
        return oracle_logits(model.codec, sequences, probs, sub_ids, positions)

    monkeypatch.setattr(model, "token_logits", oracle)
    prompt, completion = sequences[[5, 40], :2], sequences[[5, 40], 2:]
    exact = exact_elbo(model, prompt, completion)
    for b in range(2):
        same_prompt = (sequences[:, :2] == prompt[b]).all(1)
        joint = probs[(sequences == torch.cat([prompt[b], completion[b]])).all(1)].sum()
        assert exact[b].item() == pytest.approx((joint / probs[same_prompt].sum()).log().item(), abs=1e-5)
    # Every reveal order has the same path probability q here, so the exact log-likelihood and the upper
    # bound's estimate (ψ = w = q) are log q as well.
    torch.testing.assert_close(exact_log_likelihood(model, prompt, completion), exact, rtol=0, atol=1e-5)
    upper = sequence_log_likelihood(model, prompt, completion, estimator="upper", num_samples=3,
                                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(upper.samples, exact.unsqueeze(1).expand(-1, 3), rtol=0, atol=1e-5)
    assert not upper.lower_bound


@pytest.mark.parametrize("ell", [1, 2])
def test_exact_log_likelihood_lies_between_the_elbo_and_the_upper_bound(ell):
    """The model's log-likelihood (every reveal order, by dynamic programming) is at least the enumerated ELBO
    (Jensen over orders), its gradient flows, and the tangent upper bound's mean lies above it: within 4 s.e.
    of it from below, and at most 4 s.e. plus a small gap (the bound is tight when ψ = π) above."""
    model = _model(ell)
    exact = exact_log_likelihood(model, PROMPT, COMPLETION, completion_mask=COMPLETION_MASK)
    with torch.no_grad():
        elbo = exact_elbo(model, PROMPT, COMPLETION, completion_mask=COMPLETION_MASK)
        upper = _estimate(model, "upper", 400)
    assert bool((elbo <= exact.detach() + 1e-9).all()) and bool((exact.detach() - elbo > 1e-5).all())
    gap = upper.log_likelihood - exact.detach()
    assert bool((gap >= -4 * upper.stderr).all()) and bool((gap <= 4 * upper.stderr + 1e-2).all()), gap
    assert upper.nfe == 3 * ell * 400  # N digits of the longest completion, per sample
    exact.sum().backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_d1_one_pass_is_the_fully_masked_token_log_likelihood():
    model = _model(2)
    with torch.no_grad():
        one = _estimate(model, "one_pass", 1)
        ids = torch.cat([PROMPT, COMPLETION], 1)
        real = torch.cat([torch.ones_like(PROMPT), COMPLETION_MASK], 1)
        sub = model.codec.encode(ids)
        sub[:, 2:] = torch.where(COMPLETION_MASK.bool().unsqueeze(-1), model.codec.mask_id, sub[:, 2:])
        log_probs = model.token_logits(sub, attention_mask=real).float().log_softmax(-1)  # (B, L, C)
        token = log_probs[:, 2:].gather(-1, COMPLETION.unsqueeze(-1)).squeeze(-1)
    expected = (token * COMPLETION_MASK).sum(1).double()
    assert torch.allclose(one.log_likelihood, expected, atol=1e-5)
    assert not one.lower_bound and one.nfe == 1 and one.stderr.isnan().all()


@pytest.mark.parametrize("estimator", ["elbo", "coupled"])
def test_the_gradient_is_unbiased_against_the_enumerated_gradient(estimator):
    """Projected on a fixed random direction v, the mean of single-sample gradient estimates is within 4 standard
    errors of the exact gradient of the enumerated ELBO (all parameters, ℓ = 2)."""
    model = _model(2)
    params = [p for p in model.parameters() if p.requires_grad]
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]

    def projected(value: torch.Tensor) -> float:
        grads = torch.autograd.grad(value.sum(), params, allow_unused=True)
        return sum(float((g * v).sum()) for g, v in zip(grads, direction) if g is not None)

    exact = projected(exact_elbo(model, PROMPT, COMPLETION, completion_mask=COMPLETION_MASK))
    generator = torch.Generator().manual_seed(3)
    draws = torch.tensor([
        projected(sequence_log_likelihood(model, PROMPT, COMPLETION, completion_mask=COMPLETION_MASK,
                                          estimator=estimator, num_samples=1, generator=generator).log_likelihood)
        for _ in range(500)
    ])  # fmt: skip
    stderr = draws.std() / 500**0.5
    assert abs(draws.mean() - exact) <= 4 * stderr, (draws.mean(), exact, stderr)
    assert stderr < 0.2 * abs(exact)  # the check has power: 4 s.e. is less than the gradient's size


def test_bad_inputs_are_refused_with_the_reason():
    model = _model(1)
    with pytest.raises(ValueError, match="prompt_attention_mask row 0 is not left-padded"):
        sequence_log_likelihood(model, PROMPT, COMPLETION, prompt_attention_mask=torch.tensor([[1, 0], [1, 1]]))
    with pytest.raises(ValueError, match="completion_mask row 1 is not right-padded"):
        sequence_log_likelihood(model, PROMPT, COMPLETION, completion_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))
    with pytest.raises(ValueError, match="19 positions, more than the model's canvas"):
        sequence_log_likelihood(model, PROMPT, torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown estimator 'vrpo'"):
        sequence_log_likelihood(model, PROMPT, COMPLETION, estimator="vrpo")
    with pytest.raises(ValueError, match="'coupled' needs a time-independent network"):
        sequence_log_likelihood(_model(1, time_conditioning=True), PROMPT, COMPLETION, estimator="coupled")
    with pytest.raises(ValueError, match="'upper' needs num_samples >= 2"):
        sequence_log_likelihood(model, PROMPT, COMPLETION, estimator="upper", num_samples=1)
    with pytest.raises(ValueError, match="reveal orders of a time-independent network"):
        exact_log_likelihood(_model(1, time_conditioning=True), PROMPT, COMPLETION)
    nine_tokens = torch.zeros(2, 9, dtype=torch.long)  # 18 digits at ℓ = 2: 2^18 sets are not enumerated
    for exact in (exact_elbo, exact_log_likelihood):
        with pytest.raises(ValueError, match=rf"{exact.__name__} enumerates 2\^N sets .* row 0 has N = 18, over 16"):
            exact(_model(2, carry_over=True), PROMPT, nine_tokens)
    genmd4 = _model(1, time_conditioning=True, noise_schedule="learnable_polynomial")
    with pytest.raises(ValueError, match="GenMD4 models .* none of these estimators applies"):
        sequence_log_likelihood(genmd4, PROMPT, COMPLETION)


def test_the_committed_estimator_table_is_the_guide_s():
    """docs/guides/rl.md shows exactly what the committed JSON renders to (numbers are never retyped)."""
    committed = json.loads((REPO / "benchmarks" / "results" / "rl_estimators.json").read_text())
    table = load_benchmark("rl_estimators").render_markdown(committed)
    assert table in (REPO / "docs" / "guides" / "rl.md").read_text(encoding="utf-8")
    assert (REPO / "benchmarks" / "results" / "rl_estimators.md").read_text(encoding="utf-8").strip() == table


@pytest.mark.slow
def test_the_estimator_benchmark_runs_small(tmp_path):
    report = load_benchmark("rl_estimators").main(
        ["--repeats", "3", "--num_time_samples", "1,2", "--output_dir", str(tmp_path)]
    )
    rows = report["rows"]
    assert {r["model"] for r in rows} == {"oracle ℓ=1", "oracle ℓ=2", "random ℓ=2", "reference ℓ=2"}
    assert {(r["estimator"], r["samples"]) for r in rows if r["model"] == "random ℓ=2"} == {
        ("elbo", 1), ("elbo", 2), ("coupled", 1), ("coupled", 2), ("one_pass", 1), ("upper", 2)}  # fmt: skip
    graded = [r for r in rows if not r["model"].startswith("oracle")]
    assert all(r["grad_rel_error"] >= 0 and -1 <= r["grad_cosine"] <= 1 for r in graded)
    assert (tmp_path / "rl_estimators.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "rl_estimators.md").read_text().strip() == load_benchmark("rl_estimators").render_markdown(
        report
    )
