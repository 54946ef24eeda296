"""transformers' attention interface: ``attn_implementation`` chooses SDPA, eager attention or a registered kernel,
through a saved checkpoint and ``from_pretrained`` as users arrive. (The fresh-process load with the package not
importable, on transformers 5.x and 4.57, is in test_remote_code.py.)"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from modeling_mdm_prime import MDMPrimeForMaskedDiffusion


@pytest.fixture(scope="module")
def checkpoint(saved_checkpoint):
    return saved_checkpoint.path


def padded_inputs(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    sub_ids = model.codec.encode(ids)
    sub_ids[torch.rand(sub_ids.shape, generator=gen) < 0.5] = model.codec.mask_id
    return ids, mask, sub_ids


def test_default_is_sdpa_and_eager_agrees(checkpoint):
    sdpa = MDMPrimeForMaskedDiffusion.from_pretrained(checkpoint).eval()
    eager = MDMPrimeForMaskedDiffusion.from_pretrained(checkpoint, attn_implementation="eager").eval()
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    ids, mask, sub_ids = padded_inputs(sdpa)
    expected = sdpa.denoise(sub_ids, attention_mask=mask)
    got = eager.denoise(sub_ids, attention_mask=mask)
    real = mask.bool()
    # Padded positions are excluded: their outputs are not defined by either implementation's contract.
    assert torch.allclose(got[real], expected[real], atol=1e-5, equal_nan=True)
    loss_sdpa = sdpa(ids, attention_mask=mask, generator=torch.Generator().manual_seed(3)).loss
    loss_eager = eager(ids, attention_mask=mask, generator=torch.Generator().manual_seed(3)).loss
    assert torch.allclose(loss_eager, loss_sdpa, atol=1e-5)
    assert torch.equal(sdpa.generate(ids[:1, :4], seed=0), eager.generate(ids[:1, :4], seed=0))


def test_eager_attention_ignores_padding_and_returns_weights(checkpoint):
    """The eager weights of a real query put exactly zero mass on padded keys and sum to one."""
    model = MDMPrimeForMaskedDiffusion.from_pretrained(checkpoint, attn_implementation="eager").eval()
    ids, mask, sub_ids = padded_inputs(model)
    captured = []
    attention = model.model.layers[0].attn
    original = attention.attention_function

    def spy():
        function = original()

        def wrapped(*args, **kwargs):
            out, weights = function(*args, **kwargs)
            captured.append(weights)
            return out, weights

        return wrapped

    attention.attention_function = spy
    model.denoise(sub_ids, attention_mask=mask)
    (weights,) = captured  # (B, H, L, L)
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-6)
    for row in range(len(mask)):
        assert torch.all(weights[row][..., ~mask[row].bool()] == 0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attention_is_bidirectional(checkpoint, implementation):
    """Without a padding mask transformers' SDPA function would be causal unless the module says otherwise: a change
    to the last token must reach the first position's output."""
    model = MDMPrimeForMaskedDiffusion.from_pretrained(checkpoint, attn_implementation=implementation).eval()
    ids, _, sub_ids = padded_inputs(model)
    changed = sub_ids.clone()
    changed[:, -1] = model.codec.encode((ids[:, -1] + 1) % model.config.vocab_size)  # another, fully revealed token
    first = model.denoise(sub_ids)[:, 0]
    assert not torch.allclose(model.denoise(changed)[:, 0], first, equal_nan=True)


def test_registered_attention_function_is_used(checkpoint):
    calls = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append({"shape": tuple(query.shape), "is_causal": kwargs.get("is_causal"), "mask": attention_mask})
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("mdm_prime_test_recording", recording_attention)
    model = MDMPrimeForMaskedDiffusion.from_pretrained(checkpoint, attn_implementation="mdm_prime_test_recording")
    reference = MDMPrimeForMaskedDiffusion.from_pretrained(checkpoint).eval()
    model.eval()
    ids, mask, sub_ids = padded_inputs(model)
    out = model.denoise(sub_ids, attention_mask=mask)
    heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    assert len(calls) == model.config.num_hidden_layers
    for call in calls:
        assert call["shape"] == (3, heads, 12, head_dim) and call["is_causal"] is False
        assert call["mask"].dtype == torch.bool and call["mask"].shape == (3, 1, 1, 12)
    assert torch.allclose(out, reference.denoise(sub_ids, attention_mask=mask), atol=1e-6, equal_nan=True)
    calls.clear()
    model.denoise(sub_ids)  # nothing padded: no mask at all, so SDPA may use its fused kernels
    assert all(call["mask"] is None for call in calls) and len(calls) == model.config.num_hidden_layers


def test_set_attn_implementation_switches_at_runtime(checkpoint, monkeypatch):
    model = MDMPrimeForMaskedDiffusion.from_pretrained(checkpoint).eval()
    _, mask, sub_ids = padded_inputs(model)
    sdpa_calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    expected = model.denoise(sub_ids, attention_mask=mask)
    assert len(sdpa_calls) == model.config.num_hidden_layers
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    got = model.denoise(sub_ids, attention_mask=mask)
    assert len(sdpa_calls) == model.config.num_hidden_layers  # no further SDPA call
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention", "no_such_kernel"])
def test_unsupported_implementations_are_refused(checkpoint, implementation):
    with pytest.raises((ValueError, ImportError, KeyError), match="(?i)flash|flex|not supported|not a valid"):
        MDMPrimeForMaskedDiffusion.from_pretrained(checkpoint, attn_implementation=implementation)
