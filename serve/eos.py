"""Which token ids end a generation."""

from __future__ import annotations


def eos_set(model_eos: int | list[int] | None, tokenizer) -> set[int]:
    """End-of-sequence ids: the model's generation config's, plus the tokenizer's own."""
    ids = set(model_eos if isinstance(model_eos, list) else [] if model_eos is None else [model_eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
