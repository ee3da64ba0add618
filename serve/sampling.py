"""Choosing the next token from one row's logits: penalties and biases, then greedy or sampled (temperature, top-k, top-p, min-p)."""

from __future__ import annotations

import torch

from .types import SamplingParams, TokenLogprob

# JSON has no -inf: a token the model rules out reports this log-probability (vLLM's choice too).
FLOOR_LOGPROB = -9999.0


def generator_for(params: SamplingParams) -> torch.Generator | None:
    """The request's own random stream (seeded when asked), so its samples do not depend on its neighbours."""
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed % 2**64)  # torch takes [0, 2**64); an int64 seed from the API maps onto it
    return gen


def adjust(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int], banned: frozenset[int]) -> torch.Tensor:
    """The row the sampler sees: penalties and ``logit_bias`` applied, ``banned`` tokens (an end before ``min_tokens``) ruled out.

    Returns ``logits`` itself when there is nothing to do, else a changed copy.
    """
    if not params.penalized and not banned:
        return logits
    logits = logits.float().clone()
    if params.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty
    for token, bias in params.logit_bias:
        logits[token] += bias
    if banned:
        logits[list(banned)] = float("-inf")
    return logits


def pick(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """Next token id from a ``(vocab,)`` row of logits."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    mass = 1.0
    if params.top_k and params.top_k < probs.numel():
        probs = probs.masked_fill(probs < probs.topk(params.top_k).values[-1], 0)
        mass = probs.sum()
    if params.min_p:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0)
        mass = probs.sum()
    if params.top_p < 1:
        probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        outside = probs.cumsum(0) - probs >= params.top_p * mass
        probs = probs.masked_fill(outside, 0)
        return int(order[torch.multinomial(probs, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def logprobs_of(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each row's log-probability of its token in ``tokens``, with the ``top`` most likely alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1).clamp(min=FLOOR_LOGPROB)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    if top:
        values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
        alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [()] * len(tokens)
    return [TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alternatives)]
