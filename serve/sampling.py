"""Choosing the next token from one row's logits: greedy, or temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import torch

from .types import SamplingParams


def generator_for(params: SamplingParams) -> torch.Generator | None:
    """The request's own random stream (seeded when asked), so its samples do not depend on its neighbours."""
    if params.temperature == 0:
        return None
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def pick(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """Next token id from a ``(vocab,)`` row of logits."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        outside = probs.cumsum(0) - probs >= params.top_p
        probs = probs.masked_fill(outside, 0)
        return int(order[torch.multinomial(probs, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))
