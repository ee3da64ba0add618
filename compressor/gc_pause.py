"""Pause Python's cyclic garbage collector while a burst of long-lived objects is created.

Importing torch and transformers and building a model on the meta device allocate hundreds of
thousands of objects that live for the whole run. Each few hundred allocations trigger a collection
that walks them all again and frees nothing; on the 1B-parameter benchmark that was about 0.8 s of
a 10 s run, on the critical path before any weight is read. Afterwards the objects are frozen
(``gc.freeze``): later collections skip them instead of walking them again after every few hundred
tensors. Reference counting still frees everything acyclic while the collector is paused.

The freeze is process-wide and never undone, so only command-line entry points (``compressor.cli``)
use this; a library function run again and again in a long-lived process must not.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector inside the block, then freeze what survived it and restore the collector."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
