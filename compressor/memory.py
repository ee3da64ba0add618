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
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

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
