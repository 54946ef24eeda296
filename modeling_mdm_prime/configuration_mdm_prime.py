"""Configuration of MDM-Prime / MD4 masked diffusion language models.

This file is shipped as remote code and loaded alone by ``AutoConfig``: it imports neither torch
nor any sibling module.
"""

from __future__ import annotations

import math
import numbers

from transformers import PretrainedConfig

NOISE_SCHEDULES = ("linear", "polynomial", "cosine", "geometric", "learnable_polynomial")
# GenMD4 (docs/concepts/genmd4.md): one learnable power per token value, α_{t,i} = 1 - t^{w_i}.
STATE_DEPENDENT_SCHEDULES = ("learnable_polynomial",)
LOSS_TYPES = ("elbo", "prime")
# The MDM-Prime paper's image objective (images.md): unweighted cross-entropy, sub-tokens masked w.p. 1 - (1 - t)^3.
IMAGE_LOSS_TYPES = (*LOSS_TYPES, "cross_entropy")
IMAGE_BACKBONES = ("transformer", "unet")
# Causal LM architectures whose transformers model can host an adapted backbone (transformer_config).
ADAPTABLE_MODEL_TYPES = ("llama", "qwen2", "gpt2")

AUTO_MAP = {
    "AutoConfig": "configuration_mdm_prime.MDMPrimeConfig",
    "AutoModel": "modeling_mdm_prime.MDMPrimeForMaskedDiffusion",
    "AutoModelForMaskedLM": "modeling_mdm_prime.MDMPrimeForMaskedDiffusion",
}
IMAGE_AUTO_MAP = {
    "AutoConfig": "configuration_mdm_prime.MDMPrimeImageConfig",
    "AutoModel": "modeling_image_mdm_prime.MDMPrimeForImageDiffusion",
}


def integer_base(vocab_size: int, num_sub_tokens: int) -> int:
    """Smallest integer b with ``b ** num_sub_tokens >= vocab_size``, computed exactly.

    ``ceil(C ** (1 / ℓ))`` in floating point can be off by one (e.g. for perfect powers), so the float
    guess is only a starting point, corrected with integer arithmetic.
    """
    if vocab_size < 2 or num_sub_tokens < 1:
        raise ValueError(f"need vocab_size >= 2 and num_sub_tokens >= 1, got {vocab_size} and {num_sub_tokens}.")
    base = max(2, int(round(vocab_size ** (1.0 / num_sub_tokens))))
    while base**num_sub_tokens < vocab_size:
        base += 1
    while base > 2 and (base - 1) ** num_sub_tokens >= vocab_size:
        base -= 1
    return base


def check_sub_token_split(vocab_size: int, num_sub_tokens: int) -> int:
    """The one rule for ℓ (the config and the codec both call it): the base b, or a ValueError when the most
    significant of the ℓ base-b digits would be 0 for every token (b^(ℓ-1) >= C: ℓ is too large)."""
    base = integer_base(vocab_size, num_sub_tokens)
    if num_sub_tokens > 1 and base ** (num_sub_tokens - 1) >= vocab_size:
        usable = [ell for ell in range(1, num_sub_tokens) if integer_base(vocab_size, ell) ** (ell - 1) < vocab_size]
        largest = max(usable, default=1)
        raise ValueError(
            f"num_sub_tokens={num_sub_tokens} is too many for vocab_size={vocab_size}: with base {base} the most "
            f"significant digit is always 0. Use num_sub_tokens <= {largest}."
        )
    return base


class MDMPrimeConfig(PretrainedConfig):
    r"""Configuration of an MDM-Prime model (partial masking, Chao et al. 2025).

    Every token id ``x`` in ``[0, vocab_size)`` is written as ``num_sub_tokens`` (ℓ) base-``b`` digits,
    ``b`` the smallest integer with ``b**ℓ >= vocab_size``; each digit is masked independently by the
    forward process. ``num_sub_tokens=1`` is ordinary masked diffusion (MD4 / MDLM).

    Args:
        vocab_size: number of real tokens C (the mask is not a token; it is sub-token id ``b``).
        num_sub_tokens: ℓ, sub-tokens per token. ``hidden_size`` must be divisible by it, because the
            ℓ sub-token embeddings (``hidden_size / ℓ`` wide each) are concatenated.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: transformer size.
        max_position_embeddings: longest sequence the model is meant for (RoPE has no table; this is
            checked against inputs so that a too-long input fails loudly).
        dropout: dropout on the embedding, attention output and MLP output.
        embedding_dropout: dropout on the embedding alone; None (the default) uses ``dropout``. Converted
            MDLM / MDM-Prime checkpoints set 0.0: their DiT has dropout in the blocks but none on the embedding.
        attention_dropout: dropout on the attention probabilities.
        time_conditioning: condition every block on t through adaLN (DiT). When ``False`` the network
            is time independent, which makes the sampler's idle-step cache exact.
        time_embedding_size: width of the timestep embedding used by adaLN.
        noise_schedule: one of ``"linear"``, ``"polynomial"``, ``"cosine"``, ``"geometric"``, or
            ``"learnable_polynomial"`` (GenMD4, docs/concepts/genmd4.md: ``α_{t,i} = 1 - t^{w_i}``,
            ``w = softplus(ŵ)``, one
            learnable ŵ per token value, initialised to w = 1; it needs ``num_sub_tokens=1`` and
            ``time_conditioning=True``, trains with a REINFORCE leave-one-out gradient and ignores ``noise_eps``:
            training and bounds use the endpoint-exact schedule). For the fixed schedules, the sampler's
            reveal probabilities and the discrete-time bound follow its endpoint-exact version (α(0) = 1,
            α(1) = 0), and so does training at explicit ``timesteps``. The default training objective and
            ``nll_bound`` use the count estimator, for which every schedule gives the same objective (the
            continuous-time bound depends on the schedule only through its end points); a time-conditioned
            network is then told the masking probability itself.
        noise_eps: the training schedule keeps ``α(1) = noise_eps`` (MDLM uses 1e-3), for every schedule.
        polynomial_exponent: p of ``α_t = 1 - t**p``.
        geometric_beta_min, geometric_beta_max: β range of the geometric schedule.
        loss_type: ``"elbo"`` trains on the valid bound on the NLL; ``"prime"`` on the MDM-Prime paper's
            objective, which is *not* a bound on the NLL (it can fall below the data entropy).
        carry_over: apply the consistency filter: the model's distribution over a partially masked token
            is restricted to the tokens whose digits agree with the revealed ones.
        rope_theta: RoPE base.
        layer_norm_eps, initializer_range: as in other transformers models.
        transformer_config: for a model adapted from a pretrained causal LM (docs/guides/adaptation.md), the
            source architecture's transformers config as a dict (``model_type`` one of
            ``ADAPTABLE_MODEL_TYPES``). The backbone is then that architecture's own transformers model, run
            bidirectionally, and ``hidden_size`` must equal its width; the size arguments above only describe it.
        shift_logits: the hidden state at position i - 1 predicts token i (position 0 predicts itself), so that an
            adapted causal LM's output layer keeps its meaning (DiffuGPT, Dream).
    """

    model_type = "mdm_prime"
    loss_types = LOSS_TYPES

    def __init__(
        self,
        vocab_size: int = 50257,
        num_sub_tokens: int = 1,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        max_position_embeddings: int = 1024,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        embedding_dropout: float | None = None,
        time_conditioning: bool = False,
        time_embedding_size: int = 128,
        noise_schedule: str = "linear",
        noise_eps: float = 1e-3,
        polynomial_exponent: float = 1.0,
        geometric_beta_min: float = 1e-5,
        geometric_beta_max: float = 20.0,
        loss_type: str = "elbo",
        carry_over: bool = True,
        rope_theta: float = 10000.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        transformer_config: dict | None = None,
        shift_logits: bool = False,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.num_sub_tokens = num_sub_tokens
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.embedding_dropout = embedding_dropout
        self.time_conditioning = time_conditioning
        self.time_embedding_size = time_embedding_size
        self.noise_schedule = noise_schedule
        self.noise_eps = noise_eps
        self.polynomial_exponent = polynomial_exponent
        self.geometric_beta_min = geometric_beta_min
        self.geometric_beta_max = geometric_beta_max
        self.loss_type = loss_type
        self.carry_over = carry_over
        self.rope_theta = rope_theta
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.transformer_config = transformer_config
        self.shift_logits = shift_logits
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_settings()

    def validate_settings(self) -> None:
        """Raise a ValueError naming the inconsistent setting and what to change."""

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
                raise ValueError(f"{name} must be a number, got {value!r}.")
            return float(value)

        def positive_int(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
            return value

        vocab_size = positive_int("vocab_size")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}.")
        num_sub_tokens = positive_int("num_sub_tokens")
        hidden_size = positive_int("hidden_size")
        num_heads = positive_int("num_attention_heads")
        for name in ("num_hidden_layers", "intermediate_size", "max_position_embeddings", "time_embedding_size"):
            positive_int(name)
        check_sub_token_split(vocab_size, num_sub_tokens)
        if not isinstance(self.shift_logits, bool):
            raise ValueError(f"shift_logits must be True or False, got {self.shift_logits!r}.")
        if self.transformer_config is not None:
            self._validate_transformer_config()
        max_sub_tokens = (vocab_size - 1).bit_length()
        if self.transformer_config is None and hidden_size % num_sub_tokens:
            divisible = [d for d in range(1, max_sub_tokens + 1) if hidden_size % d == 0]
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_sub_tokens={num_sub_tokens}: the "
                f"{num_sub_tokens} sub-token embeddings are concatenated into one hidden vector. Choose "
                f"hidden_size as a multiple of {num_sub_tokens} or num_sub_tokens in {divisible}."
            )
        if self.transformer_config is None and hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_heads}.")
        if self.transformer_config is None and (hidden_size // num_heads) % 2:
            raise ValueError(
                f"head dimension hidden_size / num_attention_heads = {hidden_size // num_heads} must be even "
                "for rotary position embeddings."
            )
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}.")
        if self.noise_schedule in STATE_DEPENDENT_SCHEDULES:
            if num_sub_tokens != 1:
                raise ValueError(
                    f"noise_schedule={self.noise_schedule!r} (GenMD4) is defined for whole tokens: use "
                    f"num_sub_tokens=1, got {num_sub_tokens}. Per-sub-token learnable schedules are not implemented "
                    "(their masking probabilities, bound and sampler would need their own derivation)."
                )
            if self.time_conditioning is not True:
                raise ValueError(
                    f"noise_schedule={self.noise_schedule!r} needs time_conditioning=True: with one masking "
                    "schedule per token value the exact posterior q(x0 | x_t) depends on t, not only on x_t, so a "
                    "time-independent network cannot represent it."
                )
        if not 0.0 <= number("noise_eps") < 1.0:
            raise ValueError(f"noise_eps must be in [0, 1), got {self.noise_eps}.")
        for name in ("polynomial_exponent", "rope_theta", "layer_norm_eps", "geometric_beta_min"):
            if not number(name) > 0:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}.")
        if not number("geometric_beta_min") < number("geometric_beta_max"):
            raise ValueError(
                "geometric schedule needs 0 < geometric_beta_min < geometric_beta_max, got "
                f"{self.geometric_beta_min} and {self.geometric_beta_max}."
            )
        if not number("initializer_range") >= 0:
            raise ValueError(f"initializer_range must be >= 0, got {self.initializer_range!r}.")
        for name in ("time_conditioning", "carry_over"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.loss_type not in self.loss_types:
            raise ValueError(
                f"loss_type must be one of {self.loss_types} ('elbo' is the valid NLL bound; the others are the "
                f"papers' objectives, not bounds), got {self.loss_type!r}."
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= number(name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.embedding_dropout is not None and not 0.0 <= number("embedding_dropout") < 1.0:
            raise ValueError(f"embedding_dropout must be None or in [0, 1), got {self.embedding_dropout}.")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name, None)
            ids = value if isinstance(value, (list, tuple)) else [value]
            for token_id in ids:
                if token_id is not None and not 0 <= token_id < vocab_size:
                    raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size}).")

    def _validate_transformer_config(self) -> None:
        source = self.transformer_config
        if not isinstance(source, dict) or source.get("model_type") not in ADAPTABLE_MODEL_TYPES:
            found = source.get("model_type") if isinstance(source, dict) else type(source).__name__
            raise ValueError(
                f"transformer_config must be a dict with model_type in {ADAPTABLE_MODEL_TYPES} (the source causal "
                f"LM's config, e.g. LlamaConfig().to_dict()), got {found!r}."
            )
        width = source.get("hidden_size", source.get("n_embd"))
        if width != self.hidden_size:
            raise ValueError(
                f"hidden_size={self.hidden_size} must equal the width of transformer_config ({width}): the "
                "backbone is that model."
            )
        if self.vocab_size > source.get("vocab_size", self.vocab_size):
            raise ValueError(
                f"vocab_size={self.vocab_size} exceeds the transformer's embedding rows ({source['vocab_size']})."
            )
        if self.time_conditioning:
            raise ValueError("time_conditioning=True is not available with transformer_config (no adaLN there).")


class MDMPrimeImageConfig(MDMPrimeConfig):
    r"""Configuration of an MDM-Prime / MD4 model over images (images.md).

    One colour channel of one pixel is one token with ``num_levels`` values (256 for 8-bit images, 17 for
    scikit-learn's digits), written as ℓ = ``num_sub_tokens`` base-b digits. The model sees the image as a
    sequence of ``num_channels · height · width`` tokens in (row, column, channel) order, so the objectives, the
    bound and every sampler of the text models apply unchanged; the backbone sees pixels: the
    ``num_channels · ℓ`` sub-token embeddings of a pixel are concatenated into one feature vector.

    Args:
        num_channels, height, width: the image shape (C, H, W).
        num_levels: values per pixel channel (the vocabulary size C of the tokens).
        num_sub_tokens: ℓ. ℓ = 2 at 256 levels is the paper's b = 16; ℓ = 2 at 17 levels gives b = 5 with
            8 invalid codes, which the consistency filter removes.
        backbone: ``"transformer"`` (the text model's blocks over the H·W pixels with 2-D rotary positions;
            ``hidden_size`` must be divisible by ``num_channels · ℓ``) or ``"unet"`` (the paper's ADM U-Net:
            each sub-token embedding is ``unet_model_channels / ℓ`` wide, so the U-Net's input has
            ``num_channels · unet_model_channels`` channels, 288 for CIFAR-10, and no input convolution).
        unet_model_channels, unet_channel_mult, unet_num_res_blocks, unet_attention_resolutions,
        unet_num_head_channels, unet_num_groups: the U-Net. The paper's CIFAR-10 / ImageNet-32 network is
            96, (3, 4, 4), 5, (16,), 64 with ``dropout=0.4`` (:meth:`cifar10`).
        num_classes: 0 for unconditional models; otherwise class-conditional with one extra "null" class for
            classifier-free guidance.
        class_dropout: probability of training on the null class (classifier-free guidance).
        loss_type: ``"elbo"`` (the valid bound, default), ``"prime"`` (the paper's text objective) or
            ``"cross_entropy"`` (the paper's image objective: t ~ U(0, 1), every sub-token masked with
            probability 1 - (1 - t)^``cross_entropy_exponent``, unweighted cross-entropy over all pixel channels,
            no filter; not a bound on the NLL).
        Every other argument is :class:`MDMPrimeConfig`'s.
    """

    model_type = "mdm_prime_image"
    loss_types = IMAGE_LOSS_TYPES

    def __init__(
        self,
        num_channels: int = 1,
        height: int = 8,
        width: int = 8,
        num_levels: int = 17,
        num_sub_tokens: int = 1,
        backbone: str = "transformer",
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        unet_model_channels: int = 96,
        unet_channel_mult: list[int] | tuple[int, ...] = (3, 4, 4),
        unet_num_res_blocks: int = 5,
        unet_attention_resolutions: list[int] | tuple[int, ...] = (16,),
        unet_num_head_channels: int = 64,
        unet_num_groups: int = 32,
        num_classes: int = 0,
        class_dropout: float = 0.1,
        cross_entropy_exponent: float = 3.0,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.height = height
        self.width = width
        self.num_levels = num_levels
        self.backbone = backbone
        self.unet_model_channels = unet_model_channels
        self.unet_channel_mult = list(unet_channel_mult)
        self.unet_num_res_blocks = unet_num_res_blocks
        self.unet_attention_resolutions = list(unet_attention_resolutions)
        self.unet_num_head_channels = unet_num_head_channels
        self.unet_num_groups = unet_num_groups
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        self.cross_entropy_exponent = cross_entropy_exponent
        vocab_size = kwargs.pop("vocab_size", num_levels)
        if vocab_size != num_levels:
            raise ValueError(f"vocab_size={vocab_size} must equal num_levels={num_levels} for an image model.")
        for name in ("num_channels", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        num_tokens = num_channels * height * width
        kwargs.pop("max_position_embeddings", None)  # always the number of pixel channels
        kwargs.setdefault("auto_map", dict(IMAGE_AUTO_MAP))
        kwargs.setdefault("dropout", 0.0)
        super().__init__(
            vocab_size=num_levels,
            num_sub_tokens=num_sub_tokens,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=num_tokens,
            **kwargs,
        )

    @classmethod
    def cifar10(cls, num_sub_tokens: int = 2, **kwargs) -> MDMPrimeImageConfig:
        """The paper's CIFAR-10 / ImageNet-32 network (images.md): a time-independent ADM U-Net, 96 channels,
        multipliers (3, 4, 4), 5 residual blocks per level, attention at 16 × 16 with 64-channel heads, dropout
        0.4, 256 levels, trained on the paper's cross-entropy objective."""
        settings = dict(
            num_channels=3,
            height=32,
            width=32,
            num_levels=256,
            backbone="unet",
            unet_model_channels=96,
            unet_channel_mult=(3, 4, 4),
            unet_num_res_blocks=5,
            unet_attention_resolutions=(16,),
            unet_num_head_channels=64,
            dropout=0.4,
            loss_type="cross_entropy",
        )
        settings.update(kwargs)
        return cls(num_sub_tokens=num_sub_tokens, **settings)

    @property
    def num_pixel_tokens(self) -> int:
        """Tokens per image: ``num_channels · height · width``."""
        return self.num_channels * self.height * self.width

    def validate_settings(self) -> None:
        super().validate_settings()
        if self.backbone not in IMAGE_BACKBONES:
            raise ValueError(f"backbone must be one of {IMAGE_BACKBONES}, got {self.backbone!r}.")
        if self.noise_schedule in STATE_DEPENDENT_SCHEDULES:
            raise ValueError(
                "noise_schedule='learnable_polynomial' (GenMD4) is implemented for text models only; image models "
                "take the fixed schedules."
            )
        per_pixel = self.num_channels * self.num_sub_tokens
        if self.backbone == "transformer":
            if self.hidden_size % per_pixel:
                raise ValueError(
                    f"hidden_size={self.hidden_size} must be divisible by num_channels · num_sub_tokens = {per_pixel}: "
                    "the sub-token embeddings of a pixel are concatenated into its hidden vector."
                )
            if (self.hidden_size // self.num_attention_heads) % 4:
                raise ValueError(
                    f"head dimension hidden_size / num_attention_heads = {self.hidden_size // self.num_attention_heads}"
                    " must be divisible by 4 for 2-D rotary position embeddings (half for rows, half for columns)."
                )
        elif self.unet_model_channels % self.num_sub_tokens:
            raise ValueError(
                f"unet_model_channels={self.unet_model_channels} must be divisible by num_sub_tokens="
                f"{self.num_sub_tokens}: each sub-token embedding is unet_model_channels / ℓ wide."
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be 0 (unconditional) or a positive integer, got {self.num_classes!r}.")
        if isinstance(self.class_dropout, bool) or not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout!r}.")
        if isinstance(self.cross_entropy_exponent, bool) or not self.cross_entropy_exponent > 0:
            raise ValueError(f"cross_entropy_exponent must be a positive number, got {self.cross_entropy_exponent!r}.")


__all__ = ["MDMPrimeConfig", "MDMPrimeImageConfig"]
