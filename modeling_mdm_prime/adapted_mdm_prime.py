"""The backbone of a model adapted from a pretrained causal LM (docs/guides/adaptation.md).

The source architecture's own transformers model (``LlamaModel``, ``Qwen2Model``, ``GPT2Model``: RMSNorm, SwiGLU,
grouped-query attention and RoPE, or GPT-2's blocks) is built with ``AutoModel.from_config`` from
``MDMPrimeConfig.transformer_config`` and run bidirectionally: it is always given an explicit 4-D attention mask,
which transformers uses as is on both the 4.57 and the 5.x line, so no causal mask is ever added. Its input is
the embedding of partially masked sub-tokens:

    e(y) = E[x]                                      if every digit of y is revealed (x = decode(y))
    e(y) = mean_{x ∈ [0, C) consistent with y} E[x] + m_A    otherwise, A = the set of revealed digits

E is the source model's token embedding and ``m_A`` a learned offset per pattern of revealed digits (zero at
initialisation). A fully revealed token therefore sees exactly the source's embedding; a fully masked one starts
as the mean embedding (the mask token); a partially revealed one as the mean of the tokens it can still become.
The means are recomputed from E at every call, so they stay means as E trains.

Plain torch on top of transformers: no I/O.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.modeling_outputs import BaseModelOutput

from .codec_mdm_prime import SubTokenCodec
from .configuration_mdm_prime import MDMPrimeConfig


def consistent_mean_table(weight: torch.Tensor, codec: SubTokenCodec, pattern: int) -> torch.Tensor:
    """Mean embedding of the tokens consistent with each assignment of the revealed digits of ``pattern``.

    Args:
        weight: ``(C, D)`` token embedding E.
        codec: the sub-token codec (ℓ digits of base b, most significant first).
        pattern: bit j set when digit j is revealed; not every bit ("all revealed" needs no table).
    Returns:
        ``(b^|A|, D)``: row ``Σ_{j ∈ A} y^j b^(rank of j in A)`` (revealed digits in order, most significant first)
        holds ``mean_{x: x^j = y^j ∀ j ∈ A} E[x]``. Rows with no consistent token (digit values only invalid codes
        have) are 0.
    """
    ell, base = codec.num_sub_tokens, codec.base
    vocab, dim = weight.shape
    padded = torch.cat([weight, weight.new_zeros(codec.num_codes - vocab, dim)]).view(*([base] * ell), dim)
    valid = torch.zeros(codec.num_codes, dtype=weight.dtype, device=weight.device)
    valid[:vocab] = 1
    hidden_axes = [j for j in range(ell) if not pattern >> j & 1]
    total = padded.sum(dim=hidden_axes)
    count = valid.view(*([base] * ell)).sum(dim=hidden_axes)
    return (total / count.clamp(min=1).unsqueeze(-1)).reshape(-1, dim)


def partial_token_embeddings(
    sub_ids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, codec: SubTokenCodec
) -> torch.Tensor:
    """``e(y)`` of the module docstring.

    Args:
        sub_ids: ``(B, L, ℓ)`` digits in ``[0, b)`` or the mask id b.
        weight: ``(C, D)`` token embedding E.
        offsets: ``(2^ℓ - 1, D)`` learned offsets ``m_A``, one per pattern that is not fully revealed.
    Returns:
        ``(B, L, D)`` input embeddings in E's dtype.
    """
    ell = codec.num_sub_tokens
    revealed = sub_ids != codec.mask_id  # (B, L, ℓ)
    pattern = (revealed.long() << torch.arange(ell, device=sub_ids.device)).sum(-1)  # (B, L)
    full = pattern == (1 << ell) - 1
    out = weight.new_zeros(*sub_ids.shape[:2], weight.shape[1])
    if bool(full.any()):
        out[full] = weight[codec.decode(sub_ids[full])]
    for code in pattern[~full].unique().tolist():  # only the patterns this batch holds
        rows = pattern == code
        digits = sub_ids[rows]
        index = torch.zeros(len(digits), dtype=torch.long, device=sub_ids.device)
        for j in range(ell):  # revealed digits in order: a base-b number, most significant first
            if code >> j & 1:
                index = index * codec.base + digits[:, j]
        out[rows] = consistent_mean_table(weight, codec, code)[index] + offsets[code]
    return out


def attention_bias(
    attention_mask: torch.Tensor | None,
    attention_pattern: torch.Tensor | None,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The additive ``(B, 1, L, L)`` mask handed to the transformers model: 0 where query i may attend to key j,
    the dtype's minimum elsewhere (the format both eager and SDPA attention add to their scores).

    Args:
        attention_mask: ``(B, L)`` 1 for real tokens; padding is never attended to.
        attention_pattern: optional ``(L, L)`` or ``(B, L, L)`` bool, True where query i may attend to key j
            (causal for the exactness check, ``causal OR Bernoulli(r)`` for attention-mask annealing); default
            all True (bidirectional).
    A query row left with no key (a padded position) attends everywhere instead, so no row is all -inf.
    """
    batch, length = shape
    allowed = torch.ones(batch, length, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        if attention_mask.shape != shape:
            raise ValueError(f"attention_mask must have shape {shape} like the input, got {attention_mask.shape}.")
        allowed = allowed & attention_mask.bool()[:, None, :]
    if attention_pattern is not None:
        if attention_pattern.shape[-2:] != (length, length) or attention_pattern.dim() not in (2, 3):
            raise ValueError(
                f"attention_pattern must have shape ({length}, {length}) or ({batch}, {length}, {length}), got "
                f"{tuple(attention_pattern.shape)}."
            )
        allowed = allowed & attention_pattern.to(device=device, dtype=torch.bool)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    bias = torch.zeros(batch, 1, length, length, dtype=dtype, device=device)
    return bias.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class MDMPrimeAdaptedModel(nn.Module):
    """Partially masked sub-tokens ``(B, L, ℓ)`` -> hidden states ``(B, L, D)`` through a transformers model of the
    source architecture, bidirectional. The output layer (the source's head) lives in the outer model."""

    def __init__(self, config: MDMPrimeConfig):
        super().__init__()
        self.config = config
        self.codec = SubTokenCodec(config.vocab_size, config.num_sub_tokens)
        settings = dict(config.transformer_config)
        inner = AutoConfig.for_model(settings.pop("model_type"), **settings)
        implementation = getattr(config, "_attn_implementation", None)
        self.transformer = AutoModel.from_config(
            inner, attn_implementation=implementation if implementation in ("eager", "sdpa") else "sdpa"
        )
        self.mask_offsets = nn.Parameter(torch.zeros((1 << config.num_sub_tokens) - 1, config.hidden_size))
        self.make_bidirectional()

    @property
    def tied_output(self) -> bool:
        """Whether the source ties its output layer to the token embedding (SmolLM2, GPT-2, small Qwen2)."""
        return bool(getattr(self.transformer.config, "tie_word_embeddings", False))

    def make_bidirectional(self) -> None:
        """Clear the causal flags of the attention modules. The explicit 4-D mask already decides what attends to
        what; transformers 4.57's GPT-2 eager attention also multiplies in its own lower-triangular ``bias`` buffer
        (not saved with the weights), which is filled with True here."""
        for module in self.transformer.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
            buffer = getattr(module, "bias", None)
            if isinstance(buffer, torch.Tensor) and buffer.dtype == torch.bool and not isinstance(buffer, nn.Parameter):
                buffer.fill_(True)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.get_input_embeddings()

    def forward(
        self,
        sub_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        noise_level: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        check_inputs: bool = True,
        attention_pattern: torch.Tensor | None = None,
    ) -> BaseModelOutput | tuple:
        """
        Args:
            sub_ids: ``(B, L, ℓ)`` digits in ``[0, b)`` or the mask id ``b``.
            attention_mask: ``(B, L)``, 1 for real tokens, 0 for padding (never attended to).
            noise_level: unused (adapted models are not time conditioned); accepted for a common signature.
            attention_pattern: optional ``(L, L)`` / ``(B, L, L)`` bool of allowed (query, key) pairs.
        Returns:
            ``BaseModelOutput`` with ``last_hidden_state`` ``(B, L, D)`` (after the source's final norm).
        """
        batch, length = self.codec.check_sequence(sub_ids, self.config.max_position_embeddings, check_inputs)
        weight = self.get_input_embeddings().weight
        embeds = partial_token_embeddings(sub_ids, weight, self.mask_offsets.to(weight.dtype), self.codec)
        bias = attention_bias(attention_mask, attention_pattern, (batch, length), embeds.dtype, embeds.device)
        out = self.transformer(
            inputs_embeds=embeds,
            attention_mask=bias,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        if return_dict is False:
            return tuple(v for v in (out.last_hidden_state, out.hidden_states) if v is not None)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)
