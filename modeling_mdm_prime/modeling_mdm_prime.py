"""MDM-Prime / MD4 masked diffusion language model for transformers.

The backbone is a bidirectional pre-LayerNorm transformer with rotary position embeddings, attention through
transformers' attention interface (``attn_implementation``: ``sdpa`` by default, ``eager``, or a registered kernel)
and optional adaLN time conditioning. Its parameter layout follows MDLM's DiT (``blocks`` ~ ``layers``,
``attn_qkv``, ``attn_out``, ``mlp``, ``adaLN_modulation``, ``norm_final``) so that MDLM / MDM-Prime checkpoints can
be converted by renaming keys (a time-independent DiT's constant adaLN modulation folds into the LayerNorm affine
and the output projections).

Input: ℓ sub-tokens per position, embedded with one shared (b+1)-row table of width D/ℓ and concatenated
(docs/concepts/partial-masking.md), so the transformer runs over L positions whatever ℓ is. Output: logits over
the C real tokens, restricted by the consistency filter.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .adapted_mdm_prime import MDMPrimeAdaptedModel
from .codec_mdm_prime import SubTokenCodec
from .configuration_mdm_prime import MDMPrimeConfig
from .estimators_mdm_prime import (
    StateDependentEstimator,
    SubTokenEstimator,
    estimator_for,
    mean_and_stderr,
)
from .generation_mdm_prime import MDMPrimeGenerationConfig, MDMPrimeGenerationMixin

# transformers 4.57 copies only the modeling file's direct relative imports into a checkpoint.
from .losses_mdm_prime import diffusion_terms  # noqa: F401
from .sampling_mdm_prime import SamplerStrategy  # noqa: F401
from .schedules_mdm_prime import (
    NoiseSchedule,
    StateDependentPolynomialSchedule,
    get_noise_schedule,
)

logger = logging.get_logger(__name__)


@dataclass
class MDMPrimeDiffusionOutput(ModelOutput):
    """Output of :meth:`MDMPrimeForMaskedDiffusion.forward` on clean tokens.

    Args:
        loss: the configured training objective in nats per token (scalar, differentiable).
        elbo: the valid NELBO estimate in nats per token (detached), a one-sample estimate; report likelihoods
            with :meth:`MDMPrimeForMaskedDiffusion.nll_bound`.
        paper_objective: the MDM-Prime paper objective in nats per token (detached), the name ``nll_bound``'s
            output uses too. *Not* a bound on the NLL: never report exp(paper_objective) as a perplexity.
            (``prime_objective``, its name before version 0.2, still reads it, with a FutureWarning.)
        timesteps: ``(B,)`` the diffusion times, or None when the masks were drawn by count (time-independent
            networks).
        num_tokens: number of tokens the per-token averages are taken over.
        power_max, power_min, power_mean: GenMD4 (``noise_schedule="learnable_polynomial"``) only: statistics of
            the learned powers w = softplus(ŵ) (detached scalars), as md4 logs them.

    For GenMD4, ``loss`` is the REINFORCE leave-one-out surrogate (its gradient is unbiased for the NELBO's, the
    powers' included; its value is ``elbo``) and ``elbo`` is ½(L1 + L2) over the two masks drawn at each t.
    """

    loss: torch.FloatTensor | None = None
    elbo: torch.FloatTensor | None = None
    paper_objective: torch.FloatTensor | None = None
    timesteps: torch.FloatTensor | None = None
    num_tokens: torch.LongTensor | None = None
    power_max: torch.FloatTensor | None = None
    power_min: torch.FloatTensor | None = None
    power_mean: torch.FloatTensor | None = None

    @property
    def prime_objective(self) -> torch.FloatTensor | None:
        warnings.warn(
            "MDMPrimeDiffusionOutput.prime_objective is now paper_objective (one name for the paper objective).",
            FutureWarning,
            stacklevel=2,
        )
        return self.paper_objective


@dataclass
class MDMPrimeNLLOutput(ModelOutput):
    """Output of :meth:`MDMPrimeForMaskedDiffusion.nll_bound`, per sequence, in nats.

    Args:
        nll: ``(B,)`` Monte-Carlo estimate of the valid NELBO, an upper bound on -log p(x).
        nll_stderr: ``(B,)`` its standard error over the time samples.
        num_tokens: ``(B,)`` tokens scored per sequence; perplexity = exp(Σ nll / Σ num_tokens).
        paper_objective: ``(B,)`` the MDM-Prime paper objective (continuous time only). Not a bound.
        paper_objective_stderr: ``(B,)`` its standard error.
        nll_samples: ``(B, K)`` the Monte-Carlo samples whose mean is ``nll`` (float64).
    """

    nll: torch.FloatTensor | None = None
    nll_stderr: torch.FloatTensor | None = None
    num_tokens: torch.LongTensor | None = None
    paper_objective: torch.FloatTensor | None = None
    paper_objective_stderr: torch.FloatTensor | None = None
    nll_samples: torch.FloatTensor | None = None


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, head_dim)`` cos and sin of RoPE angles ``pos · θ^(-2i/head_dim)`` (halves repeated)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``(B, H, L, head_dim)`` queries or keys: ``x cos + rotate_half(x) sin`` (GPT-NeoX layout)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class MDMPrimeTimestepEmbedding(nn.Module):
    """Noise level ``1 - α_t ∈ [0, 1]`` ``(B,)`` -> conditioning vector ``(B, time_embedding_size)`` (DiT)."""

    def __init__(self, config: MDMPrimeConfig, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, config.time_embedding_size),
            nn.SiLU(),
            nn.Linear(config.time_embedding_size, config.time_embedding_size),
        )

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=noise_level.device) / half)
        args = 1000.0 * noise_level.float().unsqueeze(-1) * freqs
        features = torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype)
        return F.silu(self.mlp(features))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ · scaling + mask) v`` in plain torch (``attn_implementation="eager"``).

    Args:
        query, key, value: ``(B, H, L, head_dim)``.
        attention_mask: ``(B, 1, 1 or L, L)`` bool (True = may attend) or additive float mask, or None.
    Returns:
        ``(B, L, H, head_dim)`` outputs and the ``(B, H, L, L)`` attention weights (the interface's layout).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    # The softmax in float32 also under autocast, as transformers' own eager attention does.
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class MDMPrimeAttention(nn.Module):
    """Bidirectional multi-head self-attention with RoPE, through transformers' attention interface: ``sdpa`` (the
    default), ``eager``, or any function registered with ``transformers.AttentionInterface``. Such a function gets
    ``(B, H, L, head_dim)`` queries, keys and values, the ``(B, 1, 1, L)`` bool key-padding mask (True = may attend;
    None when nothing is padded) and ``is_causal=False``, and returns ``(B, L, H, head_dim)``."""

    is_causal = False  # read by transformers' sdpa_attention_forward: bidirectional, never the causal mask

    def __init__(self, config: MDMPrimeConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.attn_out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def attention_function(self):
        """The configured implementation, looked up on every call so that ``model.set_attn_implementation`` applies.
        A module built outside a model (no implementation set yet) uses ``sdpa``."""
        implementation = self.config._attn_implementation or "sdpa"
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # transformers 5
            return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        if implementation == "eager":
            return eager_attention_forward
        if self.config._attn_implementation is None:
            return ALL_ATTENTION_FUNCTIONS["sdpa"]
        # transformers 4.57: its set_attn_implementation looks for this exact expression in the modeling source.
        return ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]

    def forward(self, x, cos, sin, attn_mask):
        batch, length, width = x.shape
        q, k, v = self.attn_qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, _ = self.attention_function()(
            self, q, k, v, attn_mask, dropout=self.dropout if self.training else 0.0, scaling=self.scaling,
            is_causal=False,
        )  # fmt: skip
        return self.attn_out(out.reshape(batch, length, width))


class MDMPrimeMLP(nn.Module):
    def __init__(self, config: MDMPrimeConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class MDMPrimeBlock(GradientCheckpointingLayer):
    """Pre-LN transformer block; with time conditioning, adaLN-Zero modulation as in DiT / MDLM."""

    def __init__(self, config: MDMPrimeConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = MDMPrimeAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MDMPrimeMLP(config)
        self.dropout = nn.Dropout(config.dropout)
        self.adaLN_modulation = (
            nn.Linear(config.time_embedding_size, 6 * config.hidden_size) if config.time_conditioning else None
        )

    def forward(self, hidden, cos, sin, attn_mask=None, cond=None):
        if self.adaLN_modulation is None:
            hidden = hidden + self.dropout(self.attn(self.norm1(hidden), cos, sin, attn_mask))
            return hidden + self.dropout(self.mlp(self.norm2(hidden)))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(cond).unsqueeze(1).chunk(6, dim=-1)
        x = self.norm1(hidden) * (1 + scale1) + shift1
        hidden = hidden + gate1 * self.dropout(self.attn(x, cos, sin, attn_mask))
        x = self.norm2(hidden) * (1 + scale2) + shift2
        return hidden + gate2 * self.dropout(self.mlp(x))


class MDMPrimeFinalNorm(nn.Module):
    def __init__(self, config: MDMPrimeConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.adaLN_modulation = (
            nn.Linear(config.time_embedding_size, 2 * config.hidden_size) if config.time_conditioning else None
        )

    def forward(self, hidden, cond=None):
        hidden = self.norm_final(hidden)
        if self.adaLN_modulation is None:
            return hidden
        shift, scale = self.adaLN_modulation(cond).unsqueeze(1).chunk(2, dim=-1)
        return hidden * (1 + scale) + shift


class MDMPrimePreTrainedModel(PreTrainedModel):
    config_class = MDMPrimeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MDMPrimeBlock"]
    _supports_sdpa = True
    # attn_implementation: "sdpa", "eager" or a function registered with transformers.AttentionInterface (see
    # MDMPrimeAttention). Flash and flex attention expect other mask formats; transformers refuses them by name.

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        # adaLN-Zero: every block starts as the identity map whatever t is (children are visited first).
        if isinstance(module, (MDMPrimeBlock, MDMPrimeFinalNorm)) and module.adaLN_modulation is not None:
            nn.init.zeros_(module.adaLN_modulation.weight)
            nn.init.zeros_(module.adaLN_modulation.bias)
        # GenMD4: ŵ = log(e - 1), so that every power w = softplus(ŵ) starts at 1 (MD4's linear schedule).
        if getattr(module, "schedule_power_logits", None) is not None:
            nn.init.constant_(module.schedule_power_logits, math.log(math.e - 1.0))


class MDMPrimeModel(MDMPrimePreTrainedModel):
    """The backbone: partially masked sub-tokens ``(B, L, ℓ)`` -> hidden states ``(B, L, D)``."""

    def __init__(self, config: MDMPrimeConfig):
        super().__init__(config)
        self.codec = SubTokenCodec(config.vocab_size, config.num_sub_tokens)
        # One table shared by every digit position; row b is the mask sub-token.
        self.embed_sub_tokens = nn.Embedding(self.codec.base + 1, config.hidden_size // config.num_sub_tokens)
        self.time_embed = MDMPrimeTimestepEmbedding(config) if config.time_conditioning else None
        # Configs saved before embedding_dropout existed (None) keep one dropout for the embedding and the blocks.
        embedding_dropout = getattr(config, "embedding_dropout", None)
        self.dropout = nn.Dropout(config.dropout if embedding_dropout is None else embedding_dropout)
        self.layers = nn.ModuleList([MDMPrimeBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = MDMPrimeFinalNorm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_sub_tokens

    def set_input_embeddings(self, value):
        self.embed_sub_tokens = value

    def forward(
        self,
        sub_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        check_inputs: bool = True,
    ) -> BaseModelOutput | tuple:
        """
        Args:
            sub_ids: ``(B, L, ℓ)`` digits in ``[0, b)`` or the mask id ``b``.
            attention_mask: ``(B, L)``, 1 for real tokens, 0 for padding. Real tokens never attend to padding.
            noise_level: ``(B,)`` masking probability ``1 - α_t``; required with ``time_conditioning``.
            check_inputs: validate the digit range (a host synchronisation); callers that validated their
                inputs once at an entry point (the generation loop) turn it off.
        Returns:
            ``BaseModelOutput`` with ``last_hidden_state`` ``(B, L, D)``.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        batch, length = self.codec.check_sequence(sub_ids, self.config.max_position_embeddings, check_inputs)
        cond = None
        if self.time_embed is not None:
            if noise_level is None:
                raise ValueError("this model is time conditioned: pass noise_level (1 - alpha_t) of shape (batch,).")
            cond = self.time_embed(noise_level.expand(batch))

        hidden = self.dropout(self.embed_sub_tokens(sub_ids).flatten(2))
        cos, sin = rotary_cos_sin(
            length,
            hidden.shape[-1] // self.config.num_attention_heads,
            self.config.rope_theta,
            hidden.device,
            hidden.dtype,
        )
        attn_mask = key_padding_mask(attention_mask, (batch, length))
        all_hidden = (hidden,) if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attn_mask, cond)
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.norm(hidden, cond)
        if not return_dict:
            return tuple(v for v in (hidden, all_hidden) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden, hidden_states=all_hidden)


def key_padding_mask(attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    """``(B, L)`` 0/1 mask -> ``(B, 1, 1, L)`` bool SDPA mask (True = may attend), or None if nothing is padded.

    A row with no real token attends everywhere (its outputs are ignored) instead of producing NaNs.
    """
    if attention_mask is None:
        return None
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask must have shape {shape} like the input, got {tuple(attention_mask.shape)}.")
    keep = attention_mask.bool()
    if bool(keep.all()):
        return None
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


class MDMPrimeForMaskedDiffusion(MDMPrimePreTrainedModel, MDMPrimeGenerationMixin):
    """MDM-Prime (ℓ > 1) or MD4 / MDLM (ℓ = 1) masked diffusion language model.

    * ``forward(input_ids)`` on clean tokens draws t and the masks and returns the training objective,
      so the transformers ``Trainer`` and plain accelerate loops train it unchanged.
    * :meth:`denoise` maps partially masked sub-tokens to filtered log-probabilities over the C tokens.
    * :meth:`nll_bound` estimates the valid NELBO (an upper bound on the NLL) with a standard error.
    * :meth:`generate` samples by iterative sub-token unmasking (``MDMPrimeGenerationMixin``).
    """

    def __init__(self, config: MDMPrimeConfig):
        super().__init__(config)
        if config.transformer_config is None:
            self.model = MDMPrimeModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        else:  # adapted from a causal LM: its transformers model and its output layer (tied: none of our own)
            self.model = MDMPrimeAdaptedModel(config)
            tied = self.model.tied_output
            self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # GenMD4's ŵ, one per token value (a model parameter: trained, saved and loaded like the others).
        self.schedule_power_logits = (
            nn.Parameter(torch.full((config.vocab_size,), math.log(math.e - 1.0)))
            if config.noise_schedule == "learnable_polynomial"
            else None
        )
        # transformers 4.57 gives every model a plain GenerationConfig; 5.x uses generation_config_class.
        self.generation_config = MDMPrimeGenerationConfig.from_model_config(config)
        self.post_init()

    @property
    def codec(self) -> SubTokenCodec:
        return self.model.codec

    @property
    def state_dependent(self) -> bool:
        """True for GenMD4 models (``noise_schedule="learnable_polynomial"``)."""
        return self.schedule_power_logits is not None

    @property
    def powers(self) -> torch.Tensor | None:
        """GenMD4: the ``(C,)`` powers ``w = softplus(ŵ)`` (differentiable), or None for fixed schedules."""
        return None if self.schedule_power_logits is None else F.softplus(self.schedule_power_logits)

    @property
    def noise_schedule(self) -> NoiseSchedule | StateDependentPolynomialSchedule:
        """The training schedule (with ``noise_eps``). For GenMD4, the state-dependent schedule of the current
        (detached) powers with eps = 0: GenMD4 trains and reports on the endpoint-exact schedule."""
        c = self.config
        if self.state_dependent:
            return StateDependentPolynomialSchedule(self.powers.detach(), 0.0)
        return get_noise_schedule(
            c.noise_schedule, c.noise_eps, c.polynomial_exponent, c.geometric_beta_min, c.geometric_beta_max
        )

    @property
    def estimator(self) -> SubTokenEstimator | StateDependentEstimator:
        """The Monte-Carlo estimator of this model's forward process (``estimators_mdm_prime``), to which
        :meth:`forward` and :meth:`nll_bound` delegate: GenMD4's for ``learnable_polynomial``, the sub-token
        one otherwise. Built per call: it holds the current schedule and powers, nothing else."""
        return estimator_for(self.config, self.codec, self.noise_schedule, self.powers)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm_head

    def output_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` hidden states -> ``(..., C)`` token scores: the head, or for an adapted model whose source
        ties them, the token embedding itself (one tensor, so nothing to re-tie on load)."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.get_input_embeddings().weight)
        return self.lm_head(hidden)

    def resize_token_embeddings(self, *args, **kwargs):
        raise NotImplementedError(
            "the sub-token embedding has b + 1 rows fixed by vocab_size and num_sub_tokens; changing the "
            "vocabulary changes the digit code of every token, so build a new model with the new vocab_size."
        )

    def _prepare_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate ``(B, L)`` ids; return ids with padding replaced by 0 and the bool real-token mask."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}.")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if real.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(real.shape)} does not match input_ids shape {tuple(input_ids.shape)}."
            )
        ids = torch.where(real, input_ids, torch.zeros_like(input_ids))
        self.codec.check_ids(ids, "input_ids")
        return ids, real

    def token_logits(
        self,
        sub_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        check_inputs: bool = True,
        attention_pattern: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network's unfiltered token scores, differentiable (for training, distillation and RL).

        Args:
            sub_ids: ``(B, L, ℓ)`` partially masked digits (mask id = ``codec.mask_id``).
            attention_mask: ``(B, L)``; padded positions are never attended to.
            noise_level: ``(B,)`` masking probability ``1 - α_t``, needed only by time-conditioned models.
            positions: optional ``(B, L)`` bool: score only these positions. The output layer is the largest
                matrix product at C = 50,257, and fully revealed tokens need no prediction, so it then runs on
                the selected rows only.
            check_inputs: validate ``sub_ids`` (a host synchronisation); off for inputs validated once.
            attention_pattern: optional ``(L, L)`` or ``(B, L, L)`` bool, True where position i may attend to
                position j; default: everything (bidirectional). Adapted models only (attention-mask annealing
                and the causal exactness check, docs/guides/adaptation.md).
        Returns:
            Logits over the C real tokens in the model's dtype: ``(N, C)`` at ``positions`` in row-major order,
            or ``(B, L, C)``. No consistency filter (see :meth:`denoise` and ``losses_mdm_prime``). With
            ``shift_logits`` the scores of position i come from the hidden state at i - 1 (position 0: its own).
        """
        extra = {}
        if attention_pattern is not None:
            if self.config.transformer_config is None:
                raise ValueError("attention_pattern is only supported by models adapted from a causal LM.")
            extra["attention_pattern"] = attention_pattern
        hidden = self.model(
            sub_ids, attention_mask=attention_mask, noise_level=noise_level, check_inputs=check_inputs, **extra
        ).last_hidden_state
        if self.config.shift_logits:
            hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
        if positions is not None:
            return self.output_layer(hidden[positions])
        return self.output_layer(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool | None = None,
        attention_pattern: torch.Tensor | None = None,
    ) -> MDMPrimeDiffusionOutput | tuple:
        """Training objective on clean tokens, in nats per scored token.

        Per sequence, a Monte-Carlo term ``weight · Σ_tokens (per-token term)``, where the per-token term is the
        valid bound's ``Σ_{j masked} -log p̄(y0^j | y_t)`` or the paper's ``-log p_θ(x0 | y_t)``:

        * by default, k ~ U{1..N} of the sequence's N sub-tokens are masked, chosen uniformly, weight N/k
          (:func:`sample_mask_counts`): the continuous-time NELBO with t integrated out (time-independent
          network) or drawn given k from Beta(k, N - k + 1) and passed as the noise level (time-conditioned
          network). Unbiased, with weights bounded by N, so no truncation of t is needed (MDLM's t >= 1e-3);
        * with explicit ``timesteps``: each sub-token masked with probability 1 - α_t, weight w(t) = -α'/(1 - α).

        Args:
            input_ids: ``(B, L)`` clean token ids.
            attention_mask: ``(B, L)``; padding is never masked, scored or attended to.
            labels: optional ``(B, L)``; positions equal to -100 are kept clean and not scored (e.g. a
                prompt), others are the targets. Defaults to ``input_ids``.
            timesteps: optional ``(B,)`` times in (0, 1]: mask with probability 1 - α_t at these times.
            generator: optional torch.Generator for the noise.
            attention_pattern: adapted models: ``(L, L)`` / ``(B, L, L)`` bool of allowed (query, key) pairs
                (attention-mask annealing, see :meth:`token_logits`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        ids, scored = self._prepare_tokens(input_ids, attention_mask)
        if labels is not None:
            if labels.shape != ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(ids.shape)}.")
            keep = labels == -100
            ids = torch.where(keep | ~scored, ids, labels)
            self.codec.check_ids(ids, "labels")
            scored = scored & ~keep
        network_kwargs = {} if attention_pattern is None else {"attention_pattern": attention_pattern}
        timesteps = self._check_timesteps(timesteps, ids)
        output = self._objective(ids, scored, attention_mask, timesteps, generator, network_kwargs)
        return output if return_dict else output.to_tuple()

    def _check_timesteps(self, timesteps, ids: torch.Tensor) -> torch.Tensor | None:
        """``forward``'s ``timesteps`` as ``(B,)`` float64 in (0, 1], or None."""
        if timesteps is None:
            return None
        batch = ids.shape[0]
        timesteps = torch.as_tensor(timesteps, device=ids.device, dtype=torch.float64)
        if timesteps.dim() > 1 or timesteps.numel() not in (1, batch):
            raise ValueError(
                f"timesteps must be a scalar or have shape ({batch},) (one time per sequence), got "
                f"{tuple(timesteps.shape)}."
            )
        timesteps = timesteps.reshape(-1).expand(batch)
        if bool((~((timesteps > 0) & (timesteps <= 1))).any()):
            raise ValueError(f"timesteps must lie in (0, 1], got {timesteps.tolist()}.")
        return timesteps

    def _objective(
        self, ids, scored, attention_mask, timesteps, generator, network_kwargs: dict
    ) -> MDMPrimeDiffusionOutput:
        """The estimator's training draw as an output; ``network_kwargs`` go to every :meth:`token_logits` call
        (adapted models: ``attention_pattern``; image models: ``class_labels``)."""
        terms = self.estimator.objective(
            self.token_logits, ids, scored, attention_mask, timesteps, generator, self.config.loss_type,
            **network_kwargs,
        )  # fmt: skip
        powers = {} if terms.powers is None else {
            "power_max": terms.powers.max(), "power_min": terms.powers.min(), "power_mean": terms.powers.mean()
        }  # fmt: skip
        return MDMPrimeDiffusionOutput(
            loss=terms.loss,
            elbo=terms.elbo,
            paper_objective=terms.paper_objective,
            timesteps=terms.timesteps,
            num_tokens=terms.num_tokens,
            **powers,
        )

    @torch.no_grad()
    def denoise(
        self,
        sub_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        noise_level: torch.Tensor | float | None = None,
        positions: torch.Tensor | None = None,
        consistency_filter: bool | None = None,
    ) -> torch.Tensor:
        """Log-probabilities ``log p_θ(x | y_t)`` over the C tokens, float32, without gradients.

        Args:
            sub_ids: ``(B, L, ℓ)`` partially masked digits (mask id = ``codec.mask_id``).
            attention_mask: ``(B, L)``.
            noise_level: ``(B,)`` or scalar ``1 - α_t``, needed only by time-conditioned models.
            positions: optional ``(B, L)`` bool; return only these positions' rows, ``(N, C)`` in row-major
                order (the output layer then runs on those rows only). Otherwise ``(B, L, C)``.
            consistency_filter: restrict to the tokens that agree with the revealed digits (-inf elsewhere; a
                fully revealed token is carried over with probability 1). Default: the model's ``carry_over``.
                ``generate()`` always filters.

        Revealed digits that match no token id below C raise a ValueError. For differentiable, unfiltered
        scores use :meth:`token_logits`.
        """
        if not isinstance(sub_ids, torch.Tensor) or sub_ids.dim() != 3:
            raise ValueError(
                f"sub_ids must be a tensor of shape (batch, length, {self.codec.num_sub_tokens}), got "
                f"{tuple(sub_ids.shape) if isinstance(sub_ids, torch.Tensor) else type(sub_ids).__name__}."
            )
        if noise_level is not None:
            noise_level = torch.as_tensor(noise_level, dtype=torch.float32, device=sub_ids.device).expand(
                sub_ids.shape[0]
            )
        logits = self.token_logits(sub_ids, attention_mask, noise_level, positions).float()
        selected = sub_ids if positions is None else sub_ids[positions]
        if self.config.carry_over if consistency_filter is None else consistency_filter:
            allowed = self.codec.consistency_mask(selected)
            if attention_mask is not None:  # padded slots may hold anything; they are ignored
                real = attention_mask.bool() if positions is None else attention_mask.bool()[positions]
                allowed |= ~real.unsqueeze(-1)
            if not bool(allowed.any(-1).all()):
                bad = (~allowed.any(-1)).nonzero()[0].tolist()
                raise ValueError(
                    f"sub_ids at index {tuple(bad)} reveal digits that match no token id below "
                    f"vocab_size={self.config.vocab_size}."
                )
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits.log_softmax(-1)

    @torch.no_grad()
    def nll_bound(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_time_samples: int = 16,
        num_steps: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        scored_mask: torch.Tensor | None = None,
        num_samples: int | None = None,
    ) -> MDMPrimeNLLOutput:
        """Monte-Carlo estimate of the valid NELBO, an upper bound on ``-log p_θ(x)``, in nats per sequence.

        With ``scored_mask`` ``(B, L)`` (1 = scored), only those tokens are ever masked and the others stay clean
        as context: the conditional bound ``L(x_scored | x_context) >= -log p_θ(x_scored | x_context)``, which the
        lm-eval adapter reports. ``generator`` may be one generator per row: each row's draws then come from its own
        generator, over its own real tokens, so a row's estimate does not depend on the batch it is in.

        Continuous time (``num_steps=None``, docs/concepts/honest-likelihoods.md):
            ``L = E_t[ w(t) Σ_i Σ_{j masked} -log p̄(y0^{i,j} | y_t) ]``
        Discrete time with T steps (t_i = i/T): ``L_T = T · E_{i, y_t, U}[ Σ_i -log p̄(y0^U | y_t) ]`` where U is
        the set of masked digits the step t_i -> t_{i-1} reveals (each with probability (α_s - α_t)/(1 - α_t)).
        A sample draws the step (stratified over the K samples) and y_t; the expectation over U is taken exactly
        (a sum over the subsets of each token's masked digits) and, for a time-independent network, so is the one
        over the step given how many digits are masked (:func:`discrete_reveal_weights`).

        Both use the endpoint-exact schedule (α(0) = 1, α(1) = 0), so nothing is dropped. In continuous time
        every network is scored with the count estimator (:func:`sample_mask_counts`: k masked elements with
        k uniform, weight N/k bounded by N; a time-conditioned network is told t ~ Beta(k, N - k + 1)). Each
        sequence gets ``num_time_samples`` draws stratified over k; ``nll_stderr`` is their standard deviation over
        sqrt(K) (its coverage is tested for both kinds of network). In continuous time the paper objective is
        estimated from the same samples and returned as ``paper_objective`` (not a bound). The model is
        evaluated in eval mode (no dropout) and its mode restored afterwards. ``num_samples`` is the deprecated
        name of ``num_time_samples`` (everywhere else ``num_samples`` counts generated samples).
        """
        num_samples = time_samples_argument(num_time_samples, num_samples)
        ids, real = self._prepare_tokens(input_ids, attention_mask)
        scored = real
        if scored_mask is not None:
            if scored_mask.shape != ids.shape:
                raise ValueError(
                    f"scored_mask shape {tuple(scored_mask.shape)} does not match input_ids {tuple(ids.shape)}."
                )
            scored = real & scored_mask.bool()
        if isinstance(generator, (list, tuple)) and len(generator) != ids.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {ids.shape[0]} rows; expected one per row.")
        return self._bound(ids, real, scored, attention_mask, num_samples, num_steps, generator, {})

    def _bound(
        self, ids, real, scored, attention_mask, num_samples: int, num_steps: int | None, generator, network_kwargs
    ) -> MDMPrimeNLLOutput:
        """The estimator's bound samples, in eval mode, as an output (``network_kwargs``: see :meth:`_objective`)."""
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer or None, got {num_steps!r}.")
        was_training = self.training
        self.eval()  # a likelihood is a property of the model, not of a dropout mask
        try:
            samples = self.estimator.bound_samples(
                self.token_logits, ids, scored, real, attention_mask, num_samples, num_steps, generator,
                **network_kwargs,
            )  # fmt: skip
        finally:
            self.train(was_training)
        nll, nll_stderr = mean_and_stderr(samples.nll)
        prime, prime_stderr = (None, None)
        if samples.paper_objective is not None:  # estimated from the same draws (continuous time)
            prime, prime_stderr = mean_and_stderr(samples.paper_objective)
        return MDMPrimeNLLOutput(
            nll=nll,
            nll_stderr=nll_stderr,
            num_tokens=scored.sum(1),
            paper_objective=prime,
            paper_objective_stderr=prime_stderr,
            nll_samples=samples.nll,
        )


def time_samples_argument(num_time_samples: int, num_samples: int | None) -> int:
    """The number of Monte-Carlo draws of a likelihood bound, accepting its deprecated name ``num_samples``."""
    if num_samples is not None:
        warnings.warn(
            "nll_bound(num_samples=...) is deprecated: the Monte-Carlo draw count is now num_time_samples "
            "(num_samples counts generated samples everywhere else).",
            FutureWarning,
            stacklevel=3,
        )
        num_time_samples = num_samples
    if isinstance(num_time_samples, bool) or not isinstance(num_time_samples, int) or num_time_samples < 1:
        raise ValueError(f"num_time_samples must be a positive integer, got {num_time_samples!r}.")
    return num_time_samples


# save_pretrained copies this file and every file it imports next to the weights (trust_remote_code); the
# config's auto_map (set in MDMPrimeConfig) also names AutoConfig and AutoModelForMaskedLM.
MDMPrimeForMaskedDiffusion.register_for_auto_class("AutoModel")

__all__ = [
    "MDMPrimeDiffusionOutput",
    "MDMPrimeForMaskedDiffusion",
    "MDMPrimeModel",
    "MDMPrimeNLLOutput",
    "MDMPrimePreTrainedModel",
]
