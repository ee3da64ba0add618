"""Each sequence's own key/value cache, as the native step reads it.

A batch holds sequences of different lengths. Padding them to one length would make a sequence's
numbers depend on its neighbours (the softmax reduction runs over the padded length), so each
sequence keeps its own cache and attends over exactly that (``compressor.native.ops.attention``;
see :mod:`compressor.inference.decoder`).
"""

from __future__ import annotations

import numpy as np
import torch


class SequenceKV:
    """One sequence's keys and values for every layer, grown in place (capacity doubles)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 64, limit: int | None = None):
        self.length = 0  # tokens whose keys all layers hold
        self.limit = limit  # growth never goes past it (the sequence's whole length, when known)
        shape = (kv_heads, capacity, head_dim)
        self._capacity = capacity  # the least any layer holds
        self.keys = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self._addresses: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def addresses(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each layer's key buffer address, value buffer address and capacity (for the native step; current after growth)."""
        if self._addresses is None:
            self._addresses = (np.array([t.data_ptr() for t in self.keys], dtype=np.uint64),
                               np.array([t.data_ptr() for t in self.values], dtype=np.uint64),
                               np.array([t.shape[1] for t in self.keys], dtype=np.int64))  # fmt: skip
        return self._addresses

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` positions in every layer (keys beyond ``length`` are not kept)."""
        if needed <= self._capacity:  # every layer has room (a decode step's usual case)
            return
        for layer in range(len(self.keys)):
            if needed > self.keys[layer].shape[1]:
                self._grow(layer, needed)
        self._capacity = min(k.shape[1] for k in self.keys)

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
        self._addresses = None
