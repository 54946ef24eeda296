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
from .generation_mdm_prime import MDMPrimeGenerationConfig, MDMPrimeGenerationMixin
from .losses_mdm_prime import (
    diffusion_terms,
    discrete_expected_step_terms,
    discrete_reveal_weights,
    genmd4_integrand,
    genmd4_step_kl,
    reinforce_leave_one_out,
    sample_mask_counts,
    sample_masking_time_corruption,
    sample_masks,
    sample_state_dependent_masks,
    state_dependent_mask_log_prob,
)

# transformers 4.57 copies only the modeling file's direct relative imports into a checkpoint.
from .sampling_mdm_prime import SamplerStrategy  # noqa: F401
from .schedules_mdm_prime import (
    NoiseSchedule,
    StateDependentPolynomialSchedule,
    get_noise_schedule,
    sample_times,
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


@dataclass
class _Corruption:
    """One draw of the forward process: ``masked`` ``(B, L, ℓ)``, the per-sequence ``weight`` ``(B,)`` of the
    continuous-time estimators, α and t ``(B,)`` (None for the count estimator), and the discrete-time
    ``step`` i in 1..T ``(B,)``."""

    masked: torch.Tensor
    weight: torch.Tensor | None
    alpha: torch.Tensor | None
    t: torch.Tensor | None
    step: torch.Tensor | None = None


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

    def _noise_level(self, alpha: torch.Tensor | None) -> torch.Tensor | None:
        return (1.0 - alpha) if self.config.time_conditioning and alpha is not None else None

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

    def _corrupt(
        self,
        clean: torch.Tensor,
        maskable: torch.Tensor,
        strata: torch.Tensor,
        schedule: NoiseSchedule,
        generator: torch.Generator | None,
        *,
        timesteps: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> _Corruption:
        """The forward process for one Monte-Carlo sample per sequence, shared by training and the bound.

        Args:
            clean: ``(B, L, ℓ)`` clean digits; maskable: ``(B, L)`` positions that may be masked.
            strata: ``(B,)`` low-discrepancy numbers in [0, 1) that place each sequence's sample.
            timesteps: explicit ``(B,)`` times (continuous time).
            num_steps: T for the discrete-time bound.
        Three estimators of the same bound (docs/concepts/honest-likelihoods.md):

        * count (continuous time, the default): k = 1 + floor(strata · N) of the N maskable elements, a
          uniform k-subset, weight N/k; a time-conditioned network is told the noise level
          t ~ Beta(k, N - k + 1) (:func:`sample_mask_counts`). Unbiased, weights bounded by N;
        * continuous time at given ``timesteps``: mask with probability 1 - α_t, weight ``w(t) = -α'/(1 - α)``;
        * discrete time: step i = 1 + floor(strata · T), t = i/T, s = (i-1)/T, mask with probability 1 - α_t;
          the caller sums the step's reveal set out (:func:`discrete_reveal_weights`).
        """
        if timesteps is None and num_steps is None:
            masked, weight, level = sample_mask_counts(
                maskable, self.codec.num_sub_tokens, strata, generator, return_level=True
            )
            # A time-conditioned network is told the masking probability t ~ Beta(k, N - k + 1) (see
            # sample_mask_counts); a time-independent one needs no t at all.
            alpha = 1.0 - level if self.config.time_conditioning else None
            return _Corruption(masked, weight.double(), alpha, None)
        if num_steps is not None:
            step = torch.floor(strata.double() * num_steps) + 1
            t = step / num_steps
            alpha = schedule.alpha(t)
            return _Corruption(sample_masks(clean.shape, alpha, maskable, generator), None, alpha, t, step.long())
        t = timesteps
        alpha = schedule.alpha(t)
        return _Corruption(sample_masks(clean.shape, alpha, maskable, generator), schedule.weight(t).double(), alpha, t)

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
        if attention_pattern is not None and self.state_dependent:
            raise ValueError("attention_pattern is not supported with GenMD4 (learnable_polynomial) models.")
        ids, scored = self._prepare_tokens(input_ids, attention_mask)
        if labels is not None:
            if labels.shape != ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(ids.shape)}.")
            keep = labels == -100
            ids = torch.where(keep | ~scored, ids, labels)
            self.codec.check_ids(ids, "labels")
            scored = scored & ~keep
        batch = ids.shape[0]
        if timesteps is not None:
            timesteps = torch.as_tensor(timesteps, device=ids.device, dtype=torch.float64)
            if timesteps.dim() > 1 or timesteps.numel() not in (1, batch):
                raise ValueError(
                    f"timesteps must be a scalar or have shape ({batch},) (one time per sequence), got "
                    f"{tuple(timesteps.shape)}."
                )
            timesteps = timesteps.reshape(-1).expand(batch)
            if bool((~((timesteps > 0) & (timesteps <= 1))).any()):
                raise ValueError(f"timesteps must lie in (0, 1], got {timesteps.tolist()}.")
        if self.state_dependent:
            output = self._genmd4_forward(ids, scored, attention_mask, timesteps, generator)
            return output if return_dict else output.to_tuple()
        clean = self.codec.encode(ids, check=False)
        strata = 1.0 - sample_times(batch, generator=generator, device=ids.device, dtype=torch.float64)
        noise = self._corrupt(clean, scored, strata, self.noise_schedule, generator, timesteps=timesteps)
        masked, seq_weight = noise.masked, noise.weight.float()
        rows = masked.any(-1)
        logits = self.token_logits(
            clean.masked_fill(masked, self.codec.mask_id),
            attention_mask,
            self._noise_level(noise.alpha),
            rows,
            attention_pattern=attention_pattern,
        )
        valid, prime = diffusion_terms(logits, ids[rows], masked[rows], self.codec, self.config.carry_over)
        weight = seq_weight.unsqueeze(1).expand_as(rows)[rows]
        num_tokens = scored.sum()
        denom = num_tokens.clamp(min=1)
        elbo = (weight * valid).sum() / denom
        paper_objective = (weight * prime).sum() / denom
        loss = elbo if self.config.loss_type == "elbo" else paper_objective
        output = MDMPrimeDiffusionOutput(
            loss=loss,
            elbo=elbo.detach(),
            paper_objective=paper_objective.detach(),
            timesteps=None if noise.t is None else noise.t.float(),
            num_tokens=num_tokens,
        )
        return output if return_dict else output.to_tuple()

    def _genmd4_sample(
        self,
        ids: torch.Tensor,
        scored: torch.Tensor,
        attention_mask: torch.Tensor | None,
        powers: torch.Tensor,
        generator: torch.Generator | None,
        *,
        strata: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draw of the forward process per row (ℓ = 1), scored by one network call.

        With ``strata`` ``(B,)``: the masking-time estimator (:func:`sample_masking_time_corruption`): t = τ_J, the
        estimate is ``(N / W(z)) Σ_{masked n} g_n`` and the sample's log-density ``log r = log q(z | t) + log W(z)``
        (+ terms without powers). With ``t`` ``(B,)``: masks from q(z | t), the estimate is the integrand at t,
        ``(1/t) Σ g_n``, and ``log r = log q(z | t)``. ``g`` is :func:`genmd4_integrand`.

        Returns:
            ``(B,)`` float32 estimates (differentiable in the network and the powers), ``(B,)`` float64 ``log r``
            (differentiable in the powers: the score-function term), ``(B, L)`` masks, the ``(N, C)`` logits at
            the masked positions (row-major) and the ``(B,)`` float64 times.
        """
        schedule = StateDependentPolynomialSchedule(powers, 0.0)
        if strata is not None:
            t, masked, total_power = sample_masking_time_corruption(ids, powers, scored, strata, generator)
        else:
            log_mask = schedule.log_masking_probability(t.unsqueeze(1), ids)
            masked = sample_state_dependent_masks(ids, log_mask, scored, generator)
        log_mask = schedule.log_masking_probability(t.unsqueeze(1), ids)  # (B, L) float64
        log_r = state_dependent_mask_log_prob(masked, log_mask, schedule.log_alpha(t.unsqueeze(1), ids), scored)
        sub_ids = ids.masked_fill(masked, self.codec.mask_id).unsqueeze(-1)
        # The network is told t itself: under a state-dependent schedule there is no single masking probability to
        # tell it, and the posterior q(x0 | x_t) depends on t through every t^{w_i} (at w = 1, t is MD4's 1 - α_t).
        logits = self.token_logits(sub_ids, attention_mask, t.float(), masked, check_inputs=False)
        g = genmd4_integrand(logits, ids[masked], powers)
        row_of = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(masked)[masked]
        sums = torch.zeros(ids.shape[0], dtype=g.dtype, device=ids.device).index_add(0, row_of, g)
        if strata is not None:
            tiny = torch.finfo(torch.float64).tiny
            count = scored.sum(1).to(total_power.dtype)
            weight = torch.where(count > 0, count / total_power.clamp(min=tiny), torch.zeros_like(total_power))
            log_r = log_r + torch.log(total_power.clamp(min=tiny))
        else:
            weight = 1.0 / t
        return weight.to(sums.dtype) * sums, log_r, masked, logits, t

    def _genmd4_forward(
        self,
        ids: torch.Tensor,
        scored: torch.Tensor,
        attention_mask: torch.Tensor | None,
        timesteps: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> MDMPrimeDiffusionOutput:
        """GenMD4's training objective (docs/concepts/genmd4.md) on the endpoint-exact schedule
        ``α_{t,i} = 1 - t^{w_i}`` (α(0) = 1 and α(1) = 0 exactly, so there is no prior or reconstruction term).

        Per sequence, two independent draws k = 1, 2 (scored in one network call of 2B rows) give unbiased
        estimates of the continuous-time NELBO ``∫ (1/t) E_q[Σ_{masked n} g_n] dt``,
        ``g = Σ_j w_j μ_j - w_{x_n} - w_{x_n} log μ_{x_n}``:

        * by default, the masking-time estimator (:func:`sample_masking_time_corruption`): t is the masking time
          of a uniformly chosen position (antithetic strata over the batch), ``L_k = (N / W(z_k)) Σ g``. The count
          estimator does not apply (which positions are masked depends on their values), and t ~ U(0, 1) with the
          1/t weight has a divergent second moment; this estimator has neither problem;
        * with explicit ``timesteps``: two masks at that t, ``L_k = (1/t) Σ g``.

        ``loss`` is the REINFORCE leave-one-out surrogate (:func:`reinforce_leave_one_out`, with the log-density
        of each draw), ``elbo`` = ½(L1 + L2); both per scored token.
        """
        batch = ids.shape[0]
        powers = self.powers
        pair = dict(
            ids=ids.repeat(2, 1),
            scored=scored.repeat(2, 1),
            attention_mask=None if attention_mask is None else attention_mask.repeat(2, 1),
        )
        if timesteps is None:
            # Two independent antithetic sets: the two draws of a row must be independent for the LOO baseline.
            strata = torch.cat(
                [1.0 - sample_times(batch, generator=generator, device=ids.device, dtype=torch.float64) for _ in "12"]
            )
            estimates, log_r, _, _, t = self._genmd4_sample(**pair, powers=powers, generator=generator, strata=strata)
        else:
            estimates, log_r, _, _, t = self._genmd4_sample(
                **pair, powers=powers, generator=generator, t=timesteps.repeat(2)
            )
        per_sequence = estimates.view(2, batch)
        log_r = log_r.to(per_sequence.dtype).view(2, batch)
        surrogate = reinforce_leave_one_out(per_sequence[0], per_sequence[1], log_r[0], log_r[1])
        num_tokens = scored.sum()
        denom = num_tokens.clamp(min=1)
        loss = surrogate.sum() / denom
        elbo = (0.5 * per_sequence.sum(0)).sum().detach() / denom
        w = powers.detach()
        return MDMPrimeDiffusionOutput(
            loss=loss,
            elbo=elbo,
            paper_objective=elbo,  # ℓ = 1: the paper objective is the bound
            timesteps=t[:batch].float(),
            num_tokens=num_tokens,
            power_max=w.max(),
            power_min=w.min(),
            power_mean=w.mean(),
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
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer or None, got {num_steps!r}.")
        ids, real = self._prepare_tokens(input_ids, attention_mask)
        scored = real
        if scored_mask is not None:
            if scored_mask.shape != ids.shape:
                raise ValueError(
                    f"scored_mask shape {tuple(scored_mask.shape)} does not match input_ids {tuple(ids.shape)}."
                )
            scored = real & scored_mask.bool()
        row_generators = isinstance(generator, (list, tuple))
        if row_generators and len(generator) != ids.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {ids.shape[0]} rows; expected one per row.")
        if self.state_dependent:
            if scored_mask is not None or row_generators:
                raise ValueError(
                    "GenMD4 models (noise_schedule='learnable_polynomial') take neither scored_mask nor per-row "
                    "generators: their masking-time estimator scores whole sequences."
                )
            return self._genmd4_nll_bound(ids, scored, attention_mask, num_samples, num_steps, generator)
        batch, device = ids.shape[0], ids.device
        schedule = self.noise_schedule.exact()
        clean = self.codec.encode(ids, check=False)
        if row_generators:
            u = torch.cat([torch.rand(1, 1, generator=g, device=g.device, dtype=torch.float64) for g in generator])
            u = u.to(device)
        else:
            u = torch.rand(batch, 1, generator=generator, device=device, dtype=torch.float64)
        strata = torch.remainder(u + torch.arange(num_samples, device=device) / num_samples, 1.0)  # (B, K)
        if num_steps is not None:
            alphas = schedule.alpha(torch.arange(num_steps + 1, device=device, dtype=torch.float64) / num_steps)
        valid_samples = torch.zeros(batch, num_samples, dtype=torch.float64, device=device)
        prime_samples = torch.zeros_like(valid_samples)
        was_training = self.training
        self.eval()  # a likelihood is a property of the model, not of a dropout mask
        try:
            for k in range(num_samples):
                if row_generators:
                    noise = self._corrupt_rows(clean, scored, real, strata[:, k], schedule, generator, num_steps)
                else:
                    noise = self._corrupt(clean, scored, strata[:, k], schedule, generator, num_steps=num_steps)
                masked = noise.masked
                rows = masked.any(-1)
                logits = self.token_logits(
                    clean.masked_fill(masked, self.codec.mask_id), attention_mask, self._noise_level(noise.alpha), rows
                )
                row_batch = torch.arange(batch, device=device).unsqueeze(1).expand_as(rows)[rows]
                if num_steps is None:
                    valid, prime = diffusion_terms(logits, ids[rows], masked[rows], self.codec, self.config.carry_over)
                    valid_samples[:, k].index_add_(0, row_batch, valid.double())
                    prime_samples[:, k].index_add_(0, row_batch, prime.double())
                    valid_samples[:, k] *= noise.weight
                    prime_samples[:, k] *= noise.weight
                else:
                    # The reveal set is summed out exactly and, for a time-independent network, so is the step
                    # given the number of masked digits (discrete_reveal_weights): far less variance than one
                    # sampled step and reveal set times T.
                    weights = discrete_reveal_weights(
                        alphas,
                        masked.sum((1, 2)),
                        scored.sum(1) * self.codec.num_sub_tokens,
                        self.codec.num_sub_tokens,
                        steps=noise.step if self.config.time_conditioning else None,
                    )
                    terms = discrete_expected_step_terms(
                        logits, ids[rows], masked[rows], weights[row_batch], self.codec, self.config.carry_over
                    )
                    valid_samples[:, k].index_add_(0, row_batch, terms)
        finally:
            self.train(was_training)

        nll, nll_stderr = _mean_and_stderr(valid_samples)
        prime, prime_stderr = _mean_and_stderr(prime_samples) if num_steps is None else (None, None)
        return MDMPrimeNLLOutput(
            nll=nll,
            nll_stderr=nll_stderr,
            num_tokens=scored.sum(1),
            paper_objective=prime,
            paper_objective_stderr=prime_stderr,
            nll_samples=valid_samples,
        )

    def _corrupt_rows(
        self,
        clean: torch.Tensor,
        maskable: torch.Tensor,
        real: torch.Tensor,
        strata: torch.Tensor,
        schedule: NoiseSchedule,
        generators: Sequence[torch.Generator],
        num_steps: int | None,
    ) -> _Corruption:
        """:meth:`_corrupt` with one generator per row, each drawing over its own row's real tokens only (so the
        draws of a row do not depend on the other rows, the padding or the batch width)."""
        masked = torch.zeros_like(clean, dtype=torch.bool)
        rows = []
        for b, g in enumerate(generators):
            keep = real[b]
            row = self._corrupt(
                clean[b : b + 1, keep].to(g.device),
                maskable[b : b + 1, keep].to(g.device),
                strata[b : b + 1].to(g.device),
                schedule,
                g,
                num_steps=num_steps,
            )
            masked[b, keep] = row.masked[0].to(clean.device)
            rows.append(row)

        def gather(name: str) -> torch.Tensor | None:
            values = [getattr(row, name) for row in rows]
            return None if values[0] is None else torch.cat(values).to(clean.device)

        return _Corruption(masked, gather("weight"), gather("alpha"), gather("t"), gather("step"))

    @torch.no_grad()
    def _genmd4_nll_bound(
        self,
        ids: torch.Tensor,
        scored: torch.Tensor,
        attention_mask: torch.Tensor | None,
        num_samples: int,
        num_steps: int | None,
        generator: torch.Generator | None,
    ) -> MDMPrimeNLLOutput:
        """:meth:`nll_bound` of a GenMD4 model, on the endpoint-exact schedule ``α_{t,i} = 1 - t^{w_i}``
        (α(0) = 1, α(1) = 0 for every value: no prior and no reconstruction term is dropped or needed).

        Continuous time: per sample, one draw of the masking-time estimator (stratified over the K samples:
        :func:`sample_masking_time_corruption`), ``(N / W(z)) Σ_{masked n} [Σ_j w_j μ_j - w_x - w_x log μ_x]``,
        unbiased with weights bounded by N / (|z| min w). Discrete time (T steps, t = i/T, s = (i-1)/T,
        i ~ U{1..T}): ``T Σ_{masked n} KL_n`` with the per-position KL of the state-dependent reverse kernels in
        closed form (:func:`genmd4_step_kl`), so the reveal sets need not be sampled. Both end points are exact.
        """
        batch, device = ids.shape[0], ids.device
        powers = self.powers.detach()
        u = torch.rand(batch, 1, generator=generator, device=device, dtype=torch.float64)
        strata = torch.remainder(u + torch.arange(num_samples, device=device) / num_samples, 1.0)  # (B, K)
        samples = torch.zeros(batch, num_samples, dtype=torch.float64, device=device)
        was_training = self.training
        self.eval()
        try:
            for k in range(num_samples):
                if num_steps is None:
                    estimate, *_ = self._genmd4_sample(
                        ids, scored, attention_mask, powers, generator, strata=strata[:, k]
                    )
                    samples[:, k] = estimate.double()
                else:
                    step = torch.floor(strata[:, k] * num_steps) + 1
                    t, s = step / num_steps, (step - 1) / num_steps
                    _, _, masked, logits, _ = self._genmd4_sample(ids, scored, attention_mask, powers, generator, t=t)
                    row_of = torch.arange(batch, device=device).unsqueeze(1).expand_as(masked)[masked]
                    kl = genmd4_step_kl(logits.float().log_softmax(-1), ids[masked], powers, t[row_of], s[row_of])
                    samples[:, k].index_add_(0, row_of, kl * num_steps)
        finally:
            self.train(was_training)
        nll, nll_stderr = _mean_and_stderr(samples)
        return MDMPrimeNLLOutput(
            nll=nll,
            nll_stderr=nll_stderr,
            num_tokens=scored.sum(1),
            paper_objective=nll if num_steps is None else None,  # ℓ = 1: the paper objective is the bound
            paper_objective_stderr=nll_stderr if num_steps is None else None,
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


def _mean_and_stderr(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, K)`` Monte-Carlo samples -> their ``(B,)`` means and standard errors (NaN for K = 1)."""
    num_samples = samples.shape[1]
    if num_samples > 1:
        return samples.mean(1), samples.std(1) / math.sqrt(num_samples)
    return samples.mean(1), torch.full_like(samples[:, 0], float("nan"))


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
