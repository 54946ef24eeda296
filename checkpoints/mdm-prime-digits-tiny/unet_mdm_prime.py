"""ADM-style U-Net backbone for MDM-Prime image models.

The image model embeds every sub-token of a pixel with one shared table and concatenates them per pixel, giving a
feature map ``(B, in_channels, H, W)``; this network maps it to per-pixel logits ``(B, out_channels, H, W)``.
The layout follows the ablated diffusion model (ADM) U-Net of Dhariwal & Nichol (2021): residual blocks with
GroupNorm + SiLU, multi-head self-attention at chosen resolutions, strided-conv downsampling and nearest-neighbour +
conv upsampling, skip connections concatenated on the way up, and zero-initialised last layers so that every
residual branch and the output start at zero.

Conditioning is optional. MDM-Prime's image model is time-independent (``cond_dim=None``): its blocks carry no
conditioning layers. With ``cond_dim`` set, a vector built by the caller (a time embedding, a class embedding or
their sum) modulates every residual block through scale-shift norm (FiLM).

Parameter names and layout are this package's own; published ADM / MDM-Prime weights need a key and qkv-layout map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def _checkpoint(function, *args):
    """Default checkpoint function for a block used outside a ``PreTrainedModel`` (which installs its own)."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


class MDMPrimeUNetGroupNorm(nn.GroupNorm):
    """GroupNorm computed in at least float32 (half-precision statistics are too coarse), returned in x's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


class MDMPrimeUNetResBlock(GradientCheckpointingLayer):
    """Residual block ``(B, C_in, H, W) -> (B, C_out, H, W)``.

    ``h = conv3x3(SiLU(GN(x)))``; then, with conditioning ``c`` and scale-shift norm,
    ``h = GN(h) · (1 + s) + b`` with ``(s, b) = Linear(SiLU(c))``, or with additive conditioning
    ``h = GN(h + Linear(SiLU(c)))``; then ``out = skip(x) + conv3x3(Dropout(SiLU(h)))``.
    The last conv is zero-initialised (the block starts as the skip path); ``skip`` is the identity when
    ``C_in == C_out`` and a 1x1 conv otherwise.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout: float,
        num_groups: int,
        cond_dim: int | None = None,
        use_scale_shift_norm: bool = True,
    ):
        super().__init__()
        self.norm1 = MDMPrimeUNetGroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.use_scale_shift_norm = use_scale_shift_norm
        if cond_dim is None:
            self.cond_proj = None
        else:
            self.cond_proj = nn.Linear(cond_dim, (2 if use_scale_shift_norm else 1) * out_channels)
        self.norm2 = MDMPrimeUNetGroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x ``(B, C_in, H, W)``, cond ``(B, cond_dim)`` or None -> ``(B, C_out, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.cond_proj is None:
            h = self.norm2(h)
        else:
            film = self.cond_proj(F.silu(cond))[:, :, None, None]
            if self.use_scale_shift_norm:
                scale, shift = film.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + film)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class MDMPrimeUNetAttention(GradientCheckpointingLayer):
    """Multi-head self-attention over the ``H·W`` positions, with a residual: ``(B, C, H, W) -> (B, C, H, W)``.

    ``out = x + W_o · MHA(W_qkv · GN(x))`` with ``C / head_channels`` heads of width ``head_channels`` and
    softmax scale ``1/√head_channels``; ``W_o`` is zero-initialised (the block starts as the identity).
    """

    def __init__(self, channels: int, head_channels: int, num_groups: int):
        super().__init__()
        self.num_heads = channels // head_channels
        self.norm = MDMPrimeUNetGroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        q, k, v = self.qkv(tokens).view(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H·W, head_channels)
        h = self.proj_out(h.transpose(1, 2).reshape(batch, height * width, channels))
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class MDMPrimeUNetDownsample(nn.Module):
    """3x3 conv with stride 2: ``(B, C, H, W) -> (B, C, H/2, W/2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MDMPrimeUNetUpsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MDMPrimeUNetStage(nn.Module):
    """One entry of the down or up path: an optional residual block, optional attention, optional resampling,
    applied in that order. On the way down every stage's output is kept as a skip connection."""

    def __init__(
        self,
        res: MDMPrimeUNetResBlock | None = None,
        attn: MDMPrimeUNetAttention | None = None,
        resample: nn.Module | None = None,
    ):
        super().__init__()
        self.res = res
        self.attn = attn
        self.resample = resample

    def forward(self, h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.res is not None:
            h = self.res(h, cond)  # positional: reentrant checkpointing only tracks positional tensors
        if self.attn is not None:
            h = self.attn(h)
        if self.resample is not None:
            h = self.resample(h)
        return h


def init_unet_weights(module: nn.Module) -> bool:
    """Initialise one layer of an :class:`MDMPrimeUNet` as designed; return False for any other module.

    PyTorch's default initialisation (as ADM), then zero for the last layer of every residual branch (residual block
    ``conv2``, attention ``proj_out``) and for the output conv. Everything goes through ``torch.nn.init``, which
    transformers guards while loading a checkpoint, so that loaded weights are never overwritten.
    """
    init = getattr(module, "_unet_init", None)
    if init is None:
        return False
    module.reset_parameters()
    if init == "zero":
        with torch.no_grad():
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
    return True


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


class MDMPrimeUNet(nn.Module):
    """ADM-style U-Net: features ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``.

    Layout, with ``L = len(channel_mult)`` levels at resolutions ``H, H/2, …, H/2^(L-1)`` and widths
    ``w_i = model_channels · channel_mult[i]``:

    - input: a 3x3 conv ``in_channels -> w_0``, or none when ``in_channels == w_0`` (``input_conv is None``): the
      MDM-Prime image model feeds its concatenated sub-token embeddings straight in.
    - down: per level ``num_res_blocks`` residual blocks (followed by attention where the level's height is in
      ``attention_resolutions``), then a stride-2 conv between levels. The input and every block's output are kept.
    - middle: residual block, attention, residual block at width ``w_{L-1}``.
    - up: per level (coarsest first) ``num_res_blocks + 1`` residual blocks, each taking the concatenation of the
      current features and the most recent kept skip, attention as on the way down, then nearest x2 + conv.
    - output: GroupNorm, SiLU, zero-initialised 3x3 conv ``w_0 -> out_channels``.

    Every residual block's last conv, every attention output projection and the output conv start at zero, so the
    network outputs exactly zero at initialisation (uniform logits). :meth:`reset_parameters` restores this
    initialisation. A ``PreTrainedModel`` holding this module must apply it from ``_init_weights`` (whose default
    re-draws every ``nn.Linear`` / ``nn.Conv2d`` from N(0, 0.02²)), layer by layer, since transformers 5 does not
    visit parameter-less containers of remote-code models::

        def _init_weights(self, module):
            if init_unet_weights(module):
                return
            ...

    Conditioning: with ``cond_dim`` set, ``forward(x, cond)`` takes ``cond (B, cond_dim)`` and every residual block
    maps ``SiLU(cond)`` to a per-channel scale and shift after its second GroupNorm (``use_scale_shift_norm=True``)
    or to a bias added before it (``False``). With ``cond_dim=None`` there are no conditioning layers at all and
    ``use_scale_shift_norm`` has no effect.

    Gradient checkpointing: ``gradient_checkpointing = True`` (or ``PreTrainedModel.gradient_checkpointing_enable``
    on a model holding this module) recomputes every residual and attention block in the backward pass while
    training; dropout masks are replayed exactly.

    The MDM-Prime CIFAR-10 / ImageNet-32 configuration (images.md) is the default: ``in_channels = 3·96 = 288``,
    ``out_channels = 3·256 = 768``, ``model_channels=96``, ``channel_mult=(3, 4, 4)`` (widths 288 / 384 / 384 at
    32 / 16 / 8 px), 5 residual blocks per level, attention at 16 px with 64-channel heads, dropout 0.4, no time
    input. It has 118,669,344 parameters, whatever ℓ is (the image model keeps ``in_channels = channels ·
    model_channels``; only its embedding table, outside this module, depends on ℓ). A 28 x 28 single-channel
    (MNIST-sized) network: ``in_channels=64, out_channels=256, model_channels=64, channel_mult=(1, 2, 2)`` (28 / 14 /
    7 px), 2 residual blocks per level, attention at 14 px, 64-channel heads: 6,056,960 parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int = 96,
        channel_mult: tuple[int, ...] = (3, 4, 4),
        num_res_blocks: int = 5,
        attention_resolutions: tuple[int, ...] = (16,),
        num_head_channels: int = 64,
        dropout: float = 0.4,
        image_size: tuple[int, int] = (32, 32),
        cond_dim: int | None = None,
        use_scale_shift_norm: bool = True,
        num_groups: int = 32,
    ):
        super().__init__()
        for name, value in [
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("model_channels", model_channels),
            ("num_res_blocks", num_res_blocks),
            ("num_head_channels", num_head_channels),
            ("num_groups", num_groups),
        ]:
            _check_positive_int(name, value)
        if cond_dim is not None:
            _check_positive_int("cond_dim", cond_dim)
        channel_mult = tuple(channel_mult)
        if not channel_mult:
            raise ValueError("channel_mult must list at least one multiplier (one per resolution level).")
        for mult in channel_mult:
            _check_positive_int("every entry of channel_mult", mult)
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}.")
        image_size = tuple(image_size)
        if len(image_size) != 2:
            raise ValueError(f"image_size must be (height, width), got {image_size!r}.")
        for size in image_size:
            _check_positive_int("image_size entries", size)
        factor = 2 ** (len(channel_mult) - 1)
        if image_size[0] % factor or image_size[1] % factor:
            raise ValueError(
                f"image_size {image_size} must be divisible by 2**(len(channel_mult) - 1) = {factor} in both "
                f"dimensions, since each of the {len(channel_mult) - 1} downsamplings halves it exactly."
            )
        resolutions = [image_size[0] // 2**level for level in range(len(channel_mult))]
        attention_resolutions = tuple(attention_resolutions)
        unknown = [res for res in attention_resolutions if res not in resolutions]
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} match no level: the levels run at heights {resolutions} "
                f"(image height {image_size[0]} halved per level)."
            )
        widths = [model_channels * mult for mult in channel_mult]
        for width in widths:
            if width % num_groups:
                raise ValueError(
                    f"num_groups={num_groups} must divide every level width model_channels * channel_mult "
                    f"= {widths} (GroupNorm splits the channels into equal groups)."
                )
        attention_widths = [w for w, res in zip(widths, resolutions) if res in attention_resolutions] + [widths[-1]]
        for width in attention_widths:
            if width % num_head_channels:
                raise ValueError(
                    f"num_head_channels={num_head_channels} must divide the width of every level with attention "
                    f"(the middle block always has attention): got widths {sorted(set(attention_widths))}."
                )

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.image_size = image_size
        self.cond_dim = cond_dim

        def res_block(c_in: int, c_out: int) -> MDMPrimeUNetResBlock:
            return MDMPrimeUNetResBlock(c_in, c_out, dropout, num_groups, cond_dim, use_scale_shift_norm)

        def attention(channels: int, resolution: int) -> MDMPrimeUNetAttention | None:
            if resolution not in attention_resolutions:
                return None
            return MDMPrimeUNetAttention(channels, num_head_channels, num_groups)

        self.input_conv = None if in_channels == widths[0] else nn.Conv2d(in_channels, widths[0], 3, padding=1)

        channels = widths[0]
        skip_channels = [channels]
        self.down = nn.ModuleList()
        for level, (width, resolution) in enumerate(zip(widths, resolutions)):
            for _ in range(num_res_blocks):
                self.down.append(MDMPrimeUNetStage(res_block(channels, width), attention(width, resolution)))
                channels = width
                skip_channels.append(channels)
            if level < len(widths) - 1:
                self.down.append(MDMPrimeUNetStage(resample=MDMPrimeUNetDownsample(channels)))
                skip_channels.append(channels)

        self.mid_res1 = res_block(channels, channels)
        self.mid_attn = MDMPrimeUNetAttention(channels, num_head_channels, num_groups)
        self.mid_res2 = res_block(channels, channels)

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, resolution = widths[level], resolutions[level]
            for i in range(num_res_blocks + 1):
                upsample = MDMPrimeUNetUpsample(width) if level > 0 and i == num_res_blocks else None
                block = res_block(channels + skip_channels.pop(), width)
                self.up.append(MDMPrimeUNetStage(block, attention(width, resolution), upsample))
                channels = width

        self.out_norm = MDMPrimeUNetGroupNorm(num_groups, channels)
        self.out_conv = nn.Conv2d(channels, out_channels, 3, padding=1)

        # Tag every layer with its initialisation, so that a PreTrainedModel can apply it layer by layer.
        for module in self.modules():
            if next(module.parameters(recurse=False), None) is not None:
                module._unet_init = "default"
        for module in self.modules():
            if isinstance(module, MDMPrimeUNetResBlock):
                module.conv2._unet_init = "zero"
            elif isinstance(module, MDMPrimeUNetAttention):
                module.proj_out._unet_init = "zero"
        self.out_conv._unet_init = "zero"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every layer as designed (see :func:`init_unet_weights`)."""
        for module in self.modules():
            init_unet_weights(module)

    def _checkpointable(self) -> list[GradientCheckpointingLayer]:
        return [module for module in self.modules() if isinstance(module, GradientCheckpointingLayer)]

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether residual and attention blocks are recomputed in the backward pass (only while training)."""
        return any(block.gradient_checkpointing for block in self._checkpointable())

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        for block in self._checkpointable():
            block.gradient_checkpointing = bool(enable)
            if "_gradient_checkpointing_func" not in block.__dict__:
                # transformers' gradient_checkpointing_enable installs its own function (with the user's kwargs).
                block._gradient_checkpointing_func = _checkpoint

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x ``(B, in_channels, H, W)`` float -> logits ``(B, out_channels, H, W)``.

        cond: ``(B, cond_dim)`` conditioning vector (time embedding and/or class embedding, built by the caller),
        injected into every residual block through scale-shift norm (FiLM). Required when ``cond_dim`` is set,
        refused otherwise: with ``cond_dim=None`` the network is time-independent (MDM-Prime's image model).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"x must have shape (batch, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}), "
                f"got {tuple(x.shape)}."
            )
        if self.cond_dim is None:
            if cond is not None:
                raise ValueError("cond was given but this U-Net was built with cond_dim=None (no conditioning).")
        elif cond is None or cond.shape != (x.shape[0], self.cond_dim):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"cond must have shape (batch, cond_dim) = ({x.shape[0]}, {self.cond_dim}), got {got}.")

        h = x if self.input_conv is None else self.input_conv(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, cond)
            skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, cond)), cond)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), cond)
        return self.out_conv(F.silu(self.out_norm(h)))


__all__ = ["MDMPrimeUNet", "init_unet_weights"]
