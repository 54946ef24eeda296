"""Conversion of MDLM / MDM-Prime checkpoints (modeling_mdm_prime.tools.convert), checked against an independent
reference implementation of their DiT forward pass written from ../shared/spec/conversion.md: constant adaLN kept
unfolded, bias-free LayerNorm in float32, rotate-half RoPE, explicit attention, σ = 0 conditioning."""

import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import GPT2_TOKENIZER
from fresh_interpreter import interpreters
from modeling_mdm_prime.tools import check_checkpoint
from modeling_mdm_prime.tools.convert import (
    convert_checkpoint,
    dit_parameter_names,
    load_lightning_checkpoint,
    restricted_torch_load,
)

omegaconf = pytest.importorskip("omegaconf")  # the test extra: real OmegaConf objects in the .ckpt

VOCAB = 50257  # GPT-2: the converted model uses its tokenizer
D, HEADS, BLOCKS, COND, FREQ, LENGTH = 32, 4, 2, 16, 256, 64
TOKENIZER = str(GPT2_TOKENIZER.parent)
# A float32 forward pass against the float32 reference: up to 1.3e-5 measured (ℓ = 2 raw weights, torch 2.13 CPU),
# from rounding in different reduction orders. The fold itself is checked to ~1e-14 in float64.
FLOAT32_TOLERANCE = 5e-5


# -- the reference DiT ----------------------------------------------------------------------------------------------


def base_of(ell: int) -> int:
    b = 2
    while b**ell < VOCAB:
        b += 1
    return b


def reference_logits(w: dict, sub_ids: torch.Tensor) -> torch.Tensor:
    """MDLM / MDM-Prime DiT, ``(B, L, ℓ)`` digits -> raw logits ``(B, L, rows of output_layer.linear)``.

    x = concat_j E[y_j];  c = SiLU(mlp(emb(0)));  per block, (shift1, scale1, gate1, shift2, scale2, gate2) = A c + a,
    x += gate1 · W_out attn(rope(W_qkv (LN(x) w1 (1 + scale1) + shift1))),
    x += gate2 · mlp(LN(x) w2 (1 + scale2) + shift2);  logits = W (LN(x) wf (1 + scale) + shift) + bias.
    """
    batch, length, _ = sub_ids.shape
    x = w["vocab_embed.embedding"][sub_ids].reshape(batch, length, -1)
    dtype = x.dtype
    sigma = torch.zeros(batch, dtype=dtype)
    half = FREQ // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype) / half)
    t_emb = torch.cat([torch.cos(sigma[:, None] * freqs), torch.sin(sigma[:, None] * freqs)], dim=-1)
    hidden = F.silu(t_emb @ w["sigma_map.mlp.0.weight"].T + w["sigma_map.mlp.0.bias"])
    c = F.silu(hidden @ w["sigma_map.mlp.2.weight"].T + w["sigma_map.mlp.2.bias"])  # (B, cond)
    head_dim = D // HEADS
    # The source computes the rotary angles in float32 (its inv_freq buffer), whatever the weights' dtype.
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # (L, head_dim)

    def rope(t):  # (B, L, H, head_dim), GPT-NeoX rotate-half
        first, second = t[..., : head_dim // 2], t[..., head_dim // 2 :]
        return t * cos[None, :, None] + torch.cat([-second, first], -1) * sin[None, :, None]

    def norm(t, weight):  # LayerNorm without bias, in float32 (or wider, for the float64 check)
        return F.layer_norm(t.to(torch.promote_types(t.dtype, torch.float32)), [D]) * weight

    for n in range(BLOCKS):
        p = f"blocks.{n}."
        mod = c @ w[p + "adaLN_modulation.weight"].T + w[p + "adaLN_modulation.bias"]
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in mod.chunk(6, dim=-1))
        h = norm(x, w[p + "norm1.weight"]) * (1 + scale1) + shift1
        q, k, v = (h @ w[p + "attn_qkv.weight"].T).view(batch, length, 3, HEADS, head_dim).unbind(2)
        q, k = rope(q), rope(k)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(head_dim)
        att = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(batch, length, D)
        x = x + gate1 * (att @ w[p + "attn_out.weight"].T)
        h = norm(x, w[p + "norm2.weight"]) * (1 + scale2) + shift2
        mlp = F.gelu(h @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"], approximate="tanh")
        x = x + gate2 * (mlp @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"])
    shift, scale = (
        m[:, None]
        for m in (c @ w["output_layer.adaLN_modulation.weight"].T)
        .add(w["output_layer.adaLN_modulation.bias"])
        .chunk(2, dim=-1)
    )
    h = norm(x, w["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return h @ w["output_layer.linear.weight"].T + w["output_layer.linear.bias"]


def reference_log_probs(w: dict, sub_ids: torch.Tensor, ell: int, carry_over: bool) -> torch.Tensor:
    """Log-softmax over the C real tokens (the MASK row removed), restricted to the tokens whose base-b digits
    (most significant first) agree with the revealed ones when carry_over is on."""
    logits = reference_logits(w, sub_ids)[..., :VOCAB]
    if carry_over:
        b = base_of(ell)
        tokens = torch.arange(VOCAB)
        digits = torch.stack([(tokens // b ** (ell - 1 - j)) % b for j in range(ell)], -1)  # (C, ℓ)
        revealed = sub_ids != b  # (B, L, ℓ)
        agree = (digits[None, None] == sub_ids[:, :, None]) | ~revealed[:, :, None]  # (B, L, C, ℓ)
        logits = logits.masked_fill(~agree.all(-1), float("-inf"))
    return logits.log_softmax(-1)


# -- synthetic checkpoints ------------------------------------------------------------------------------------------


def dit_weights(ell: int, seed: int, mask_row: bool) -> dict:
    """Random DiT weights whose adaLN modulation is far from the identity (scales and shifts of order 1)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    w = {
        "vocab_embed.embedding": rand(base_of(ell) + 1, D // ell),
        "sigma_map.mlp.0.weight": rand(COND, FREQ, std=0.2),
        "sigma_map.mlp.0.bias": rand(COND, std=0.5),
        "sigma_map.mlp.2.weight": rand(COND, COND, std=0.5),
        "sigma_map.mlp.2.bias": rand(COND, std=0.5),
    }
    for n in range(BLOCKS):
        p = f"blocks.{n}."
        w[p + "norm1.weight"] = 1 + rand(D, std=0.3)
        w[p + "attn_qkv.weight"] = rand(3 * D, D, std=D**-0.5)
        w[p + "attn_out.weight"] = rand(D, D, std=D**-0.5)
        w[p + "norm2.weight"] = 1 + rand(D, std=0.3)
        w[p + "mlp.0.weight"] = rand(4 * D, D, std=D**-0.5)
        w[p + "mlp.0.bias"] = rand(4 * D, std=0.1)
        w[p + "mlp.2.weight"] = rand(D, 4 * D, std=(4 * D) ** -0.5)
        w[p + "mlp.2.bias"] = rand(D, std=0.1)
        w[p + "adaLN_modulation.weight"] = rand(6 * D, COND, std=0.3)
        w[p + "adaLN_modulation.bias"] = rand(6 * D, std=0.5)
    rows = VOCAB + 1 if mask_row else VOCAB
    w["output_layer.norm_final.weight"] = 1 + rand(D, std=0.3)
    w["output_layer.linear.weight"] = rand(rows, D, std=0.2 * D**-0.5)  # logits of order 1, as in a trained LM
    w["output_layer.linear.bias"] = rand(rows, std=0.1)
    w["output_layer.adaLN_modulation.weight"] = rand(2 * D, COND, std=0.3)
    w["output_layer.adaLN_modulation.bias"] = rand(2 * D, std=0.5)
    return w


def inv_freq() -> torch.Tensor:
    return 1.0 / 10000.0 ** (torch.arange(0, D // HEADS, 2, dtype=torch.float32) / (D // HEADS))


def write_mdlm(folder: Path, weights: dict, **config_overrides) -> Path:
    folder.mkdir(parents=True)
    config = {
        "model_type": "mdlm",
        "vocab_size": VOCAB + 1,
        "model_length": LENGTH,
        "hidden_dim": D,
        "cond_dim": COND,
        "n_blocks": BLOCKS,
        "n_heads": HEADS,
        "dropout": 0.1,
        "time_conditioning": False,
        "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig", "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
    }
    config.update(config_overrides)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {f"backbone.{k}": v.contiguous() for k, v in weights.items()}
    tensors["backbone.rotary_emb.inv_freq"] = inv_freq()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


class StandInTokenizer:
    """Plays the pickled tokenizer object of hyper_parameters: the converter must never need to import it."""

    def __init__(self):
        self.name_or_path = "gpt2"


class Hostile:
    """Unpickling this creates a marker file (builtins.open): the restricted loader must not run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_ckpt(path: Path, ell: int, carry_over: bool, raw: dict, ema: dict, *, extra=None, **config_overrides):
    config = {
        "diffusion": "absorbing_state",
        "parameterization": "subs",
        "time_conditioning": False,
        "T": 0,
        "model": {
            "hidden_size": D,
            "cond_dim": COND,
            "length": LENGTH,
            "n_blocks": BLOCKS,
            "n_heads": HEADS,
            "dropout": 0.1,
            "scale_by_sigma": True,
        },
        "prime": {
            "target_length": ell,
            "base": base_of(ell),
            "vocab_size": VOCAB,
            "seq_length": LENGTH,
            "carry_over": carry_over,
        },
        "loader": {"batch_size": "${div_up:${.global_batch_size}, 8}"},
    }
    for key, value in config_overrides.items():
        config[key] = value
    # The raw state_dict in an order unlike the parameters' (sorted, buffers in between); the EMA list in
    # trainable-parameter order, with different values.
    state = {f"backbone.{k}": v for k, v in raw.items()}
    state["backbone.rotary_emb.inv_freq"] = inv_freq()
    state["subtokenizer.mask"] = torch.tensor([base_of(ell) ** (ell - 1 - j) for j in range(ell)])
    checkpoint = {
        "epoch": 3,
        "global_step": 1000,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": OrderedDict(sorted(state.items(), reverse=True)),
        "ema": {
            "decay": 0.9999,
            "num_updates": 1000,
            "shadow_params": [ema[n] for n in dit_parameter_names(BLOCKS)],
            "collected_params": [],
        },
        "hyper_parameters": {"config": omegaconf.OmegaConf.create(config), "tokenizer": StandInTokenizer()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3e-4}]}],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
        **(extra or {}),
    }
    torch.save(checkpoint, path)
    return path


def masked_inputs(ell: int, seed: int = 0) -> torch.Tensor:
    """``(2, 12, ℓ)`` digits of random tokens with about half of the digits masked (mask id b)."""
    g = torch.Generator().manual_seed(seed)
    b = base_of(ell)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    digits = torch.stack([(ids // b ** (ell - 1 - j)) % b for j in range(ell)], -1)
    masked = torch.rand(digits.shape, generator=g) < 0.5
    return digits.masked_fill(masked, b)


def compare(model, weights: dict, ell: int, carry_over: bool) -> float:
    """Max |Δ| of the finite log-probabilities; the -inf patterns must agree exactly."""
    sub_ids = masked_inputs(ell)
    got = model.denoise(sub_ids)
    want = reference_log_probs(weights, sub_ids, ell, carry_over)
    assert got.shape == want.shape == (2, 12, VOCAB)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    return (got[finite] - want[finite]).abs().max().item()


def load(folder: Path):
    from modeling_mdm_prime import MDMPrimeForMaskedDiffusion

    return MDMPrimeForMaskedDiffusion.from_pretrained(folder).eval()


# -- tests ----------------------------------------------------------------------------------------------------------


def test_modulation_is_far_from_identity():
    """The fold is exercised: scales, shifts and gates are of order 1, not the adaLN-Zero start."""
    w = dit_weights(1, seed=0, mask_row=True)
    c = F.silu(
        F.silu(
            torch.cat([torch.ones(FREQ // 2), torch.zeros(FREQ // 2)]) @ w["sigma_map.mlp.0.weight"].T
            + w["sigma_map.mlp.0.bias"]
        )
        @ w["sigma_map.mlp.2.weight"].T
        + w["sigma_map.mlp.2.bias"]
    )
    mod = c @ w["blocks.0.adaLN_modulation.weight"].T + w["blocks.0.adaLN_modulation.bias"]
    shift, scale, gate = mod.chunk(6)[:3]
    assert shift.abs().mean() > 0.3 and scale.abs().mean() > 0.3 and (gate - 1).abs().mean() > 0.3


@pytest.mark.parametrize("ell", [1, 2, 4])
def test_fold_is_exact_in_float64(ell):
    """In float64 the converted network and the unfolded reference agree to rounding (~1e-14): the fold is exact,
    and the float32 differences below are float32 rounding only."""
    from modeling_mdm_prime.tools.convert import SourceCheckpoint, convert_source

    w = {k: v.double() for k, v in dit_weights(ell, seed=30 + ell, mask_row=ell == 1).items()}
    source = SourceCheckpoint(w, VOCAB, ell, True, D, BLOCKS, HEADS, COND, LENGTH, 0.1)
    model = convert_source(source)
    assert model.dtype == torch.float64
    sub_ids = masked_inputs(ell)
    diff = (model.token_logits(sub_ids) - reference_logits(w, sub_ids)[..., :VOCAB]).abs().max().item()
    print(f"float64 ℓ={ell}: max |Δ logit| = {diff:.1e}")
    assert diff < 1e-10


def test_mdlm_folder_matches_reference(tmp_path):
    weights = dit_weights(1, seed=1, mask_row=True)
    source = write_mdlm(tmp_path / "mdlm", weights)
    out = convert_checkpoint(source, tmp_path / "out", tokenizer=TOKENIZER)
    model = load(out)
    diff = compare(model, weights, ell=1, carry_over=True)
    print(f"MDLM ℓ=1 max |Δ log p| = {diff:.2e}")
    assert diff < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["num_sub_tokens"] == 1 and config["hidden_size"] == D
    assert config["dropout"] == 0.1 and config["embedding_dropout"] == 0.0 and config["max_position_embeddings"] == 64
    assert config["bos_token_id"] == config["eos_token_id"] == 50256
    assert model.model.dropout.p == 0.0 and model.model.layers[0].dropout.p == 0.1
    # A publishable folder: check_checkpoint passes; the card names the source, its licence and the conversion.
    check_checkpoint(out)
    card = (out / "README.md").read_text()
    assert "## Conversion" in card and source.name in card and str(source) not in card and "folded" in card
    record = json.loads((out / "conversion.json").read_text())
    assert record["dropped_mask_row"] is True and len(record["source"]["sha256"]["model.safetensors"]) == 64


@pytest.mark.parametrize(("ell", "carry_over"), [(1, True), (2, False), (4, True)])
def test_ckpt_uses_ema_and_matches_reference(tmp_path, ell, carry_over):
    raw = dit_weights(ell, seed=10 + ell, mask_row=ell == 1)
    ema = dit_weights(ell, seed=20 + ell, mask_row=ell == 1)
    path = write_ckpt(tmp_path / "checkpoint.ckpt", ell, carry_over, raw, ema)
    out = convert_checkpoint(path, tmp_path / "out", tokenizer=TOKENIZER, license="apache-2.0")
    model = load(out)
    assert model.config.num_sub_tokens == ell and model.config.carry_over is carry_over
    diff = compare(model, ema, ell, carry_over)
    print(f"MDM-Prime .ckpt ℓ={ell} carry_over={carry_over}: max |Δ log p| vs EMA reference = {diff:.2e}")
    assert diff < FLOAT32_TOLERANCE
    # The raw weights give a different function: the EMA list, not the state_dict, was converted.
    sub_ids = masked_inputs(ell)
    away = (model.denoise(sub_ids) - reference_log_probs(raw, sub_ids, ell, carry_over)).nan_to_num(0, 0, 0)
    assert away.abs().max() > 0.1
    # Also filtered explicitly (the package's consistency filter = the reference's digit agreement).
    if not carry_over:
        got = model.denoise(sub_ids, consistency_filter=True)
        want = reference_log_probs(ema, sub_ids, ell, True)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert (got - want)[torch.isfinite(want)].abs().max() < FLOAT32_TOLERANCE
    raw_model = load(convert_checkpoint(path, tmp_path / "raw", tokenizer=TOKENIZER, use_ema=False))
    assert compare(raw_model, raw, ell, carry_over) < FLOAT32_TOLERANCE
    assert "EMA" in json.loads((out / "conversion.json").read_text())["source"]["weights"]


def test_restricted_loader_stubs_objects_and_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    ema = dit_weights(2, seed=3, mask_row=False)
    path = write_ckpt(tmp_path / "hostile.ckpt", 2, True, ema, ema, extra={"payload": Hostile(str(marker))})
    assert not marker.exists()
    loaded = load_lightning_checkpoint(path)
    assert not marker.exists()  # the hostile global was stubbed
    assert loaded.num_sub_tokens == 2 and loaded.carry_over is True and loaded.hidden_size == D
    assert "restricted" in loaded.description["unpickler"]
    stub = restricted_torch_load(path)["payload"]
    assert type(stub).__name__ == "open" and not marker.exists()
    # The opt-in really unpickles: the same file then runs its code.
    restricted_torch_load(path, allow_unsafe_pickle=True)
    assert marker.exists()


def _mdlm_refusal(tmp_path, weights=None, **overrides):
    source = write_mdlm(tmp_path / "src", weights or dit_weights(1, seed=5, mask_row=True), **overrides)
    return convert_checkpoint(source, tmp_path / "out", tokenizer=TOKENIZER)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"time_conditioning": True}, "time-conditioned DiT"),
        ({"time_conditioning": None}, "time_conditioning=None"),
        ({"model_type": "duo"}, "uniform-state"),
        ({"diffusion": "uniform"}, "uniform-state"),
        ({"model_type": "bd3lm", "block_size": 4}, "block-causal BD3-LM"),
        ({"n_blocks": 3}, "unknown key set"),
        ({"hidden_dim": 48, "n_heads": 4}, "shape mismatch"),
        ({"vocab_size": 1001}, "50258 rows; expected vocab_size = 1000"),
        ({"model_type": "llama"}, "model_type 'llama'"),
    ],
)
def test_mdlm_refusals(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _mdlm_refusal(tmp_path, **overrides)


def test_mdlm_refuses_unknown_keys_and_missing_flag(tmp_path):
    weights = dit_weights(1, seed=5, mask_row=True)
    with pytest.raises(ValueError, match=r"unknown key set.*blocks.0.extra.weight"):
        _mdlm_refusal(tmp_path / "a", {**weights, "blocks.0.extra.weight": torch.zeros(2)})
    source = write_mdlm(tmp_path / "b" / "src", weights)
    config = json.loads((source / "config.json").read_text())
    del config["time_conditioning"]
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not say whether the model is time conditioned"):
        convert_checkpoint(source, tmp_path / "b" / "out", tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="not empty"):
        convert_checkpoint(source, tmp_path / "b", tokenizer=TOKENIZER)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("time_conditioning", "time-conditioned DiT"),
        ("sedd", "parameterization 'sedd'"),
        ("short_ema", "ema.shadow_params has"),
        ("permuted", "non-identity permutation"),
        ("wrong_base", "prime.base"),
    ],
)
def test_ckpt_refusals(tmp_path, case, message):
    w = dit_weights(2, seed=7, mask_row=False)
    overrides, extra = {}, None
    if case == "time_conditioning":
        overrides["time_conditioning"] = True
    if case == "sedd":
        overrides["parameterization"] = "sedd"
    if case == "wrong_base":
        overrides["prime"] = {"target_length": 2, "base": 300, "vocab_size": VOCAB, "carry_over": True}
    path = write_ckpt(tmp_path / "c.ckpt", 2, True, w, w, extra=extra, **overrides)
    if case in ("short_ema", "permuted"):
        ckpt = torch.load(path, weights_only=False)
        if case == "short_ema":
            ckpt["ema"]["shadow_params"] = ckpt["ema"]["shadow_params"][:-1]
        else:
            ckpt["state_dict"]["subtokenizer.perm"] = torch.randperm(base_of(2) ** 2)
        torch.save(ckpt, path)
    with pytest.raises(ValueError, match=message):
        load_lightning_checkpoint(path)


def test_tokenizer_must_fit(tmp_path):
    w = dit_weights(1, seed=8, mask_row=True)
    source = write_mdlm(tmp_path / "src", w)
    shakespeare = Path(__file__).resolve().parents[1] / "checkpoints" / "mdm-prime-shakespeare-tiny"
    with pytest.raises(ValueError, match="the tokenizer has"):
        convert_checkpoint(source, tmp_path / "out", tokenizer=str(shakespeare))


def test_cli(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import convert_checkpoint as cli
    finally:
        sys.path.pop(0)
    source = write_mdlm(tmp_path / "src", dit_weights(1, seed=9, mask_row=True))
    assert cli.main([str(source), str(tmp_path / "out"), "--tokenizer", TOKENIZER]) == 0
    assert "Converted" in capsys.readouterr().out
    assert cli.main([str(source), str(tmp_path / "out"), "--tokenizer", TOKENIZER]) == 1
    assert "not empty" in capsys.readouterr().err


LOADER = r"""
import json, sys
sys.modules["modeling_mdm_prime"] = None  # only the checkpoint's code
import torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

path, work = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # 5.x reads config.json first
sub_ids = load_file(f"{work}/inputs.safetensors")["sub_ids"]
batch = tokenizer(["The quick brown"], return_tensors="pt")
out = model.generate(**batch, max_new_tokens=6, num_steps=6, seed=0)
save_file({"log_probs": model.denoise(sub_ids), "generated": out}, f"{work}/out-{transformers.__version__}.safetensors")
print(json.dumps({"transformers": transformers.__version__, "class": type(model).__name__,
                  "text": tokenizer.decode(out[0]), "shape": list(out.shape)}))
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    w = dit_weights(2, seed=11, mask_row=False)
    path = write_ckpt(root / "checkpoint.ckpt", 2, True, w, w)
    out = convert_checkpoint(path, root / "out", tokenizer=TOKENIZER)
    sub_ids = masked_inputs(2, seed=4)
    save_file({"sub_ids": sub_ids}, str(root / "inputs.safetensors"))
    return root, out, load(out).denoise(sub_ids)


@pytest.mark.slow
@pytest.mark.parametrize(("python", "version"), list(interpreters()))
def test_converted_loads_with_remote_code(converted, python, version, fresh_python):
    root, out, expected = converted
    result = fresh_python(python, LOADER, [out, root], cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["transformers"].startswith(version) and report["class"] == "MDMPrimeForMaskedDiffusion"
    assert report["shape"] == [1, 9] and report["text"].startswith("The quick brown")
    outputs = load_file(str(root / f"out-{report['transformers']}.safetensors"))
    assert torch.allclose(outputs["log_probs"], expected, atol=1e-6, equal_nan=True)
