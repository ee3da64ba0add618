"""Give memory the allocator holds but no longer uses back to the system (glibc's ``malloc_trim``).

A training step frees hundreds of megabytes of activations and decoded weights; glibc keeps much of
it in its arenas, so the process's resident size stays at its peak. Trimming between steps returns
it at a cost of about a millisecond. Elsewhere than glibc this does nothing.

Within a step the heap fragments: each layer's transient buffers are freed around the small output
the next layer keeps, and the next layer's buffers no longer fit the holes, so the heap grows by
about a layer's transients per layer (SmolLM2, bfloat16 compute: 650 MB more than the 460 MB ever in
use); the backward, which recomputes a layer and then frees its buffers, fragments it the same way.
:func:`trim_every` trims after every few layers' forward and again when the backward reaches them,
so freed pages go back to the system before they pile up; a page given back costs a fault when it is
used again, hence not after every layer.

glibc maps every allocation of 32 MB or more afresh and unmaps it when freed, so each such tensor
pays a page fault per 4 kB it touches (14 ms of a 16 ms pass over a 1B model's 33.5 MB MLP rows on
this VM), and a smaller one pays the same after a trim has handed its heap pages back. A
:class:`BufferPool`, while active, hands a training step's tensors of 1 MB or more (:func:`empty`:
decoded weights, the products' outputs and gradients, norms, the activation, the head's logit
slices) out of buffers it keeps, so their pages fault in once a run.
"""

from __future__ import annotations

import contextvars
import ctypes
import ctypes.util
import math
import weakref
from collections import defaultdict
from functools import cache

import numpy as np
import torch
from torch import nn


@cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim() -> bool:
    """Return freed heap memory to the system; whether anything was returned (False where there is no glibc)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def trim_every(layers: list[nn.Module], every: int) -> list:
    """Trim after the forward of every ``every``-th of ``layers``, and in the backward when the gradient reaches it; the hooks' handles."""
    return [layer.register_forward_hook(_trim_hook) for layer in list(layers)[every - 1 :: every]]


def _trim_hook(module, args, output) -> None:
    trim()
    # A checkpointed layer's recomputation calls its forward directly, not through the module, so
    # no forward hook runs in the backward; a hook on the output's gradient trims there instead,
    # when the layers above have finished their backward and freed their buffers.
    first = output[0] if isinstance(output, (tuple, list)) else output
    if isinstance(first, torch.Tensor) and first.requires_grad:
        first.register_hook(_trim_on_gradient)
    # returns None: the layer's output is left as it is


def _trim_on_gradient(grad):
    trim()  # returns None: the gradient passes unchanged


# The trims hand every freed heap page back, so below glibc's mapped sizes too a tensor allocated
# after one faults its pages in afresh: a pool from 1 MB takes a step's products, norms, activation
# and logit slices out of that (SmolLM2, float32, 5 steps: 2.9M page faults -> 1.2M, system time
# 8.6 -> 5.5 s, peak RSS no higher).
POOLED_BYTES = 1 << 20
_ALIGN = 64  # torch's own alignment for CPU tensors
_active: contextvars.ContextVar[BufferPool | None] = contextvars.ContextVar("buffer_pool", default=None)


class BufferPool:
    """Buffers of the sizes asked for, each handed out again once no tensor uses it; ``with pool:`` makes :func:`empty` take from it.

    A buffer is in use while any tensor on its memory lives (the tensor keeps the numpy view it was
    made from alive; the pool holds only a weak reference to that view), so a tensor autograd saved
    for the backward is never handed out twice. Buffers are kept until the pool is dropped: the
    pool holds, for each size, as many as were ever in use at once.
    """

    def __init__(self, min_bytes: int | None = None):
        self.min_bytes = POOLED_BYTES if min_bytes is None else min_bytes
        self._buffers: dict[int, list[tuple[np.ndarray, list]]] = defaultdict(list)  # by size: (buffer, [weak ref to its view])
        self._token = None

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor: a free buffer of its size (a new one if none is free), or ``torch.empty`` below ``min_bytes``."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return torch.empty(shape, dtype=dtype)
        slots = self._buffers[nbytes]
        free = next((slot for slot in slots if slot[1][0] is None or slot[1][0]() is None), None)
        if free is None:
            buffer = np.empty(nbytes + _ALIGN, dtype=np.uint8)
            free = (buffer, [None])
            slots.append(free)
        buffer, ref = free
        start = -buffer.ctypes.data % _ALIGN
        view = buffer[start : start + nbytes]
        ref[0] = weakref.ref(view)
        return torch.from_numpy(view).view(dtype).view(shape)

    def held_bytes(self) -> int:
        """Memory the pool's buffers take."""
        return sum(size * len(slots) for size, slots in self._buffers.items())

    def __enter__(self) -> BufferPool:
        self._token = _active.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.reset(self._token)


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)``, from the active :class:`BufferPool` if there is one."""
    pool = _active.get()
    return pool.empty(tuple(shape), dtype) if pool is not None else torch.empty(shape, dtype=dtype)
