"""Model behaviour: shapes, carry-over, padding, gradients and input validation."""

import pytest
import torch

from conftest import tiny_config, tiny_model
from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion


def test_training_forward_and_gradients():
    model = tiny_model().train()
    ids = torch.randint(0, 300, (4, 16))
    out = model(ids)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.allclose(out.loss.detach(), out.elbo)  # loss_type="elbo" trains on the valid bound
    assert out.num_tokens == 64 and out.timesteps is None  # time-independent: masks drawn by count
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    timed = tiny_model(time_conditioning=True).train()
    levels = []
    embed = timed.model.time_embed.forward
    timed.model.time_embed.forward = lambda noise: levels.append(noise) or embed(noise)
    out = timed(ids)
    # The count estimator for a time-conditioned network: the noise level given k masked of N elements is
    # Beta(k, N - k + 1), and k / N tracks it (mean k / (N + 1)).
    masked_fraction = torch.tensor([float(level) for level in levels[0]])
    assert (
        out.timesteps is None
        and levels[0].shape == (4,)
        and bool(((masked_fraction > 0) & (masked_fraction < 1)).all())
    )
    out.loss.backward()
    assert all(p.grad is not None for p in timed.parameters())
    prime_model = tiny_model(loss_type="prime")
    out = prime_model(ids, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.loss.detach(), out.paper_objective) and out.elbo is not None
    with pytest.warns(FutureWarning, match="now paper_objective"):
        assert out.prime_objective is out.paper_objective  # the old name, deprecated


def test_forward_is_reproducible_with_a_generator():
    model = tiny_model()
    ids = torch.randint(0, 300, (3, 12))
    a = model(ids, generator=torch.Generator().manual_seed(5)).loss
    b = model(ids, generator=torch.Generator().manual_seed(5)).loss
    assert torch.equal(a, b)


def test_single_sub_token_layout_is_md4():
    model = tiny_model(num_sub_tokens=1)
    assert model.codec.base == 300 and model.codec.mask_id == 300
    assert model.get_input_embeddings().weight.shape == (301, 48)  # ordinary embedding + mask row
    assert model.lm_head.out_features == 300  # no mask output
    ids = torch.randint(0, 300, (2, 8))
    sub_ids = model.codec.encode(ids)
    sub_ids[:, ::2] = model.codec.mask_id
    log_probs = model.denoise(sub_ids)
    # Carry-over: a revealed token keeps its value with probability 1.
    assert torch.allclose(log_probs[:, 1::2].gather(-1, ids[:, 1::2, None]), torch.zeros(2, 4, 1))


def test_denoise_consistency_filter():
    model = tiny_model()
    codec = model.codec
    ids = torch.randint(0, 300, (2, 10))
    sub_ids = codec.encode(ids)
    sub_ids[..., 1:] = codec.mask_id  # reveal only the most significant digit
    sub_ids[:, 0] = codec.mask_id  # first position fully masked
    probs = model.denoise(sub_ids).exp()
    assert torch.allclose(probs.sum(-1), torch.ones(2, 10), atol=1e-5)
    allowed = codec.consistency_mask(sub_ids)
    assert probs[~allowed].max() == 0
    assert bool((probs[:, 1:].argmax(-1) // codec.base**2 == ids[:, 1:] // codec.base**2).all())


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_padding_does_not_change_real_positions(side, time_conditioning):
    model = tiny_model(time_conditioning=time_conditioning)
    ids = torch.randint(0, 300, (2, 9))
    sub_ids = model.codec.encode(ids)
    sub_ids[torch.rand(sub_ids.shape) < 0.5] = model.codec.mask_id
    noise = torch.tensor([0.3, 0.7])
    reference = model.denoise(sub_ids, noise_level=noise)
    pad = torch.randint(0, model.codec.mask_id + 1, (2, 5, 3))  # garbage in padded slots
    padded = torch.cat([sub_ids, pad], 1) if side == "right" else torch.cat([pad, sub_ids], 1)
    mask = torch.ones(2, 14, dtype=torch.long)
    if side == "right":
        mask[:, 9:] = 0
    else:
        mask[:, :5] = 0
    out = model.denoise(padded, attention_mask=mask, noise_level=noise)
    real = out[:, :9] if side == "right" else out[:, 5:]
    # RoPE is relative, so left padding (a position shift) leaves real positions unchanged too.
    assert torch.allclose(real, reference, atol=1e-5)


def test_padding_and_labels_are_never_masked_or_scored():
    model = tiny_model()
    seen = {}
    original = model.token_logits

    def spy(sub_ids, attention_mask=None, noise_level=None, positions=None, **kwargs):
        seen["sub_ids"], seen["rows"] = sub_ids, positions
        return original(sub_ids, attention_mask, noise_level, positions, **kwargs)

    model.token_logits = spy
    ids = torch.randint(0, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt: conditioning only
    out = model(ids, attention_mask=mask, labels=labels, timesteps=torch.ones(2))
    assert out.num_tokens == 2 * 5
    clean = model.codec.encode(ids)
    assert torch.equal(seen["sub_ids"][:, :4], clean[:, :4])  # the prompt stays unmasked even at t = 1
    assert not seen["rows"][:, :4].any() and not seen["rows"][:, 9:].any()
    assert bool((seen["sub_ids"][:, 4:9] == model.codec.mask_id).all())


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 300, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(time_conditioning=True).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        loss = model(ids, generator=torch.Generator().manual_seed(3)).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_nll_bound_output():
    model = tiny_model()
    ids = torch.randint(0, 300, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    out = model.nll_bound(ids, attention_mask=mask, num_time_samples=4, generator=torch.Generator().manual_seed(0))
    assert out.nll.shape == out.nll_stderr.shape == out.paper_objective.shape == (3,)
    assert out.num_tokens.tolist() == [6, 10, 10]
    again = model.nll_bound(ids, attention_mask=mask, num_time_samples=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.nll, again.nll)
    discrete = model.nll_bound(ids, num_time_samples=2, num_steps=8)
    assert discrete.paper_objective is None and torch.isfinite(discrete.nll).all()
    with pytest.warns(FutureWarning, match="num_samples=...\\) is deprecated"):
        old_name = model.nll_bound(ids, attention_mask=mask, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(old_name.nll, out.nll)  # the deprecated name means the same draws


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_size=50, num_attention_heads=5), "not divisible by num_sub_tokens"),
        (dict(num_sub_tokens=10), "too many for vocab_size"),
        (dict(vocab_size=300, num_sub_tokens=8, hidden_size=48), r"too many for vocab_size=300.*<= 6"),
        (dict(polynomial_exponent=float("nan")), "polynomial_exponent must be a number"),
        (dict(rope_theta=-1.0), "rope_theta must be a positive number"),
        (dict(layer_norm_eps=-1.0), "layer_norm_eps must be a positive number"),
        (dict(noise_eps="0.1"), "noise_eps must be a number"),
        (dict(dropout=float("nan")), "dropout must be a number"),
        (dict(carry_over="yes"), "carry_over must be True or False"),
        (dict(hidden_size=48, num_attention_heads=5), "num_attention_heads"),
        (dict(hidden_size=24, num_attention_heads=8, num_sub_tokens=1), "must be even"),
        (dict(loss_type="nll"), "loss_type"),
        (dict(noise_schedule="sigmoid"), "noise_schedule"),
        (dict(noise_eps=1.0), "noise_eps"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(pad_token_id=300), "outside the vocabulary"),
        (dict(geometric_beta_min=30.0), "geometric"),
    ],
)
def test_impossible_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_bad_inputs_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        model(torch.tensor([[1, 2, 300]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        model.denoise(torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="mask id"):
        model.denoise(torch.full((1, 4, 3), 8))
    with pytest.raises(ValueError, match="match no token id"):
        model.denoise(torch.full((1, 4, 3), 6))  # 6*49 + 6*7 + 6 = 342 >= 300
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.tensor([[1, 2, 3]]), timesteps=torch.zeros(1))
    with pytest.raises(ValueError, match="timesteps must lie in"):
        model(torch.tensor([[1, 2, 3]]), timesteps=torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=r"timesteps must be a scalar or have shape \(2,\)"):
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), timesteps=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="num_time_samples must be a positive integer"):
        model.nll_bound(torch.tensor([[1, 2, 3]]), num_time_samples=2.5)
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        model.nll_bound(torch.tensor([[1, 2, 3]]), num_steps=2.5)
    with pytest.raises(ValueError, match="noise_level"):
        tiny_model(time_conditioning=True).denoise(torch.zeros(1, 4, 3, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="new model"):
        model.resize_token_embeddings(400)
    # Padding may hold any id, even one outside the vocabulary (e.g. an added [PAD]).
    out = model(torch.tensor([[1, 2, 999]]), attention_mask=torch.tensor([[1, 1, 0]]))
    assert out.num_tokens == 2


def test_config_round_trip(tmp_path):
    config = tiny_config(num_sub_tokens=2, noise_schedule="cosine", loss_type="prime", time_conditioning=True)
    config.save_pretrained(tmp_path)
    loaded = MDMPrimeConfig.from_pretrained(tmp_path)
    for key in ("num_sub_tokens", "noise_schedule", "loss_type", "time_conditioning", "hidden_size", "auto_map"):
        assert getattr(loaded, key) == getattr(config, key)
    assert set(loaded.auto_map) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM"}
    model = MDMPrimeForMaskedDiffusion(loaded)
    assert model.model.time_embed is not None


def test_config_and_codec_share_one_rule_for_the_number_of_sub_tokens():
    from modeling_mdm_prime import SubTokenCodec

    for vocab in (2, 3, 7, 8, 9, 100, 256, 300, 1000):
        for ell in range(1, 12):
            try:
                SubTokenCodec(vocab, ell)
                codec_ok = True
            except ValueError:
                codec_ok = False
            try:
                MDMPrimeConfig(vocab_size=vocab, num_sub_tokens=ell, hidden_size=2 * ell, num_attention_heads=1)
                config_ok = True
            except ValueError:
                config_ok = False
            assert codec_ok == config_ok, (vocab, ell)


def test_nll_bound_evaluates_in_eval_mode_and_restores_the_mode():
    model = tiny_model(dropout=0.3)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    evaluated = model.nll_bound(ids, num_time_samples=4, generator=torch.Generator().manual_seed(1)).nll
    model.train()
    in_train_mode = model.nll_bound(ids, num_time_samples=4, generator=torch.Generator().manual_seed(1)).nll
    assert torch.equal(evaluated, in_train_mode) and model.training


def test_geometric_time_conditioned_model_has_finite_losses_near_t_0():
    model = tiny_model(time_conditioning=True, noise_schedule="geometric")
    ids = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    for t in (1e-7, 1e-4, 1e-3, 1.0):
        assert torch.isfinite(model(ids, timesteps=torch.full((4,), t)).loss)
    out = model.nll_bound(ids, num_time_samples=64, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(out.nll).all() and torch.isfinite(out.nll_stderr).all())
    assert bool(torch.isfinite(model.nll_bound(ids, num_time_samples=8, num_steps=4096).nll).all())
