"""The ADM-style U-Net backbone of the image models (modeling_mdm_prime/unet_mdm_prime.py)."""

import pytest
import torch
import torch.utils.checkpoint
from transformers import PretrainedConfig, PreTrainedModel

from modeling_mdm_prime.unet_mdm_prime import (
    MDMPrimeUNet,
    MDMPrimeUNetAttention,
    MDMPrimeUNetResBlock,
    _checkpoint,
    init_unet_weights,
)

TINY = dict(
    in_channels=8,
    out_channels=6,
    model_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_head_channels=8,
    dropout=0.0,
    image_size=(8, 8),
    num_groups=4,
)

# The MDM-Prime CIFAR-10 / ImageNet-32 network (images.md): 3 channels x 96-wide embeddings in, 3 x 256 levels out.
CIFAR = dict(
    in_channels=3 * 96,
    out_channels=3 * 256,
    model_channels=96,
    channel_mult=(3, 4, 4),
    num_res_blocks=5,
    attention_resolutions=(16,),
    num_head_channels=64,
    dropout=0.4,
    image_size=(32, 32),
    cond_dim=None,
)
# A 28 x 28 single-channel (MNIST-sized) network: levels at 28 / 14 / 7 px, attention at 14 px (and in the middle).
MNIST = dict(
    in_channels=64,
    out_channels=256,
    model_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(14,),
    num_head_channels=64,
    dropout=0.1,
    image_size=(28, 28),
)


def tiny_unet(**overrides) -> MDMPrimeUNet:
    torch.manual_seed(0)
    return MDMPrimeUNet(**{**TINY, **overrides})


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Overwrite every parameter with N(0, 0.2²) so that no branch is dead (the zero init hides wiring bugs)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def inputs(model: MDMPrimeUNet, batch: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, model.in_channels, *model.image_size, dtype=dtype)


# --- independent parameter count from the layer shapes --------------------------------------------------------------


def conv_params(c_in: int, c_out: int, kernel: int) -> int:
    return c_in * c_out * kernel * kernel + c_out


def res_block_params(c_in: int, c_out: int, cond_dim: int | None, scale_shift: bool) -> int:
    n = 2 * c_in + conv_params(c_in, c_out, 3) + 2 * c_out + conv_params(c_out, c_out, 3)
    if c_in != c_out:
        n += conv_params(c_in, c_out, 1)
    if cond_dim is not None:
        n += (cond_dim + 1) * (2 if scale_shift else 1) * c_out
    return n


def attention_params(c: int) -> int:
    return 2 * c + (c + 1) * 3 * c + (c + 1) * c


def expected_parameter_count(
    in_channels,
    out_channels,
    model_channels,
    channel_mult,
    num_res_blocks,
    attention_resolutions,
    image_size,
    cond_dim=None,
    use_scale_shift_norm=True,
    **_,
) -> int:
    """ADM layout from its description: input conv (unless the widths match), per level ``n`` blocks down and
    ``n + 1`` blocks up on concatenated skips, strided / upsampling convs between levels, a middle block, a head."""
    widths = [model_channels * m for m in channel_mult]

    def res(c_in, c_out):
        return res_block_params(c_in, c_out, cond_dim, use_scale_shift_norm)

    total = 0 if in_channels == widths[0] else conv_params(in_channels, widths[0], 3)
    c, height, kept = widths[0], image_size[0], [widths[0]]
    for level, w in enumerate(widths):
        for _ in range(num_res_blocks):
            total += res(c, w) + (attention_params(w) if height in attention_resolutions else 0)
            c = w
            kept.append(c)
        if level < len(widths) - 1:
            total += conv_params(c, c, 3)
            kept.append(c)
            height //= 2
    total += 2 * res(c, c) + attention_params(c)
    for level in reversed(range(len(widths))):
        w = widths[level]
        for i in range(num_res_blocks + 1):
            total += res(c + kept.pop(), w) + (attention_params(w) if height in attention_resolutions else 0)
            c = w
            if level > 0 and i == num_res_blocks:
                total += conv_params(c, c, 3)
                height *= 2
    assert not kept and height == image_size[0]
    return total + 2 * c + conv_params(c, out_channels, 3)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- shapes and layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(image_size=(8, 12)),  # non-square
        dict(image_size=(12, 8), attention_resolutions=(6,)),  # attention placed by height
        dict(in_channels=3),  # with an input conv
        dict(channel_mult=(1, 2, 2), image_size=(12, 4), attention_resolutions=(12, 3)),
        dict(cond_dim=5),
    ],
)
def test_output_shape(overrides):
    model = randomise(tiny_unet(**overrides)).eval()
    x = inputs(model)
    cond = None if model.cond_dim is None else torch.randn(3, model.cond_dim)
    out = model(x, cond)
    assert out.shape == (3, model.out_channels, *model.image_size)
    assert torch.isfinite(out).all()
    assert (model.input_conv is None) == (model.in_channels == TINY["model_channels"] * 1)


def test_attention_and_blocks_where_documented():
    model = tiny_unet(channel_mult=(1, 2, 2), image_size=(8, 8), attention_resolutions=(8,), num_res_blocks=2)
    # Down: 2 blocks per level (+ attention at 8 px on level 0); up: 3 per level (+ attention at 8 px on level 0).
    assert sum(stage.res is not None for stage in model.down) == 3 * 2
    assert sum(stage.res is not None for stage in model.up) == 3 * 3
    assert sum(stage.attn is not None for stage in model.down) == 2
    assert sum(stage.attn is not None for stage in model.up) == 3
    assert [stage.attn is not None for stage in model.up][-3:] == [True, True, True]
    assert sum(isinstance(m, MDMPrimeUNetAttention) for m in model.modules()) == 2 + 3 + 1  # + middle
    assert not any(m.cond_proj is not None for m in model.modules() if isinstance(m, MDMPrimeUNetResBlock))


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=-1), "out_channels"),
        (dict(model_channels=2.5), "model_channels"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(num_head_channels=0), "num_head_channels"),
        (dict(num_groups=0), "num_groups"),
        (dict(cond_dim=0), "cond_dim"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(channel_mult=(1, 0)), "channel_mult"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(image_size=(8,)), "image_size"),
        (dict(image_size=(8, 0)), "image_size"),
        (dict(image_size=(6, 8), channel_mult=(1, 2, 2)), "divisible by 2\\*\\*\\(len\\(channel_mult\\) - 1\\) = 4"),
        (dict(image_size=(8, 10), channel_mult=(1, 2, 2)), "divisible"),
        (dict(attention_resolutions=(5,)), "attention_resolutions \\[5\\] match no level"),
        (dict(attention_resolutions=(8,), image_size=(4, 8)), "match no level"),  # height, not width
        (dict(num_groups=3), "num_groups=3 must divide every level width"),
        (dict(model_channels=6, in_channels=6), "num_groups=4 must divide"),  # 6 / 4
        (dict(num_head_channels=16, attention_resolutions=(8,)), "num_head_channels=16 must divide"),  # 8-wide level
        (dict(num_head_channels=32, attention_resolutions=()), "middle block"),  # middle attention at width 16
    ],
)
def test_constructor_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        MDMPrimeUNet(**{**TINY, **overrides})


def test_forward_validation():
    model = tiny_unet()
    with pytest.raises(ValueError, match="x must have shape \\(batch, 8, 8, 8\\)"):
        model(torch.randn(2, 7, 8, 8))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 8, 8, 16))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(8, 8, 8))
    with pytest.raises(ValueError, match="cond_dim=None"):
        model(torch.randn(2, 8, 8, 8), torch.randn(2, 4))
    conditioned = tiny_unet(cond_dim=4)
    with pytest.raises(ValueError, match="cond must have shape \\(batch, cond_dim\\) = \\(2, 4\\), got None"):
        conditioned(torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match="got \\(3, 4\\)"):
        conditioned(torch.randn(2, 8, 8, 8), torch.randn(3, 4))


# --- initialisation and training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [dict(), dict(in_channels=3, dropout=0.3), dict(cond_dim=4)])
def test_zero_output_at_init_then_learns(overrides):
    model = tiny_unet(**overrides).train()
    x = inputs(model)
    cond = None if model.cond_dim is None else torch.randn(3, model.cond_dim)
    assert torch.equal(model(x, cond), torch.zeros(3, model.out_channels, *model.image_size))
    target = torch.randn(3, model.out_channels, *model.image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    (model(x, cond) - target).square().mean().backward()
    optimizer.step()
    assert model(x, cond).abs().min() > 0
    model.reset_parameters()
    assert torch.equal(model(x, cond), torch.zeros_like(target))


def test_every_parameter_receives_gradient():
    """With no zero-initialised layer, every parameter (attention, FiLM, skips, resampling) affects the output."""
    model = randomise(tiny_unet(in_channels=3, cond_dim=4, channel_mult=(1, 2, 2), attention_resolutions=(8, 4)))
    model(inputs(model), torch.randn(3, 4)).square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


@pytest.mark.parametrize("use_scale_shift_norm", [True, False])
def test_cond_modulates_the_output(use_scale_shift_norm):
    """FiLM layers keep PyTorch's default init (as in ADM): cond acts as soon as training moves the zero-initialised
    residual convs, which takes two steps (the first step only reaches the output conv)."""
    model = tiny_unet(cond_dim=4, use_scale_shift_norm=use_scale_shift_norm).train()
    x, cond_a, cond_b = inputs(model, batch=2), torch.randn(2, 4), torch.randn(2, 4)
    target = torch.randn(2, model.out_channels, *model.image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        (model(x, cond_a) - target).square().mean().backward()
        optimizer.step()
    assert (model(x, cond_a) - model(x, cond_b)).abs().max() > 1e-4
    # And the gradient reaches cond itself (callers learn their time / class embeddings through it).
    cond = cond_a.clone().requires_grad_()
    model(x, cond).sum().backward()
    assert cond.grad.abs().sum() > 0


def test_batch_independence():
    """Row i of the output depends on row i of x (and of cond) only: GroupNorm and attention are per-sample."""
    model = randomise(tiny_unet(cond_dim=4, dropout=0.5)).double().eval()
    x = inputs(model, batch=4, dtype=torch.float64).requires_grad_()
    cond = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    out = model(x, cond)
    out[1].sum().backward()
    others = [0, 2, 3]
    assert torch.equal(x.grad[others], torch.zeros_like(x.grad[others]))
    assert torch.equal(cond.grad[others], torch.zeros_like(cond.grad[others]))
    assert x.grad[1].abs().sum() > 0 and cond.grad[1].abs().sum() > 0
    single = model(x[1:2], cond[1:2])
    torch.testing.assert_close(single[0], out[1], rtol=1e-12, atol=1e-12)


# --- gradient checkpointing -------------------------------------------------------------------------------------


def _forward_backward(model, x, cond, seed=7):
    torch.manual_seed(seed)  # the dropout masks
    x = x.clone().requires_grad_()
    model.zero_grad()
    out = model(x, cond)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def _count_checkpoint_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


def _num_checkpointed_blocks(model) -> int:
    return sum(isinstance(m, (MDMPrimeUNetResBlock, MDMPrimeUNetAttention)) for m in model.modules())


def test_gradient_checkpointing_matches_plain_forward(monkeypatch):
    model = randomise(tiny_unet(cond_dim=4, dropout=0.3, in_channels=3)).double().train()
    x, cond = inputs(model, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    plain = _forward_backward(model, x, cond)
    calls = _count_checkpoint_calls(monkeypatch)
    assert not model.gradient_checkpointing
    model.gradient_checkpointing = True
    assert model.gradient_checkpointing
    checkpointed = _forward_backward(model, x, cond)
    assert calls[0] == _num_checkpointed_blocks(model) > 0
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(checkpointed[1], plain[1], rtol=1e-12, atol=1e-12)
    assert checkpointed[2].keys() == plain[2].keys()
    for name in plain[2]:
        torch.testing.assert_close(checkpointed[2][name], plain[2][name], rtol=1e-12, atol=1e-12, msg=name)
    # Not in eval mode or without gradients: nothing to recompute.
    calls[0] = 0
    model.eval()
    model(x, cond)
    model.train()
    with torch.no_grad():
        model(x, cond)
    assert calls[0] == 0
    model.gradient_checkpointing = False
    model(x, cond)
    assert calls[0] == 0 and not model.gradient_checkpointing


class _Holder(PreTrainedModel):
    """The smallest PreTrainedModel around the U-Net, as the image model will hold it."""

    config_class = PretrainedConfig
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        self.backbone = tiny_unet(dropout=0.3)
        self.post_init()

    def _init_weights(self, module):
        if not init_unet_weights(module):
            super()._init_weights(module)

    def forward(self, x):
        return self.backbone(x)


def test_inside_a_pretrained_model(tmp_path):
    """The documented ``_init_weights`` hook keeps the zero init under ``post_init``, and ``from_pretrained`` then
    restores saved weights exactly (the reset goes through the ``torch.nn.init`` functions that loading guards)."""
    holder = _Holder(PretrainedConfig())
    x = inputs(holder.backbone)
    assert torch.equal(holder(x), torch.zeros(3, holder.backbone.out_channels, *holder.backbone.image_size))
    randomise(holder).save_pretrained(tmp_path)
    loaded = _Holder.from_pretrained(tmp_path)
    for (name, saved), (loaded_name, restored) in zip(holder.state_dict().items(), loaded.state_dict().items()):
        assert name == loaded_name and torch.equal(saved, restored), name


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_transformers_gradient_checkpointing_enable(use_reentrant):
    holder = _Holder(PretrainedConfig()).double().train()
    randomise(holder)
    x = inputs(holder.backbone, dtype=torch.float64)
    plain = _forward_backward(holder.backbone, x, None)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(holder, "activation_checkpointing_enable"):  # transformers 5 renamed it
        holder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        holder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert holder.backbone.gradient_checkpointing
    # transformers installs its own checkpoint function on every block; count the calls through it.
    calls = [0]
    for block in holder.backbone.modules():
        if isinstance(block, (MDMPrimeUNetResBlock, MDMPrimeUNetAttention)):
            assert block.gradient_checkpointing and block._gradient_checkpointing_func is not _checkpoint

            def counting(*args, _installed=block._gradient_checkpointing_func, **kw):
                calls[0] += 1
                return _installed(*args, **kw)

            block._gradient_checkpointing_func = counting
    checkpointed = _forward_backward(holder.backbone, x, None)
    assert calls[0] == _num_checkpointed_blocks(holder.backbone)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    for name in plain[2]:
        torch.testing.assert_close(checkpointed[2][name], plain[2][name], rtol=1e-12, atol=1e-12, msg=name)
    getattr(holder, "activation_checkpointing_disable", holder.gradient_checkpointing_disable)()
    assert not holder.backbone.gradient_checkpointing


# --- the paper's configurations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        CIFAR,
        {**CIFAR, "in_channels": 3},  # raw pixels in: adds the 3x3 input conv
        {**CIFAR, "cond_dim": 384},  # time / class conditioned variant
        {**CIFAR, "cond_dim": 384, "use_scale_shift_norm": False},
        MNIST,
    ],
)
def test_parameter_count_matches_layer_formula(config):
    with torch.device("meta"):
        model = MDMPrimeUNet(**config)
        cond = None if config.get("cond_dim") is None else torch.empty(2, config["cond_dim"])
        out = model(torch.empty(2, config["in_channels"], *config["image_size"]), cond)
    assert out.shape == (2, config["out_channels"], *config["image_size"])
    assert parameter_count(model) == expected_parameter_count(**config)


def test_cifar_configuration():
    """The MDM-Prime CIFAR-10 / ImageNet-32 U-Net: no input conv (288 embedding channels feed level 0 directly),
    widths 288 / 384 / 384, attention at 16 px (5 down, 6 up, 1 middle; 6 heads of 64), no conditioning layers.
    Its size is dominated by the 3x3 convs (~18·w² per residual block), which puts it near 120M parameters."""
    with torch.device("meta"):
        model = MDMPrimeUNet(**CIFAR)
    assert model.input_conv is None
    attention = [m for m in model.modules() if isinstance(m, MDMPrimeUNetAttention)]
    assert len(attention) == 12 and {m.num_heads for m in attention} == {6}
    assert not any(m.cond_proj is not None for m in model.modules() if isinstance(m, MDMPrimeUNetResBlock))
    count = parameter_count(model)
    assert 100e6 < count < 130e6
    assert f"{count:,}" in MDMPrimeUNet.__doc__
    with torch.device("meta"):
        assert f"{parameter_count(MDMPrimeUNet(**MNIST)):,}" in MDMPrimeUNet.__doc__
