"""Each sequence's own key/value cache, as the native step reads it.

A batch holds sequences of different lengths. Padding them to one length would make a sequence's
numbers depend on its neighbours (the softmax reduction runs over the padded length), so each
sequence keeps its own cache and attends over exactly that (``compressor.native.ops.attention``;
see :mod:`compressor.inference.decoder`).

A sliding-window layer (Gemma 2/3's local layers, Mistral, Qwen 2 with ``use_sliding_window``)
only ever reads its last ``window`` positions, so its cache is a ring of ``window + slack``
positions: position p lives at slot ``p % capacity`` in every layer (below its ring's size that
is slot p), and the kernel reads a window's positions in order across the wrap, so the numbers
are those of an unbounded cache. ``slack`` is the most new tokens one forward may write into a
sequence: they are written before any of them attends, so a ring must hold them beside the
window the first of them reads. A forward of more tokens is cut into pieces of ``slack``
(:meth:`compressor.inference.decoder.Decoder.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CacheShape:
    """What one sequence's cache holds: ``kv_heads × head_dim`` keys and values per position and layer, at most a ring's worth on sliding layers."""

    layers: int
    kv_heads: int
    head_dim: int
    windows: tuple[int, ...] = ()  # each layer's sliding window (0: attends to every position); () for none anywhere
    slack: int = 256  # the most new tokens one forward writes into a sequence

    def ring(self, layer: int) -> int | None:
        """The most positions ``layer`` ever holds (None: every position)."""
        window = self.windows[layer] if self.windows else 0
        return window + self.slack if window else None

    def positions(self, tokens: int) -> int:
        """Positions held over all layers by a sequence of ``tokens`` tokens."""
        rings = [self.ring(layer) for layer in range(self.layers)]
        return sum(tokens if ring is None else min(tokens, ring) for ring in rings)

    def bytes(self, tokens: int, itemsize: int = 4) -> int:
        """Bytes of keys and values held by a sequence of ``tokens`` tokens."""
        return 2 * self.positions(tokens) * self.kv_heads * self.head_dim * itemsize


class SequenceKV:
    """One sequence's keys and values for every layer, grown in place (capacity doubles), sliding layers' as rings."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, capacity: int = 64, limit: int | None = None):
        self.shape = shape
        self.length = 0  # tokens whose keys all layers hold
        self._reached = 0  # the most positions ever written: a ring's slots hold its last ``ring`` of them, some maybe cropped
        self.limit = limit  # growth never goes past it (the sequence's whole length, when known)
        self._rings = [shape.ring(layer) for layer in range(shape.layers)]
        self.keys = [torch.empty((shape.kv_heads, self._start(layer, capacity), shape.head_dim), dtype=dtype) for layer in range(shape.layers)]
        self.values = [torch.empty_like(k) for k in self.keys]
        self._room = self._fits()
        self._addresses: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def addresses(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each layer's key buffer address, value buffer address and capacity (for the native step; current after growth)."""
        if self._addresses is None:
            self._addresses = (np.array([t.data_ptr() for t in self.keys], dtype=np.uint64),
                               np.array([t.data_ptr() for t in self.values], dtype=np.uint64),
                               np.array([t.shape[1] for t in self.keys], dtype=np.int64))  # fmt: skip
        return self._addresses

    def reserve(self, needed: int) -> None:
        """Make room for positions up to ``needed`` in every layer (keys beyond ``length`` are not kept)."""
        if needed - self.length > self.shape.slack and any(ring is not None and needed > ring for ring in self._rings):
            raise ValueError(f"{needed - self.length} new tokens in one forward overwrite keys a ring of slack {self.shape.slack} must keep")
        self._reached = max(self._reached, needed)
        if needed <= self._room:  # every layer has room (a decode step's usual case)
            return
        for layer in range(len(self.keys)):
            if needed > self.keys[layer].shape[1] and self.keys[layer].shape[1] != self._rings[layer]:
                self._grow(layer, needed)
        self._room = self._fits()

    def crop(self, length: int) -> None:
        """Forget the positions from ``length`` on; refused where a ring has overwritten keys the next token would read."""
        # The next token at ``length`` reads back to length - window + 1; a wrapped ring holds
        # positions from reached - ring on, and ring - window is the slack.
        length = min(self.length, length)
        wrapped = any(ring is not None and self._reached > ring for ring in self._rings)
        if wrapped and self._reached - length > self.shape.slack + 1:
            raise ValueError(
                f"cannot crop {self.length} positions back to {length}: a sliding layer's ring keeps only the last {self.shape.slack + 1} positions' window"
            )
        self.length = length

    def _start(self, layer: int, capacity: int) -> int:
        ring = self._rings[layer]
        return capacity if ring is None else min(capacity, ring)

    def _fits(self) -> int | float:
        # The largest ``needed`` that no layer must grow for: a full ring never grows.
        return min((k.shape[1] for k, ring in zip(self.keys, self._rings) if k.shape[1] != ring), default=float("inf"))

    def _grow(self, layer: int, needed: int) -> None:
        # Below its full size a ring has not wrapped (positions sit at slots 0 .. length - 1), so
        # growing copies them as an unbounded cache's.
        capacity = self.keys[layer].shape[1]
        while capacity < needed:
            capacity *= 2
        if self.limit is not None:
            capacity = max(needed, min(capacity, self.limit))
        capacity = self._start(layer, capacity)
        for store in (self.keys, self.values):
            bigger = store[layer].new_empty((store[layer].shape[0], capacity, store[layer].shape[2]))
            bigger[:, : self.length] = store[layer][:, : self.length]
            store[layer] = bigger
        self._addresses = None
