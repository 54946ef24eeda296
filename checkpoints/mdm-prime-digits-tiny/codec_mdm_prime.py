"""Sub-token codec: token ids <-> ℓ base-b digits, and the consistency filter (docs/concepts/partial-masking.md).

Plain torch: no model, no I/O.
"""

from __future__ import annotations

import torch

from .configuration_mdm_prime import check_sub_token_split, integer_base


class SubTokenCodec:
    """Bijection between token ids ``x ∈ [0, C)`` and digit tuples ``y ∈ [0, b)^ℓ``, most significant first.

    ``y^j = floor(x / b^(ℓ-j)) mod b`` for j = 1..ℓ and ``x = Σ_j y^j b^(ℓ-j)``. Codes ``C .. b^ℓ - 1`` are
    invalid: never produced by :meth:`encode`, rejected by :meth:`decode`, and never consistent.
    The mask sub-token is ``mask_id = b``.
    """

    def __init__(self, vocab_size: int, num_sub_tokens: int):
        self.vocab_size = int(vocab_size)
        self.num_sub_tokens = int(num_sub_tokens)
        self.base = check_sub_token_split(self.vocab_size, self.num_sub_tokens)
        self.mask_id = self.base
        self.num_codes = self.base**self.num_sub_tokens
        # Place values b^(ℓ-1), ..., b, 1 as Python ints (exact; b^ℓ < 2^63 for any sane vocabulary).
        self.place_values = [self.base ** (self.num_sub_tokens - 1 - j) for j in range(self.num_sub_tokens)]
        self._digit_tables: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"SubTokenCodec(vocab_size={self.vocab_size}, num_sub_tokens={self.num_sub_tokens}, base={self.base})"

    def _places(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.place_values, dtype=torch.long, device=device)

    def check_ids(self, ids: torch.Tensor, name: str = "input_ids") -> None:
        """Raise a ValueError unless every entry of ``ids`` is a token id in ``[0, C)``."""
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"{name} contains ids outside [0, {self.vocab_size}) (min {int(ids.min())}, max {int(ids.max())}); "
                "the tokenizer and the model's vocab_size disagree."
            )

    def check_sub_ids(self, sub_ids: torch.Tensor, name: str = "sub_ids") -> None:
        """Raise a ValueError unless ``sub_ids`` has shape (..., ℓ) with entries in ``[0, b]`` (b = mask)."""
        if sub_ids.is_floating_point() or sub_ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {sub_ids.dtype}.")
        if sub_ids.dim() < 1 or sub_ids.shape[-1] != self.num_sub_tokens:
            raise ValueError(
                f"{name} must have shape (..., {self.num_sub_tokens}) (one entry per sub-token), "
                f"got {tuple(sub_ids.shape)}."
            )
        if sub_ids.numel() and (int(sub_ids.min()) < 0 or int(sub_ids.max()) > self.mask_id):
            raise ValueError(
                f"{name} entries must be digits in [0, {self.base}) or the mask id {self.mask_id}, "
                f"got values in [{int(sub_ids.min())}, {int(sub_ids.max())}]."
            )

    def check_sequence(self, sub_ids: torch.Tensor, max_length: int, check_values: bool = True) -> tuple[int, int]:
        """``(B, L)`` of a backbone's input ``sub_ids`` ``(B, L, ℓ)``; a ValueError for another shape or L over
        ``max_length``, and (``check_values``) for entries outside ``[0, b]``."""
        if check_values:
            self.check_sub_ids(sub_ids)
        if sub_ids.dim() != 3:
            raise ValueError(
                f"sub_ids must have shape (batch, length, {self.num_sub_tokens}), got {tuple(sub_ids.shape)}."
            )
        batch, length, _ = sub_ids.shape
        if length > max_length:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings={max_length}.")
        return batch, length

    def encode(self, ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Token ids ``(...)`` -> digits ``(..., ℓ)``, most significant first. ``check=False`` skips the range
        check (a host synchronisation) for ids already validated at an entry point."""
        if check:
            self.check_ids(ids, "ids")
        return torch.div(ids.long().unsqueeze(-1), self._places(ids.device), rounding_mode="floor") % self.base

    def decode(self, sub_ids: torch.Tensor) -> torch.Tensor:
        """Digits ``(..., ℓ)`` without masks -> token ids ``(...)``. Invalid codes raise a ValueError."""
        self.check_sub_ids(sub_ids)
        if (sub_ids == self.mask_id).any():
            raise ValueError("cannot decode masked sub-tokens: every digit must be revealed.")
        ids = (sub_ids.long() * self._places(sub_ids.device)).sum(-1)
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise ValueError(
                f"sub_ids decode to invalid codes >= vocab_size={self.vocab_size} (max {int(ids.max())}): codes "
                f"{self.vocab_size}..{self.num_codes - 1} do not name a token."
            )
        return ids

    def digit_table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``(C, ℓ)`` long tensor: row x holds the digits of token x. Cached per device."""
        device = torch.device(device if device is not None else "cpu")
        table = self._digit_tables.get(device)
        if table is None:
            ids = torch.arange(self.vocab_size, device=device)
            table = torch.div(ids.unsqueeze(-1), self._places(device), rounding_mode="floor") % self.base
            self._digit_tables[device] = table
        return table

    def consistency_mask(self, sub_ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """The filter V(y): ``(..., ℓ)`` partially masked digits -> ``(..., C)`` bool.

        ``V(y)[x]`` is true iff every revealed digit of y equals the same digit of x. Built one digit at a
        time, so no ``(..., C, ℓ)`` tensor is materialised. ``check=False`` skips validating ``sub_ids``.
        """
        if check:
            self.check_sub_ids(sub_ids)
        table = self.digit_table(sub_ids.device)
        allowed = torch.ones(*sub_ids.shape[:-1], self.vocab_size, dtype=torch.bool, device=sub_ids.device)
        for j in range(self.num_sub_tokens):
            y_j = sub_ids[..., j : j + 1]
            allowed &= (table[:, j] == y_j) | (y_j == self.mask_id)
        return allowed

    def digits_to_bits(self, flags: torch.Tensor) -> torch.Tensor:
        """``(..., ℓ)`` bool flags over digit positions -> ``(...)`` long bitmask (bit j <-> digit j)."""
        weights = torch.tensor([1 << j for j in range(self.num_sub_tokens)], device=flags.device)
        return (flags.long() * weights).sum(-1)


__all__ = ["SubTokenCodec", "integer_base"]
