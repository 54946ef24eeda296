"""MDM-Prime / MD4 masked diffusion over images (images.md).

An image ``(C, H, W)`` with ``num_levels`` values per channel is a sequence of ``C·H·W`` tokens in (row, column,
channel) order, each written as ℓ digits. :class:`MDMPrimeForImageDiffusion` subclasses the text model and
replaces only the network (:meth:`MDMPrimeForImageDiffusion.token_logits`), so training, the valid bound, the
consistency filter and every generation strategy are the text model's, unchanged. The network sees pixels: the
``C·ℓ`` sub-token embeddings of a pixel (one shared (b+1)-row table, row b = mask) are concatenated into one
feature vector, and it returns ``num_levels`` logits per channel of every pixel. Two backbones:

* ``"transformer"``: the text model's blocks over the H·W pixels, with 2-D rotary positions (half of each head's
  rotary dimensions turn with the row, half with the column);
* ``"unet"``: the paper's ADM U-Net (:class:`MDMPrimeUNet`), time-independent by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput, logging

from .adapted_mdm_prime import MDMPrimeAdaptedModel  # noqa: F401
from .codec_mdm_prime import SubTokenCodec
from .configuration_mdm_prime import MDMPrimeImageConfig
from .estimators_mdm_prime import SubTokenEstimator  # noqa: F401  (4.57 copies only direct imports)

# transformers 4.57 copies only the modeling file's direct relative imports into a checkpoint: import every file.
from .generation_mdm_prime import MDMPrimeGenerationConfig
from .losses_mdm_prime import sample_masks
from .modeling_mdm_prime import (
    MDMPrimeBlock,
    MDMPrimeDiffusionOutput,
    MDMPrimeFinalNorm,
    MDMPrimeForMaskedDiffusion,
    MDMPrimeNLLOutput,
    MDMPrimePreTrainedModel,
    MDMPrimeTimestepEmbedding,
    time_samples_argument,
)
from .sampling_mdm_prime import SamplerStrategy  # noqa: F401
from .schedules_mdm_prime import sample_times
from .unet_mdm_prime import MDMPrimeUNet, init_unet_weights

logger = logging.get_logger(__name__)


@dataclass
class MDMPrimeImageNLLOutput(MDMPrimeNLLOutput):
    """:meth:`MDMPrimeForImageDiffusion.nll_bound` per image: the valid bound in nats (``nll``, ``nll_stderr``) and
    in bits per dimension, ``bpd = nll / (C·H·W · ln 2)`` (``bits_per_dim``, ``bits_per_dim_stderr``), ``(B,)``."""

    bits_per_dim: torch.FloatTensor | None = None
    bits_per_dim_stderr: torch.FloatTensor | None = None


@dataclass
class MDMPrimeImageGenerateOutput(ModelOutput):
    """:meth:`MDMPrimeForImageDiffusion.generate` with ``return_dict_in_generate=True``.

    Args:
        images: ``(B, C, H, W)`` long levels in ``[0, num_levels)`` (or a list of PIL images).
        nfe, num_steps, idle_steps, row_nfe: as :class:`MDMPrimeGenerateOutput`.
        history: per step, the ``(B, C·H·W, ℓ)`` sub-tokens after it (with ``output_history``).
    """

    images: torch.LongTensor | list | None = None
    nfe: int | None = None
    num_steps: int | None = None
    idle_steps: torch.LongTensor | None = None
    row_nfe: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None


def rotary_cos_sin_2d(
    height: int, width: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H·W, head_dim)`` cos and sin of axial 2-D RoPE, pixels in row-major order.

    Of the head_dim/2 rotation pairs (GPT-NeoX layout: pair i is dimensions i and i + head_dim/2), the first half
    turns by ``row · θ^(-4i/head_dim)`` and the second by ``column · θ^(-4i/head_dim)``, so the attention score
    between two pixels depends on their offset (Δrow, Δcolumn) only.
    """
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
    angles = torch.cat([torch.outer(rows, inv_freq), torch.outer(cols, inv_freq)], dim=-1)  # (H·W, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class MDMPrimeImageModel(nn.Module):
    """Partially masked pixel sub-tokens ``(B, H·W·C, ℓ)`` -> logits ``(B, H·W·C, num_levels)``.

    The sub-token embedding (``(b+1) × E``, E = ``hidden_size / (C·ℓ)`` for the transformer, ``unet_model_channels
    / ℓ`` for the U-Net) is concatenated over the C·ℓ sub-tokens of each pixel. A time-conditioned model adds the
    DiT timestep embedding of the noise level; a class-conditional one adds a class embedding (row
    ``num_classes`` is the null class of classifier-free guidance).
    """

    def __init__(self, config: MDMPrimeImageConfig):
        super().__init__()
        self.config = config
        self.codec = SubTokenCodec(config.num_levels, config.num_sub_tokens)
        per_pixel = config.num_channels * config.num_sub_tokens
        if config.backbone == "transformer":
            width = config.hidden_size
            embed_width = width // per_pixel
            cond_width = width
        else:
            embed_width = config.unet_model_channels // config.num_sub_tokens
            cond_width = 4 * config.unet_model_channels  # ADM's embedding width
        self.embed_sub_tokens = nn.Embedding(self.codec.base + 1, embed_width)
        self.dropout = nn.Dropout(config.dropout if config.embedding_dropout is None else config.embedding_dropout)
        conditioned = config.time_conditioning or config.num_classes > 0
        if config.backbone == "transformer":
            # The blocks' adaLN takes the timestep embedding; a class embedding is added to every pixel's input.
            self.time_embed = MDMPrimeTimestepEmbedding(config) if config.time_conditioning else None
            self.class_embed = nn.Embedding(config.num_classes + 1, width) if config.num_classes else None
            self.layers = nn.ModuleList([MDMPrimeBlock(config) for _ in range(config.num_hidden_layers)])
            self.norm = MDMPrimeFinalNorm(config)
            self.head = nn.Linear(width, config.num_channels * config.num_levels)
            self.unet = None
        else:
            self.time_embed = (
                nn.Sequential(MDMPrimeTimestepEmbedding(config), nn.Linear(config.time_embedding_size, cond_width))
                if config.time_conditioning
                else None
            )
            self.class_embed = nn.Embedding(config.num_classes + 1, cond_width) if config.num_classes else None
            self.unet = MDMPrimeUNet(
                in_channels=per_pixel * embed_width,
                out_channels=config.num_channels * config.num_levels,
                model_channels=config.unet_model_channels,
                channel_mult=tuple(config.unet_channel_mult),
                num_res_blocks=config.unet_num_res_blocks,
                attention_resolutions=tuple(config.unet_attention_resolutions),
                num_head_channels=config.unet_num_head_channels,
                dropout=config.dropout,
                image_size=(config.height, config.width),
                cond_dim=cond_width if conditioned else None,
                num_groups=config.unet_num_groups,
            )
        self.gradient_checkpointing = False

    def forward(
        self,
        sub_ids: torch.Tensor,
        noise_level: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            sub_ids: ``(B, H·W·C, ℓ)`` digits or the mask id b, tokens in (row, column, channel) order.
            noise_level: ``(B,)`` masking probability, required by time-conditioned models.
            class_labels: ``(B,)`` classes in ``[0, num_classes]`` (``num_classes`` = null), class-conditional only.
        Returns:
            ``(B, H·W·C, num_levels)`` logits.
        """
        c = self.config
        batch = sub_ids.shape[0]
        if sub_ids.shape[1:] != (c.num_pixel_tokens, c.num_sub_tokens):
            raise ValueError(
                f"sub_ids must have shape (batch, {c.num_pixel_tokens}, {c.num_sub_tokens}) for "
                f"{c.num_channels}×{c.height}×{c.width} images, got {tuple(sub_ids.shape)}."
            )
        cond = None
        if self.time_embed is not None:
            if noise_level is None:
                raise ValueError("this model is time conditioned: pass noise_level (1 - alpha_t) of shape (batch,).")
            cond = self.time_embed(noise_level.expand(batch))
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError(f"this model is class-conditional: pass class_labels in [0, {c.num_classes}].")
            class_vector = self.class_embed(class_labels)
        elif class_labels is not None:
            raise ValueError("this model is unconditional (num_classes=0): it takes no class_labels.")

        pixels = sub_ids.view(batch, c.height * c.width, c.num_channels * c.num_sub_tokens)
        features = self.dropout(self.embed_sub_tokens(pixels).flatten(2))  # (B, H·W, C·ℓ·E)
        if self.unet is None:
            hidden = features if self.class_embed is None else features + class_vector.unsqueeze(1)
            cos, sin = rotary_cos_sin_2d(
                c.height, c.width, hidden.shape[-1] // c.num_attention_heads, c.rope_theta, hidden.device, hidden.dtype
            )
            for layer in self.layers:
                hidden = layer(hidden, cos, sin, None, cond)
            logits = self.head(self.norm(hidden, cond))  # (B, H·W, C·levels)
        else:
            if self.class_embed is not None:
                cond = class_vector if cond is None else cond + class_vector
            grid = features.transpose(1, 2).reshape(batch, -1, c.height, c.width)
            logits = self.unet(grid, cond).flatten(2).transpose(1, 2)  # (B, H·W, C·levels)
        return logits.reshape(batch, c.num_pixel_tokens, c.num_levels)


class MDMPrimeForImageDiffusion(MDMPrimeForMaskedDiffusion):
    """MDM-Prime (ℓ > 1) or MD4 (ℓ = 1) masked diffusion over images.

    * ``forward(pixel_values)`` returns the training objective per dimension (nats): the valid bound
      (``loss_type="elbo"``) or the paper's image cross-entropy (``"cross_entropy"``, not a bound).
    * :meth:`nll_bound` gives the valid NELBO per image with its standard error, in nats and bits per dimension.
    * :meth:`generate` samples images ``(B, C, H, W)``, unconditionally, per class (with classifier-free guidance),
      or by imputation (some digits or pixels of real images kept exactly).

    Pixels are long tensors of levels in ``[0, num_levels)``: :func:`pixels_from_unit_interval` rounds floats in
    [0, 1] (the reference code's ``(x * 255).long()`` truncates).
    """

    config_class = MDMPrimeImageConfig
    main_input_name = "pixel_values"
    _no_split_modules = ["MDMPrimeBlock"]

    def __init__(self, config: MDMPrimeImageConfig):
        MDMPrimePreTrainedModel.__init__(self, config)
        self.model = MDMPrimeImageModel(config)
        self.schedule_power_logits = None  # GenMD4 is text only (the config refuses it)
        self.generation_config = self._default_generation_config(config)
        self.post_init()

    @staticmethod
    def _default_generation_config(config: MDMPrimeImageConfig) -> MDMPrimeGenerationConfig:
        # One step per pixel channel is the exact default of text models; images use the papers' NFE scale.
        return MDMPrimeGenerationConfig(num_steps=min(config.num_pixel_tokens, 512))

    def _init_weights(self, module):
        # The U-Net's layers keep their own design (ADM: zero-initialised residual branches and output); the hook
        # goes through torch.nn.init, which transformers guards while loading, so loaded weights stay untouched.
        if init_unet_weights(module):
            return
        super()._init_weights(module)

    def get_output_embeddings(self):
        return None

    # ----------------------------------------------------------------------------------------------------------
    # Pixels <-> tokens
    # ----------------------------------------------------------------------------------------------------------

    def pixels_to_ids(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` integer levels -> ``(B, H·W·C)`` token ids in (row, column, channel) order."""
        c = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must hold integer levels in [0, {c.num_levels}), got dtype {pixel_values.dtype}; "
                "convert floats in [0, 1] with pixels_from_unit_interval (it rounds)."
            )
        expected = (c.num_channels, c.height, c.width)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must have shape (batch, {', '.join(map(str, expected))}), got "
                             f"{tuple(pixel_values.shape)}.")  # fmt: skip
        ids = pixel_values.long().permute(0, 2, 3, 1).reshape(pixel_values.shape[0], -1)
        self.codec.check_ids(ids, "pixel_values")
        return ids

    def ids_to_pixels(self, ids: torch.Tensor) -> torch.Tensor:
        """``(B, H·W·C)`` token ids -> ``(B, C, H, W)`` levels."""
        c = self.config
        return ids.view(ids.shape[0], c.height, c.width, c.num_channels).permute(0, 3, 1, 2).contiguous()

    def _class_labels(self, class_labels, batch: int, device) -> torch.Tensor | None:
        c = self.config
        if c.num_classes == 0:
            if class_labels is not None:
                raise ValueError("this model is unconditional (num_classes=0): it takes no class_labels.")
            return None
        if class_labels is None:
            raise ValueError(
                f"this model is class-conditional: pass class_labels in [0, {c.num_classes}) (or {c.num_classes}, "
                "the null class, for unconditional samples)."
            )
        labels = torch.as_tensor(class_labels, device=device)
        if labels.is_floating_point() or labels.dim() > 1:
            raise ValueError(
                f"class_labels must be integers of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}."
            )
        labels = labels.long().reshape(-1).expand(batch) if labels.numel() == 1 else labels.long()
        if labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape ({batch},), got {tuple(labels.shape)}.")
        if bool(((labels < 0) | (labels > c.num_classes)).any()):
            raise ValueError(f"class_labels must lie in [0, {c.num_classes}] ({c.num_classes} = null class).")
        return labels

    def token_logits(
        self,
        sub_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        check_inputs: bool = True,
        attention_pattern: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The network's unfiltered scores over the levels, differentiable: ``(B, H·W·C, num_levels)``, or ``(N,
        num_levels)`` at ``positions`` ``(B, H·W·C)`` bool in row-major order. Images have no padding: an
        ``attention_mask`` must be all ones. ``attention_pattern`` is the text model's (adapted models only):
        refused.

        Class-conditional models take ``class_labels`` ``(B,)`` (``num_classes`` = the null class). With
        ``guidance_scale`` s != 1 the scores are classifier-free guided log-probabilities,
        ``log p_null + s (log p_c - log p_null)`` (diffusers' convention: s = 1 is the conditional model)."""
        if attention_pattern is not None:
            raise ValueError("attention_pattern is only supported by models adapted from a causal LM.")
        if check_inputs:
            self.codec.check_sub_ids(sub_ids)
            if attention_mask is not None and not bool(attention_mask.bool().all()):
                raise ValueError("images have no padding: attention_mask must be all ones (or None).")
        labels, scale = class_labels, float(guidance_scale) - 1.0  # scale: the weight of (log p_c - log p_null)
        if self.config.num_classes and labels is None:
            raise ValueError("this model is class-conditional: pass class_labels.")
        if labels is None and scale != 0.0:
            raise ValueError("guidance_scale needs class_labels (1 = no guidance).")
        if labels is not None and labels.shape[0] != sub_ids.shape[0]:
            raise ValueError(f"{labels.shape[0]} class labels for a batch of {sub_ids.shape[0]} images.")
        if labels is not None and scale != 0.0:
            null = torch.full_like(labels, self.config.num_classes)
            both = (
                self.model(
                    sub_ids.repeat(2, 1, 1),
                    None if noise_level is None else noise_level.expand(sub_ids.shape[0]).repeat(2),
                    torch.cat([labels, null]),
                )
                .float()
                .log_softmax(-1)
            )
            conditional, unconditional = both.chunk(2)
            logits = conditional + scale * (conditional - unconditional)
        else:
            logits = self.model(sub_ids, noise_level, labels)
        return logits if positions is None else logits[positions]

    # ----------------------------------------------------------------------------------------------------------
    # Training and likelihood
    # ----------------------------------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool | None = None,
    ) -> MDMPrimeDiffusionOutput | tuple:
        """Training objective on clean images, in nats per dimension (pixel channel).

        ``loss_type="elbo"`` / ``"prime"``: the text model's objectives over the C·H·W tokens (count estimator,
        docs/concepts/honest-likelihoods.md). ``"cross_entropy"``: the paper's image objective,
        ``E_t[-(1/D) Σ_d log p_θ(x_d | y_t)]``
        with t ~ U(0, 1) (stratified over the batch), each sub-token masked with probability ``1 - (1 - t)^3``,
        over every pixel channel, unweighted and unfiltered; *not* a bound (``elbo`` is then None).
        With ``num_classes > 0``, labels are replaced by the null class with probability ``class_dropout`` in
        training mode (classifier-free guidance).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        ids = self.pixels_to_ids(pixel_values)
        labels = self._class_labels(class_labels, ids.shape[0], ids.device)
        if labels is not None and self.training and self.config.class_dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.config.class_dropout
            labels = labels.masked_fill(drop, self.config.num_classes)
        network_kwargs = {} if labels is None else {"class_labels": labels}
        if self.config.loss_type != "cross_entropy":
            every = torch.ones_like(ids, dtype=torch.bool)
            output = self._objective(ids, every, None, self._check_timesteps(timesteps, ids), generator, network_kwargs)
        else:
            output = self._cross_entropy_objective(ids, timesteps, generator, network_kwargs)
        return output if return_dict else output.to_tuple()

    def _cross_entropy_objective(self, ids, timesteps, generator, network_kwargs: dict) -> MDMPrimeDiffusionOutput:
        batch = ids.shape[0]
        if timesteps is None:
            t = sample_times(batch, generator=generator, device=ids.device, dtype=torch.float64)
        else:
            t = torch.as_tensor(timesteps, device=ids.device, dtype=torch.float64).reshape(-1).expand(batch)
        alpha = (1.0 - t) ** self.config.cross_entropy_exponent
        clean = self.codec.encode(ids, check=False)
        masked = sample_masks(clean.shape, alpha, torch.ones_like(ids, dtype=torch.bool), generator)
        noise_level = (1.0 - alpha).float() if self.config.time_conditioning else None
        logits = self.token_logits(
            clean.masked_fill(masked, self.codec.mask_id), None, noise_level, check_inputs=False, **network_kwargs
        )
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        return MDMPrimeDiffusionOutput(loss=loss, timesteps=t.float(), num_tokens=torch.tensor(ids.numel()))

    @torch.no_grad()
    def nll_bound(
        self,
        pixel_values: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        num_time_samples: int = 16,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
    ) -> MDMPrimeImageNLLOutput:
        """The valid NELBO per image (an upper bound on ``-log p_θ(x)``), in nats and bits per dimension, with
        standard errors over the ``num_time_samples`` Monte-Carlo draws (see the text model's :meth:`nll_bound`; the
        paper's cross-entropy is never reported as a likelihood). Class-conditional models give
        ``-log p_θ(x | class)``."""
        ids = self.pixels_to_ids(pixel_values)
        labels = self._class_labels(class_labels, ids.shape[0], ids.device)
        num_samples = time_samples_argument(num_time_samples, num_samples)
        every = torch.ones_like(ids, dtype=torch.bool)
        network_kwargs = {} if labels is None else {"class_labels": labels}
        out = self._bound(ids, every, every, None, num_samples, num_steps, generator, network_kwargs)
        per_image = math.log(2.0) * self.config.num_pixel_tokens
        return MDMPrimeImageNLLOutput(
            nll=out.nll,
            nll_stderr=out.nll_stderr,
            num_tokens=out.num_tokens,
            paper_objective=out.paper_objective,
            paper_objective_stderr=out.paper_objective_stderr,
            bits_per_dim=out.nll / per_image,
            bits_per_dim_stderr=out.nll_stderr / per_image,
        )

    # ----------------------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------------------

    def image_template(
        self,
        pixel_values: torch.Tensor,
        keep_pixels: torch.Tensor | None = None,
        keep_digits: torch.Tensor | list[bool] | None = None,
    ) -> torch.Tensor:
        """The imputation template: ``(B, H·W·C, ℓ)`` sub-tokens of ``pixel_values`` with every digit that is not
        kept masked.

        Args:
            pixel_values: ``(B, C, H, W)`` real images.
            keep_pixels: bool, broadcastable to ``(B, C, H, W)``: keep every digit of these pixel channels (e.g. a
                region: ``keep[..., :, :4] = True`` keeps the left half).
            keep_digits: bool, broadcastable to ``(B, C, H, W, ℓ)``: keep these digits, e.g. ``[True, False]`` keeps
                the most significant digit of every pixel channel (ℓ = 2).
        """
        ids = self.pixels_to_ids(pixel_values)
        c, ell = self.config, self.codec.num_sub_tokens
        shape = (ids.shape[0], c.num_channels, c.height, c.width, ell)
        keep = torch.zeros(shape, dtype=torch.bool, device=ids.device)
        try:
            if keep_pixels is not None:
                keep |= torch.as_tensor(keep_pixels, dtype=torch.bool, device=ids.device).unsqueeze(-1).expand(shape)
            if keep_digits is not None:
                keep |= torch.as_tensor(keep_digits, dtype=torch.bool, device=ids.device).expand(shape)
        except RuntimeError as error:
            raise ValueError(
                f"keep_pixels must broadcast to {shape[:4]} and keep_digits to {shape} (batch, C, H, W, ℓ): {error}"
            ) from None
        keep = keep.permute(0, 2, 3, 1, 4).reshape(ids.shape[0], -1, ell)
        return self.codec.encode(ids, check=False).masked_fill(~keep, self.codec.mask_id)

    @torch.no_grad()
    def generate(
        self,
        num_images: int | None = None,
        class_labels: torch.Tensor | list[int] | int | None = None,
        guidance_scale: float = 1.0,
        pixel_values: torch.Tensor | None = None,
        keep_pixels: torch.Tensor | None = None,
        keep_digits: torch.Tensor | list[bool] | None = None,
        output_type: str = "pt",
        **kwargs,
    ) -> torch.LongTensor | list | MDMPrimeImageGenerateOutput:
        r"""Sample images by iterative sub-token unmasking: the text model's loop, strategies and settings.

        Args:
            num_images: unconditional (or per-class) samples. Image i of a call depends only on the seed and on
                i (and its class), so the first 4 of ``num_images=8`` equal ``num_images=4``.
            class_labels: one class per image (or one for all); the null class ``num_classes`` gives unconditional
                samples of a class-conditional model.
            guidance_scale: classifier-free guidance s in diffusers' convention, ``log p_null + s (log p_c -
                log p_null)``: 1 (the default) is no guidance, s > 1 sharpens towards the class, 0 is the
                unconditional model. Before version 0.2 of this package the scale was w = s - 1 (0 = none): add 1
                to an old value.
            pixel_values, keep_pixels, keep_digits: imputation (see :meth:`image_template`): the kept digits are
                returned exactly; the others are sampled from the model given them.
            output_type: ``"pt"`` (``(B, C, H, W)`` long levels) or ``"pil"`` (a list of PIL images, levels scaled
                to 0..255).
            **kwargs: generation settings (:class:`MDMPrimeGenerationConfig`): ``num_steps`` (the NFE of the
                paper's tables; default ``min(C·H·W, 512)``), ``strategy``, ``temperature``, ``top_p``,
                ``temperature_schedule``, ``time_warp``, ``seed``, ``generator``, ``return_dict_in_generate``, ...
                ``num_return_sequences`` draws that many images per input.
        """
        if output_type not in ("pt", "pil"):
            raise ValueError(f"output_type must be 'pt' or 'pil', got {output_type!r}.")
        for name in ("input_ids", "attention_mask", "infill_mask", "sub_token_ids", "max_new_tokens", "max_length"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} is for text models; image models take num_images, pixel_values with keep_pixels / "
                    "keep_digits (imputation) and class_labels."
                )
        c, device = self.config, self.device
        if pixel_values is not None:
            template = self.image_template(pixel_values.to(device), keep_pixels, keep_digits)
            if num_images is not None and num_images != template.shape[0]:
                raise ValueError(f"num_images={num_images} but pixel_values holds {template.shape[0]} images.")
        else:
            if keep_pixels is not None or keep_digits is not None:
                raise ValueError("keep_pixels / keep_digits need the pixel_values they keep.")
            if num_images is None and class_labels is not None:
                num_images = torch.as_tensor(class_labels).numel()
            num_images = 1 if num_images is None else num_images
            if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
                raise ValueError(f"num_images must be a positive integer, got {num_images!r}.")
            template = torch.full(
                (num_images, c.num_pixel_tokens, self.codec.num_sub_tokens), self.codec.mask_id, device=device
            )
        labels = self._class_labels(class_labels, template.shape[0], device)
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}.")
        if guidance_scale != 1.0 and labels is None:
            raise ValueError("guidance_scale needs a class-conditional model and class_labels (1 = no guidance).")
        if guidance_scale == 0.0:
            logger.warning(
                "guidance_scale=0 samples the unconditional model (diffusers' convention, 1 = no guidance); before "
                "version 0.3 of modeling_mdm_prime, 0 meant no guidance."
            )
        copies = kwargs.get("num_return_sequences") or self.generation_config.num_return_sequences or 1
        if labels is not None and copies > 1:
            labels = labels.repeat_interleave(copies)
        network_kwargs = {} if labels is None else {"class_labels": labels, "guidance_scale": guidance_scale}
        out = super().generate(sub_token_ids=template, network_kwargs=network_kwargs, **kwargs)
        sequences = out.sequences if isinstance(out, ModelOutput) else out
        images = self.ids_to_pixels(sequences)
        if output_type == "pil":
            images = levels_to_pil(images, c.num_levels)
        if not isinstance(out, ModelOutput):
            return images
        return MDMPrimeImageGenerateOutput(
            images=images,
            nfe=out.nfe,
            num_steps=out.num_steps,
            idle_steps=out.idle_steps,
            row_nfe=out.row_nfe,
            history=out.history,
        )


def pixels_from_unit_interval(images: torch.Tensor, num_levels: int = 256) -> torch.Tensor:
    """Floats in [0, 1] ``(...)`` -> long levels ``round(x · (num_levels - 1))``. Rounding, not truncation:
    ``(x * 255).long()`` maps 254.9999 to 254 and makes level 255 almost unreachable."""
    if not images.is_floating_point():
        raise ValueError(f"expected floats in [0, 1], got dtype {images.dtype}.")
    if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
        raise ValueError(f"expected values in [0, 1], got [{float(images.min())}, {float(images.max())}].")
    return torch.round(images * (num_levels - 1)).long()


def levels_to_pil(images: torch.Tensor, num_levels: int) -> list:
    """``(B, C, H, W)`` levels -> PIL images (mode L or RGB), levels scaled to 0..255."""
    try:  # optional, and in a try block so that transformers' remote-code import check does not demand it
        from PIL import Image
    except ImportError as error:
        raise ImportError("output_type='pil' needs Pillow: pip install pillow") from error

    if images.shape[1] not in (1, 3):
        raise ValueError(f"PIL output needs 1 or 3 channels, got {images.shape[1]}.")
    scaled = torch.round(images.double() * 255.0 / (num_levels - 1)).to(torch.uint8).permute(0, 2, 3, 1).cpu()
    arrays = [image.numpy() for image in scaled]
    return [
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode="L" if a.shape[-1] == 1 else "RGB") for a in arrays
    ]


# save_pretrained copies this file and every file it imports next to the weights; the config's auto_map names it.
MDMPrimeForImageDiffusion.register_for_auto_class("AutoModel")

__all__ = [
    "MDMPrimeForImageDiffusion",
    "MDMPrimeImageGenerateOutput",
    "MDMPrimeImageModel",
    "MDMPrimeImageNLLOutput",
    "levels_to_pil",
    "pixels_from_unit_interval",
    "rotary_cos_sin_2d",
]
