"""Attention over each sequence's own key/value cache, plugged into transformers' attention interface.

A decode batch holds sequences of different lengths. Padding them to one length would make a
sequence's numbers depend on its neighbours (the softmax reduction runs over the padded length), so
each row attends over exactly its own cache. The model's linear layers still run once for the whole
batch; only this step is per sequence. The model is called without a transformers cache and with
``kv=`` a :class:`StepKV`; every attention layer receives it through the forward's keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig

from compressor.architecture import attention_problems

from .kernels import attend_one

NAME = "compressor_ragged"


class SequenceKV:
    """One sequence's keys and values for every layer, grown in place (capacity doubles)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 64, limit: int | None = None):
        self.length = 0  # tokens whose keys all layers hold
        self.limit = limit  # growth never goes past it (the sequence's whole length, when known)
        self._shape = (kv_heads, capacity, head_dim)
        self.keys = [torch.empty(self._shape, dtype=dtype) for _ in range(layers)]
        self.values = [torch.empty(self._shape, dtype=dtype) for _ in range(layers)]

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``(kv_heads, T, head_dim)`` new keys and values at ``layer``; return all of them so far."""
        start, new = self.length, key.shape[1]
        if start + new > self.keys[layer].shape[1]:
            self._grow(layer, start + new)
        self.keys[layer][:, start : start + new] = key
        self.values[layer][:, start : start + new] = value
        return self.keys[layer][:, : start + new], self.values[layer][:, : start + new]

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions in every layer (keys beyond ``length`` are not kept)."""
        for layer in range(len(self.keys)):
            if needed > self.keys[layer].shape[1]:
                self._grow(layer, needed)

    def _grow(self, layer: int, needed: int) -> None:
        capacity = self.keys[layer].shape[1]
        while capacity < needed:
            capacity *= 2
        if self.limit is not None:
            capacity = max(needed, min(capacity, self.limit))
        for store in (self.keys, self.values):
            bigger = store[layer].new_empty((store[layer].shape[0], capacity, store[layer].shape[2]))
            bigger[:, : self.length] = store[layer][:, : self.length]
            store[layer] = bigger


@dataclass
class StepKV:
    """The caches of one forward's rows, in batch order."""

    rows: list[SequenceKV]

    def advance(self, tokens: int) -> None:
        """After the forward: every row's cache now holds ``tokens`` more positions."""
        for seq in self.rows:
            seq.length += tokens


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kv: StepKV | None = None, **kwargs):
    """transformers attention function: each row attends over its own cache (``kv``), causally."""
    if kv is None:
        raise RuntimeError(f"{NAME} attention needs kv= (a StepKV) in the model call")
    batch, heads, new, head_dim = query.shape
    out = query.new_empty((batch, new, heads, head_dim))
    for b, seq in enumerate(kv.rows):
        keys, values = seq.append(module.layer_idx, key[b], value[b])
        if new == 1:
            # A kernel call per sequence: the fused attention's set-up costs more than the work here.
            attend_one(query[b, :, 0].contiguous().numpy(), seq.keys[module.layer_idx].numpy(), seq.values[module.layer_idx].numpy(),
                       keys.shape[1], np.float32(scaling or head_dim**-0.5), out[b, 0].numpy())  # fmt: skip
            continue
        past = keys.shape[1] - new
        # New tokens see everything cached before them and each other causally.
        mask = torch.ones(new, past + new, dtype=torch.bool).tril(past)
        o = F.scaled_dot_product_attention(query[b : b + 1], keys[None], values[None], attn_mask=mask, scale=scaling, enable_gqa=True)
        out[b] = o[0].transpose(0, 1)
    return out, None


def _no_mask(*args, **kwargs):
    # Masks are per sequence inside ragged_attention; the model builds none.
    return None


def install(model) -> None:
    """Make ``model`` attend with :func:`ragged_attention`; refuse architectures whose attention it would get wrong."""
    check_supported(model.config)
    AttentionInterface.register(NAME, ragged_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    model.set_attn_implementation(NAME)


def check_supported(config: PretrainedConfig) -> None:
    """Raise ValueError for attention that is not plain causal softmax attention (sliding windows, soft-capping)."""
    problems = attention_problems(config)
    if problems:
        raise ValueError(f"{config.model_type}: the server does not support {', '.join(problems)}")