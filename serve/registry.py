"""Resident adapters: loaded and unloaded while serving, evicted least-recently-used, never freed under a request.

The registry validates an adapter against the base once, at load (fingerprint, module names,
shapes), then hands each :class:`~serve.multilora.MultiLoraLinear` a reference to its A and B. A
request *acquires* its adapter at submission and *releases* it when it finishes; an adapter that is
unloaded while in use stops taking new requests at once and leaves the layers when its last request
is done. Eviction (to stay under the count and memory limits) only ever takes idle adapters.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from compressor.adapters import Adapter, check_fits, read_adapter
from compressor.errors import CompressorError

from .errors import AdapterConflict, AdapterRejected, BadAdapterPath, UnknownAdapter
from .multilora import MultiLoraLinear
from .types import AdapterInfo

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class _Entry:
    adapter: Adapter
    path: str
    nbytes: int
    load_seconds: float
    in_use: int = 0
    last_used: float = 0.0
    unloading: bool = False


class AdapterRegistry:
    """Thread-safe table of resident adapters over one base's :class:`MultiLoraLinear` layers."""

    def __init__(self, layers: dict[str, MultiLoraLinear], fingerprint: str, root: Path | None, max_count: int, max_bytes: int | None):
        self._layers = layers
        self._fingerprint = fingerprint
        self._root = None if root is None else root.resolve()
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def load(self, name: str, path: str | Path, trusted: bool = False) -> AdapterInfo:
        """Read, check and attach the adapter at ``path`` as ``name``; ``trusted`` skips the adapter-root check."""
        if not NAME.fullmatch(name):
            raise BadAdapterPath(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, not starting with a symbol)")
        folder = self._allowed(Path(path), trusted)
        with self._lock:
            if name in self._entries:
                raise AdapterConflict(f"adapter {name!r} is already loaded; unload it first")
        began = time.perf_counter()
        try:
            adapter = read_adapter(folder)
            check_fits(self._layers, adapter, self._fingerprint)
        except CompressorError as e:
            raise AdapterRejected(str(e)) from None
        with self._lock:
            if name in self._entries:  # lost a race with another load of the same name
                raise AdapterConflict(f"adapter {name!r} is already loaded; unload it first")
            self._make_room(_nbytes(adapter))
            nbytes = sum(self._layers[m].attach(name, a, b, adapter.config.scaling) for m, (a, b) in adapter.weights.items())
            entry = _Entry(adapter, str(folder), nbytes, time.perf_counter() - began, last_used=time.monotonic())
            self._entries[name] = entry
            return self._info(name, entry)

    def unload(self, name: str) -> None:
        """Stop routing new requests to ``name``; its weights go when its last request finishes."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.unloading:
                raise UnknownAdapter(f"adapter {name!r} is not loaded")
            entry.unloading = True
            if entry.in_use == 0:
                self._detach(name)

    def acquire(self, name: str) -> None:
        """Pin ``name`` for one request; raises :class:`UnknownAdapter` if it is not (or no longer) loaded."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.unloading:
                raise UnknownAdapter(f"model {name!r} is not loaded")
            entry.in_use += 1
            entry.last_used = time.monotonic()
            self._entries.move_to_end(name)

    def release(self, name: str) -> None:
        """Unpin ``name``; detach it if it was unloaded meanwhile."""
        with self._lock:
            entry = self._entries[name]
            entry.in_use -= 1
            if entry.unloading and entry.in_use == 0:
                self._detach(name)

    def infos(self) -> list[AdapterInfo]:
        """Every adapter that takes requests, least recently used first."""
        with self._lock:
            return [self._info(n, e) for n, e in self._entries.items() if not e.unloading]

    def resident_bytes(self) -> int:
        """Bytes of adapter weights attached to the layers now."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def _allowed(self, folder: Path, trusted: bool) -> Path:
        if trusted:
            return folder
        if self._root is None:
            raise BadAdapterPath("loading adapters at run time needs --adapter-root")
        resolved = (self._root / folder).resolve()  # relative paths are taken under the root
        if not resolved.is_relative_to(self._root):
            raise BadAdapterPath(f"{folder}: adapter paths must lie under the adapter root")
        return resolved

    def _make_room(self, incoming: int) -> None:
        # Called with the lock held: evict idle adapters, least recently used first, until it fits.
        def over() -> bool:
            total = sum(e.nbytes for e in self._entries.values()) + incoming
            return len(self._entries) + 1 > self._max_count or (self._max_bytes is not None and total > self._max_bytes)

        for name in [n for n, e in self._entries.items() if e.in_use == 0]:
            if not over():
                return
            self._detach(name)
        if over():
            raise AdapterConflict("no room for the adapter: the resident ones are all serving requests (or it alone exceeds the memory budget)")

    def _detach(self, name: str) -> None:
        entry = self._entries.pop(name)
        for module in entry.adapter.weights:
            del self._layers[module].adapters[name]

    @staticmethod
    def _info(name: str, e: _Entry) -> AdapterInfo:
        cfg = e.adapter.config
        return AdapterInfo(name, e.path, cfg.rank, tuple(cfg.targets), e.nbytes, e.in_use, e.load_seconds, e.last_used)


def _nbytes(adapter: Adapter) -> int:
    # What the layers will hold: A and B in float32.
    return sum(4 * (a.numel() + b.numel()) for a, b in adapter.weights.values())
