"""Mixed precision and compilation on CPU: the network may run in bf16 / fp16 under autocast, but the bound terms
are computed in float32 from the network's logits, the sampler's categorical draws in float64, SDPA gets no dense
mask when nothing is padded, and a torch.compile'd backbone agrees with eager."""

import pytest
import torch

import modeling_mdm_prime.estimators_mdm_prime as estimators
import modeling_mdm_prime.modeling_mdm_prime as modeling
import modeling_mdm_prime.sampling_mdm_prime as sampling
from conftest import tiny_model
from modeling_mdm_prime import diffusion_terms, genmd4_integrand, sample_categorical
from modeling_mdm_prime.modeling_mdm_prime import key_padding_mask


def autocast_cases() -> list:
    """(device, dtype): bf16 and fp16 on CPU (fp16 skipped with the reason where this torch's CPU autocast refuses
    it), and on CUDA when a GPU is present (benchmarks/gpu_suite.sh)."""
    params = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        params.append(pytest.param("cpu", torch.float16, id="cpu-fp16"))
    except (RuntimeError, ValueError) as err:
        params.append(pytest.param("cpu", torch.float16, id="cpu-fp16", marks=pytest.mark.skip(f"CPU fp16: {err}")))
    if torch.cuda.is_available():
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            params.append(pytest.param("cuda", dtype, id=f"cuda-{name}"))
    return params


@pytest.mark.parametrize(("device", "dtype"), autocast_cases())
@pytest.mark.parametrize("ell", [1, 3])
def test_autocast_loss_is_finite_and_its_terms_are_float32(device, dtype, ell, monkeypatch):
    """The network's logits come out in the low precision; diffusion_terms returns float32 terms equal to the
    float32 computation on those same logits outside autocast (so no op inside it was downcast); the loss and its
    gradients are finite."""
    model = tiny_model(num_sub_tokens=ell).train().to(device)
    calls = []

    def spy(logits, targets, masked, codec, carry_over=True):
        out = diffusion_terms(logits, targets, masked, codec, carry_over)
        calls.append((logits.detach(), targets, masked, out[0].detach(), out[1].detach()))
        return out

    monkeypatch.setattr(estimators, "diffusion_terms", spy)
    ids = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device, dtype=dtype):
        out = model(ids, generator=torch.Generator(device).manual_seed(1))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.dtype == out.elbo.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    (logits, targets, masked, valid, prime), *_ = calls
    assert logits.dtype == dtype  # the network did run in low precision
    assert valid.dtype == prime.dtype == torch.float32
    ref_valid, ref_prime = diffusion_terms(logits.float(), targets, masked, model.codec, model.config.carry_over)
    torch.testing.assert_close(valid, ref_valid, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(prime, ref_prime, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("device", "dtype"), autocast_cases())
def test_autocast_bound_and_genmd4_integrand_stay_in_full_precision(device, dtype):
    """nll_bound under autocast returns float64 estimates; GenMD4's integrand (whose Σ_j w_j μ_j is a matrix
    product that autocast would run in low precision) equals its float32 value to float32 rounding."""
    model = tiny_model(num_sub_tokens=2).to(device)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(device, dtype=dtype):
        bound = model.nll_bound(ids, num_time_samples=2, generator=torch.Generator(device).manual_seed(0))
    assert bound.nll.dtype == torch.float64 and torch.isfinite(bound.nll).all()
    gen = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(64, 300, generator=gen) * 3, torch.randint(0, 300, (64,), generator=gen)
    powers = torch.rand(300, generator=gen) * 3 + 0.1
    logits, targets, powers = logits.to(device), targets.to(device), powers.to(device)
    with torch.autocast(device, dtype=dtype):
        low = genmd4_integrand(logits, targets, powers)
    torch.testing.assert_close(low, genmd4_integrand(logits, targets, powers), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("device", "dtype"), autocast_cases())
def test_autocast_generation_draws_in_float64_from_float32_scores(device, dtype, monkeypatch):
    """Under autocast, generate() hands the sampler float32 filtered log-probabilities and every categorical draw
    is an inverse CDF in float64: the returned probabilities equal a float64 softmax to 1e-12."""
    model = tiny_model(num_sub_tokens=2).to(device)
    seen = []

    def spy(log_probs, uniform, greedy=False, float64=True):
        tokens, probs = sample_categorical(log_probs, uniform, greedy, float64)
        seen.append((log_probs.dtype, uniform.dtype, probs.dtype))
        expected = torch.log_softmax(log_probs.double(), -1).gather(1, tokens.unsqueeze(1)).squeeze(1).exp()
        assert torch.allclose(probs, expected, rtol=1e-12, atol=1e-15)
        return tokens, probs

    monkeypatch.setattr(sampling, "sample_categorical", spy)
    with torch.autocast(device, dtype=dtype):
        out = model.generate(max_new_tokens=12, num_steps=6, num_return_sequences=2, seed=0)
    assert out.shape == (2, 12) and int(out.min()) >= 0 and int(out.max()) < 300
    assert seen and set(seen) == {(torch.float32, torch.float64, torch.float64)}


def test_sdpa_gets_no_dense_mask_unless_something_is_padded(monkeypatch):
    assert key_padding_mask(None, (2, 5)) is None
    assert key_padding_mask(torch.ones(2, 5, dtype=torch.long), (2, 5)) is None
    padded = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    mask = key_padding_mask(padded, (2, 5))
    assert mask.shape == (2, 1, 1, 5) and mask.dtype == torch.bool
    assert mask[0, 0, 0].tolist() == [True, True, True, False, False] and bool(mask[1].all())  # no NaN rows
    model = tiny_model(num_sub_tokens=2)
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 300, (2, 5))
    model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert len(masks) == 2 and all(m is None for m in masks)  # one per layer
    model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    assert masks[-1] is not None and masks[-1].shape == (2, 1, 1, 5)


@pytest.mark.slow
def test_compiled_backbone_matches_eager():
    """torch.compile (inductor, dynamic shapes) of the backbone: hidden states and the training loss's gradients
    agree with eager to float32 rounding, at two sequence lengths (one compiled graph for both)."""
    try:
        import torch._inductor.config  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.compile unavailable: {err}")
    model = tiny_model(num_sub_tokens=2, time_conditioning=True).train()
    eager = model.model
    compiled = torch.compile(eager, dynamic=True)
    for length in (12, 20):
        gen = torch.Generator().manual_seed(length)
        sub_ids = torch.randint(0, model.codec.mask_id + 1, (2, length, 2), generator=gen)
        level = torch.rand(2, generator=gen)
        try:
            got = compiled(sub_ids, noise_level=level).last_hidden_state
        except Exception as err:  # no C++ compiler or an unsupported platform: say so rather than fail
            if "compiler" in str(err).lower() or "InductorError" in type(err).__name__:
                pytest.skip(f"torch.compile cannot build kernels here: {type(err).__name__}: {str(err)[:200]}")
            raise
        want = eager(sub_ids, noise_level=level).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        got.square().mean().backward()
        grads = [p.grad.clone() for p in eager.parameters()]
        eager.zero_grad()
        want.square().mean().backward()
        for g, w in zip(grads, (p.grad for p in eager.parameters()), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)
        eager.zero_grad()
