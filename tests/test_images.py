"""Image models: pixel tokens, objectives, the valid bound against an exact NLL, generation, imputation, the image
sampler's knobs, and remote-code loading of saved image checkpoints in fresh processes on both transformers lines."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fresh_interpreter import interpreters
from modeling_mdm_prime import (
    MDMPrimeForImageDiffusion,
    MDMPrimeImageConfig,
    SubTokenCodec,
    pixels_from_unit_interval,
)
from modeling_mdm_prime.sampling_mdm_prime import warp_times


def image_config(**overrides) -> MDMPrimeImageConfig:
    settings = dict(
        num_channels=1,
        height=4,
        width=4,
        num_levels=17,
        num_sub_tokens=2,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        unet_model_channels=16,
        unet_channel_mult=(1, 2),
        unet_num_res_blocks=1,
        unet_attention_resolutions=(2,),
        unet_num_head_channels=8,
        unet_num_groups=4,
    )
    settings.update(overrides)
    return MDMPrimeImageConfig(**settings)


def image_model(**overrides) -> MDMPrimeForImageDiffusion:
    torch.manual_seed(0)
    return MDMPrimeForImageDiffusion(image_config(**overrides)).eval()


def random_images(config: MDMPrimeImageConfig, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, config.num_channels, config.height, config.width)
    return torch.randint(0, config.num_levels, shape, generator=gen)


class ImageOracle(MDMPrimeForImageDiffusion):
    """The exact conditionals p(x_d | y_t) of a known distribution over a list of images."""

    def __init__(self, config, images: torch.Tensor, probs: torch.Tensor):
        super().__init__(config)
        self.sequences = self.pixels_to_ids(images)  # (S, D)
        self.probs = probs

    def token_logits(self, sub_ids, attention_mask=None, noise_level=None, positions=None, check_inputs=True):
        allowed = self.codec.consistency_mask(sub_ids).double()  # (B, D, C)
        batch, length, levels = allowed.shape
        weight = self.probs.expand(batch, -1).clone()
        for d in range(length):
            weight *= allowed[:, d].index_select(1, self.sequences[:, d])
        marginals = torch.zeros(batch, length, levels, dtype=torch.float64)
        for d in range(length):
            marginals[:, d].index_add_(1, self.sequences[:, d], weight)
        logits = marginals.log().float()
        return logits if positions is None else logits[positions]


def oracle(levels: int, ell: int, seed: int = 0) -> ImageOracle:
    """Every 1 × 2 × 2 image with ``levels`` values, with skewed random probabilities."""
    config = image_config(
        height=2, width=2, num_levels=levels, num_sub_tokens=ell, hidden_size=8, num_attention_heads=1
    )
    gen = torch.Generator().manual_seed(seed)
    images = torch.cartesian_prod(*[torch.arange(levels)] * 4).view(-1, 1, 2, 2)
    probs = torch.rand(len(images), generator=gen).pow(4).double()
    return ImageOracle(config, images, probs / probs.sum()).eval()


# ------------------------------------------------------------------------------------------------------------------
# Tokens
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("levels", "ell"), [(17, 1), (17, 2), (256, 1), (256, 2), (256, 4), (256, 8)])
def test_pixel_codec_round_trip(levels, ell):
    model = image_model(num_levels=levels, num_sub_tokens=ell, num_channels=3, hidden_size=48 * ell)
    images = random_images(model.config, 3)
    images[0].fill_(levels - 1)
    images[1].zero_()
    ids = model.pixels_to_ids(images)
    # (row, column, channel) order: token (h·W + w)·C + c is channel c of pixel (h, w).
    c, h, w = 2, 3, 1
    assert int(ids[2, (h * 4 + w) * 3 + c]) == int(images[2, c, h, w])
    digits = model.codec.encode(ids)
    assert int(digits.max()) < model.codec.base
    assert torch.equal(model.ids_to_pixels(model.codec.decode(digits)), images)
    if levels == 256 and ell in (2, 4, 8):
        assert model.codec.base**ell == 256  # the paper's exact splits: b = 16, 4, 2, no invalid codes


def test_pixels_are_rounded_not_truncated():
    x = torch.tensor([0.0, 0.999, 254.6 / 255, 1.0])
    assert pixels_from_unit_interval(x).tolist() == [0, 255, 255, 255]
    assert pixels_from_unit_interval(torch.tensor([0.5]), num_levels=17).tolist() == [8]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pixels_from_unit_interval(torch.tensor([1.5]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(backbone="vit"), "backbone"),
        (dict(num_channels=3, hidden_size=32), "divisible by num_channels"),
        (dict(hidden_size=24, num_attention_heads=4), "divisible by 4"),
        (dict(backbone="unet", unet_model_channels=15), "unet_model_channels"),
        (dict(num_levels=17, vocab_size=18), "vocab_size"),
        (dict(height=0), "height"),
        (dict(num_classes=-1), "num_classes"),
        (dict(loss_type="mse"), "loss_type"),
        (dict(noise_schedule="learnable_polynomial", num_sub_tokens=1, time_conditioning=True), "text models"),
    ],
)
def test_bad_image_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        image_config(**overrides)


def test_bad_pixel_inputs_are_refused():
    model = image_model()
    with pytest.raises(ValueError, match="integer levels"):
        model(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 4, 4\)"):
        model(torch.zeros(2, 1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 17\)"):
        model(torch.full((2, 1, 4, 4), 17))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(2, 1, 4, 4, dtype=torch.long), class_labels=torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------------------------------
# Objectives and the bound
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["transformer", "unet"])
@pytest.mark.parametrize("ell", [1, 2])
def test_objectives_train_both_backbones(backbone, ell):
    model = image_model(backbone=backbone, num_sub_tokens=ell).train()
    images = random_images(model.config, 4)
    for loss_type in ("elbo", "prime", "cross_entropy"):
        model.config.loss_type = loss_type
        out = model(images, generator=torch.Generator().manual_seed(0))
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert (out.elbo is None) == (loss_type == "cross_entropy")
        model.zero_grad()
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    bound = model.nll_bound(images, num_time_samples=4, generator=torch.Generator().manual_seed(0))
    dims = model.config.num_pixel_tokens
    assert torch.allclose(bound.bits_per_dim, bound.nll / (dims * math.log(2)))
    assert torch.allclose(bound.bits_per_dim_stderr, bound.nll_stderr / (dims * math.log(2)))


def test_zero_initialised_unet_gives_closed_form_objectives():
    """ADM zero-initialises the U-Net's output convolution: every logit is 0 at init, so the cross-entropy is
    log(levels) exactly, and for ℓ = 1 the count estimator's ELBO is Σ_masked log(levels) · N/k / N = log(levels)."""
    model = image_model(backbone="unet", num_sub_tokens=1, num_levels=17)
    images = random_images(model.config, 3)
    model.config.loss_type = "cross_entropy"
    assert model(images).loss.item() == pytest.approx(math.log(17), abs=1e-6)
    model.config.loss_type = "elbo"
    assert model(images).elbo.item() == pytest.approx(math.log(17), abs=1e-5)
    bound = model.nll_bound(images, num_time_samples=3)
    assert torch.allclose(bound.bits_per_dim, torch.full((3,), math.log2(17), dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize(("levels", "ell"), [(4, 2), (5, 2), (3, 1)])
def test_bound_with_an_oracle_denoiser_is_the_exact_nll(levels, ell):
    """With the exact conditionals the continuous-time NELBO equals -log p(x) (the bound is tight), so the
    Monte-Carlo estimate must agree with the enumerated NLL within 4 standard errors."""
    model = oracle(levels, ell)
    pick = torch.multinomial(model.probs.float(), 6, replacement=False, generator=torch.Generator().manual_seed(1))
    images = model.ids_to_pixels(model.sequences[pick])
    exact = -model.probs[pick].log()
    out = model.nll_bound(images, num_time_samples=256, generator=torch.Generator().manual_seed(0))
    z = (out.nll - exact) / out.nll_stderr
    assert bool((z.abs() < 4).all()), (out.nll, exact, out.nll_stderr)
    assert torch.allclose(out.bits_per_dim, exact / (4 * math.log(2)), atol=float(4 * out.bits_per_dim_stderr.max()))


# ------------------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["transformer", "unet"])
@pytest.mark.parametrize("strategy", ["ancestral", "confidence", "threshold"])
def test_generated_images_hold_valid_levels(backbone, strategy):
    # 17 levels with ℓ = 2: base 5, so 8 of the 25 digit pairs are invalid codes the filter must exclude.
    model = image_model(backbone=backbone, num_sub_tokens=2, num_levels=17)
    out = model.generate(num_images=5, seed=0, num_steps=8, strategy=strategy, return_dict_in_generate=True)
    assert out.images.shape == (5, 1, 4, 4) and out.images.dtype == torch.long
    assert int(out.images.min()) >= 0 and int(out.images.max()) < 17
    first = model.generate(num_images=2, seed=0, num_steps=8, strategy=strategy)
    assert torch.equal(first, out.images[:2])  # image i depends on the seed and i only


@pytest.mark.parametrize("strategy", ["ancestral", "confidence", "threshold", "predictor_corrector"])
def test_imputation_keeps_every_fixed_digit(strategy):
    model = image_model(num_levels=256, num_sub_tokens=2, num_channels=3, hidden_size=48)
    images = random_images(model.config, 3, seed=5)
    extra = dict(corrector=(16, 2)) if strategy == "predictor_corrector" else {}
    # The most significant digit of every pixel channel (the paper's sub-token imputation).
    out = model.generate(
        pixel_values=images, keep_digits=[True, False], seed=0, num_steps=16, strategy=strategy, **extra
    )
    assert torch.equal(out // 16, images // 16)
    assert not torch.equal(out, images)  # the least significant digits were sampled
    # A region: the left half of every image, all channels.
    region = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    region[..., :2] = True
    out = model.generate(pixel_values=images, keep_pixels=region, seed=0, num_steps=16, strategy=strategy, **extra)
    assert torch.equal(out[..., :2], images[..., :2])


@pytest.mark.slow
def test_imputation_samples_the_exact_conditional():
    """With an oracle, imputing the least significant digits given the most significant ones draws from
    p(x | kept digits): the empirical distribution of 3000 imputations is within the stated total-variation
    tolerance of the enumerated conditional. With 512 steps for 4 masked digits, two digits are rarely revealed in
    the same step (the only approximation of the ancestral sampler); idle steps cost no network call."""
    model = oracle(4, 2, seed=3)
    target = model.ids_to_pixels(model.sequences[int(model.probs.argmax())].unsqueeze(0))
    n = 3000
    out = model.generate(pixel_values=target.expand(n, -1, -1, -1), keep_digits=[True, False], seed=0, num_steps=512)
    assert torch.equal(out // 2, target.expand(n, -1, -1, -1) // 2)
    consistent = (model.sequences // 2 == model.pixels_to_ids(target) // 2).all(1)
    exact = torch.where(consistent, model.probs, torch.zeros_like(model.probs))
    exact = exact / exact.sum()
    ids = model.pixels_to_ids(out)
    index = (ids * torch.tensor([64, 16, 4, 1])).sum(1)  # the enumeration's order (cartesian_prod)
    empirical = torch.bincount(index, minlength=len(exact)).double() / n
    tv = 0.5 * (empirical - exact).abs().sum()
    assert tv < 0.05, tv  # 16 outcomes, n = 3000: the expected TV of an exact sampler is about 0.02


def test_class_conditional_generation_with_guidance():
    model = image_model(num_classes=3, backbone="transformer")
    torch.nn.init.normal_(model.model.class_embed.weight, std=1.0)  # distinct classes at init
    images = random_images(model.config, 4)
    loss = model.train()(images, class_labels=torch.tensor([0, 1, 2, 0])).loss
    assert torch.isfinite(loss)
    model.eval()
    plain = model.generate(class_labels=[0, 1, 2], seed=0, num_steps=8)
    assert plain.shape == (3, 1, 4, 4)
    guided = model.generate(class_labels=[0, 1, 2], guidance_scale=4.0, seed=0, num_steps=8)
    assert not torch.equal(plain, guided)
    # diffusers' convention: 1 is no guidance (the default), 0 the unconditional model (the null class).
    assert torch.equal(model.generate(class_labels=[0, 1, 2], guidance_scale=1.0, seed=0, num_steps=8), plain)
    null = model.generate(class_labels=[3, 3, 3], seed=0, num_steps=8)
    assert torch.equal(model.generate(class_labels=[0, 1, 2], guidance_scale=0.0, seed=0, num_steps=8), null)
    with pytest.raises(ValueError, match="class-conditional"):
        model.generate(num_images=2)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        model.generate(class_labels=[4])


def test_pil_output_and_bad_generate_arguments():
    model = image_model(num_channels=3, hidden_size=48)
    pictures = model.generate(num_images=2, seed=0, num_steps=4, output_type="pil")
    assert [p.mode for p in pictures] == ["RGB", "RGB"] and pictures[0].size == (4, 4)
    tensor = model.generate(num_images=2, seed=0, num_steps=4)
    assert pictures[0].getpixel((1, 2))[0] == round(int(tensor[0, 0, 2, 1]) * 255 / 16)
    for bad, message in (
        (dict(max_new_tokens=4), "text models"),
        (dict(num_images=0), "num_images"),
        (dict(keep_digits=[True, False]), "pixel_values"),
        (dict(output_type="np"), "output_type"),
        (dict(time_warp=(1, 2)), "time_warp"),
        (dict(temperature_schedule=(-1, 2, 1)), "positive temperature"),
        (dict(corrector=(1, 1), strategy="confidence"), "corrector"),
    ):
        with pytest.raises(ValueError, match=message):
            model.generate(**bad)


# ------------------------------------------------------------------------------------------------------------------
# The paper's sampler knobs
# ------------------------------------------------------------------------------------------------------------------


def test_time_warp_matches_the_reference_formula():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    tau = 1 - t  # the reference code's time
    for a, e, c in ((1.0, 1.7, 0.0), (1.2, 2.0, 0.2)):
        reference = 1 - (1 - a * (1 - tau) ** e + c)  # τ' = 1 - a(1 - τ)^e + c, back in this package's t
        expected = reference.clamp(0, 1)
        expected[0], expected[-1] = 0.0, 1.0
        assert torch.allclose(warp_times(t, (a, e, c)), expected)


def test_knobs_reduce_to_the_plain_sampler():
    model = image_model()
    base = dict(num_images=4, seed=3, num_steps=8)
    plain = model.generate(**base, temperature=0.7)
    # A constant temperature schedule (a = 0) is the standard temperature; a zero-rate corrector is ancestral.
    assert torch.equal(model.generate(**base, temperature_schedule=(0.0, 1.0, 0.7)), plain)
    assert torch.equal(model.generate(**base, temperature=0.7, corrector=(0.0, 2.0)), plain)
    assert torch.equal(model.generate(**base, temperature=0.7, time_warp=(1.0, 0.0, 0.0)), plain)  # e = 0: none
    warped = model.generate(**base, temperature=0.7, time_warp=(1.0, 1.7, 0.0))
    assert not torch.equal(warped, plain)


def test_corrector_remasks_and_still_finishes():
    model = image_model(num_levels=256, num_sub_tokens=2, num_channels=1, hidden_size=32)
    history = model.generate(
        num_images=2, seed=0, num_steps=16, corrector=(16, 2), return_dict_in_generate=True, output_history=True
    ).history
    masked = torch.stack([h == model.codec.mask_id for h in history])  # (steps, B, D, ℓ)
    remasked = ~masked[:-1] & masked[1:]
    assert int(remasked.sum()) > 0  # revealed digits were masked again by later steps
    assert not bool(masked[-1].any())
    same = model.generate(num_images=2, seed=0, num_steps=16, corrector=(16, 2), use_idle_cache=False)
    assert torch.equal(same, model.generate(num_images=2, seed=0, num_steps=16, corrector=(16, 2)))


# ------------------------------------------------------------------------------------------------------------------
# Saved checkpoints, remote code
# ------------------------------------------------------------------------------------------------------------------

IMAGE_LOADER = r"""
import json, sys
sys.modules["modeling_mdm_prime"] = None  # only the checkpoint's code
import torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

path, work = sys.argv[1], sys.argv[2]
inputs = load_file(f"{work}/inputs.safetensors")
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
out = model.generate(num_images=3, seed=0, return_dict_in_generate=True)
bound = model.nll_bound(inputs["images"], num_time_samples=4, generator=torch.Generator().manual_seed(0))
imputed = model.generate(pixel_values=inputs["images"], keep_digits=[True, False], seed=1)
save_file(
    {"images": out.images, "bpd": bound.bits_per_dim, "imputed": imputed},
    f"{work}/out.safetensors",
)
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
report = {"class": type(model).__name__, "config": type(config).__name__, "num_steps": out.num_steps}
print(json.dumps({**report, "transformers": transformers.__version__}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("python,version", list(interpreters()))
@pytest.mark.parametrize("backbone", ["unet", "transformer"])
def test_image_checkpoint_loads_with_only_its_code(tmp_path, python, version, backbone, fresh_python):
    model = image_model(backbone=backbone, num_levels=256, num_sub_tokens=2)
    torch.nn.init.normal_(model.model.embed_sub_tokens.weight)
    if backbone == "unet":  # leave the zero init, so the network's output is not trivially uniform
        torch.nn.init.normal_(model.model.unet.out_conv.weight, std=0.05)
    model.generation_config.num_steps = 6
    model.save_pretrained(tmp_path / "ckpt")
    saved = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "unet_mdm_prime.py"} <= saved
    assert "modeling_image_mdm_prime.py" in saved and not any(name.endswith(".bin") for name in saved)
    images = random_images(model.config, 2)
    save_file({"images": images}, tmp_path / "inputs.safetensors")
    result = fresh_python(python, IMAGE_LOADER, [tmp_path / "ckpt", tmp_path], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["transformers"].startswith(version)
    assert report == {**report, "class": "MDMPrimeForImageDiffusion", "config": "MDMPrimeImageConfig", "num_steps": 6}
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["images"], model.generate(num_images=3, seed=0))
    assert torch.equal(out["imputed"], model.generate(pixel_values=images, keep_digits=[True, False], seed=1))
    bound = model.nll_bound(images, num_time_samples=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["bpd"], bound.bits_per_dim, atol=1e-5)


def test_image_codec_is_the_text_codec():
    model = image_model(num_levels=17, num_sub_tokens=2)
    assert isinstance(model.codec, SubTokenCodec) and model.codec.base == 5 and model.codec.num_codes == 25


# ------------------------------------------------------------------------------------------------------------------
# The committed image reference checkpoint
# ------------------------------------------------------------------------------------------------------------------

DIGITS_REFERENCE = Path(__file__).resolve().parents[1] / "checkpoints" / "mdm-prime-digits-tiny"
# The options its card was rendered with (docs/guides/images.md has the command).
DIGITS_CARD_OPTIONS = dict(
    license="apache-2.0", training_data="scikit-learn's 8 × 8 digits (1,437 training images; BSD-3-Clause)"
)


def test_digits_reference_checkpoint_is_complete_current_and_small():
    from modeling_mdm_prime import check_checkpoint, render_model_card, shipped_code_files

    files = set(check_checkpoint(DIGITS_REFERENCE))
    assert {"samples.png", "metrics.json", "eval_images.json", "unet_mdm_prime.py"} <= files
    package = Path(__file__).resolve().parents[1] / "modeling_mdm_prime"
    code = shipped_code_files(DIGITS_REFERENCE)
    assert {p.name for p in package.glob("*_mdm_prime.py")} == set(code)  # an image checkpoint ships all nine
    stale = [n for n in code if (DIGITS_REFERENCE / n).read_bytes() != (package / n).read_bytes()]
    assert not stale, f"{stale} differ from modeling_mdm_prime/; copy them into {DIGITS_REFERENCE}"
    card = render_model_card(DIGITS_REFERENCE, "checkpoints/mdm-prime-digits-tiny", **DIGITS_CARD_OPTIONS)
    assert (DIGITS_REFERENCE / "README.md").read_text(encoding="utf-8") == str(card)
    assert sum(p.stat().st_size for p in DIGITS_REFERENCE.iterdir()) < 6 * 2**20
    metrics = json.loads((DIGITS_REFERENCE / "metrics.json").read_text())
    assert metrics["val/bpd"] < math.log2(17) - 1.5  # well below the uniform model's log2(17) = 4.09 bits
