"""Configuration of MDM-Prime / MD4 masked diffusion language models.

This file is shipped as remote code and loaded alone by ``AutoConfig``: it imports neither torch
nor any sibling module.
"""

from __future__ import annotations

import math
import numbers

from transformers import PretrainedConfig

NOISE_SCHEDULES = ("linear", "polynomial", "cosine", "geometric", "learnable_polynomial")
# GenMD4 (method.md §2): one learnable power per token value, α_{t,i} = 1 - t^{w_i}.
STATE_DEPENDENT_SCHEDULES = ("learnable_polynomial",)
LOSS_TYPES = ("elbo", "prime")

AUTO_MAP = {
    "AutoConfig": "configuration_mdm_prime.MDMPrimeConfig",
    "AutoModel": "modeling_mdm_prime.MDMPrimeForMaskedDiffusion",
    "AutoModelForMaskedLM": "modeling_mdm_prime.MDMPrimeForMaskedDiffusion",
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
            ``"learnable_polynomial"`` (GenMD4, method.md §2: ``α_{t,i} = 1 - t^{w_i}``, ``w = softplus(ŵ)``, one
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
    """

    model_type = "mdm_prime"

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
        max_sub_tokens = (vocab_size - 1).bit_length()
        if hidden_size % num_sub_tokens:
            divisible = [d for d in range(1, max_sub_tokens + 1) if hidden_size % d == 0]
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_sub_tokens={num_sub_tokens}: the "
                f"{num_sub_tokens} sub-token embeddings are concatenated into one hidden vector. Choose "
                f"hidden_size as a multiple of {num_sub_tokens} or num_sub_tokens in {divisible}."
            )
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_heads}.")
        if (hidden_size // num_heads) % 2:
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
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be 'elbo' (the valid NLL bound) or 'prime' (the paper objective), "
                f"got {self.loss_type!r}."
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


__all__ = ["MDMPrimeConfig"]
