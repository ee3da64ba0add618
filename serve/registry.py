"""Resident adapters: loaded and unloaded while serving, evicted least-recently-used, never freed under a request.

The registry validates an adapter against the base once, at load (fingerprint, module names,
shapes), then hands each of the backend's adapter layers (:class:`~serve.backend.AdapterLayer`: a
:class:`~compressor.inference.multilora.MultiLoraLinear`, or an ONNX export's LoRA inputs) its A and B under a key
unique to that load. A request *acquires* a name at submission, gets the key, and *releases* the
key when it finishes. Unloading a name frees it at once (it can be loaded again, from new files);
the old weights stay attached under their key until the last request using them is done. Eviction,
to stay under the count and memory limits, only ever takes idle adapters.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from compressor import ADAPTER_NAME as NAME
from compressor import ADAPTER_NAME_RULE as NAME_RULE
from compressor import Adapter, CompressorError, LoraConfig, check_fits, read_adapter

from .backend import AdapterLayer
from .errors import AdapterConflict, AdapterRejected, BadAdapterPath, UnknownAdapter
from .types import AdapterInfo


@dataclass
class _Entry:
    key: str  # what the layers and the routing know it by
    config: LoraConfig
    modules: tuple[str, ...]
    path: str
    nbytes: int
    load_seconds: float
    in_use: int = 0
    last_used: float = 0.0


class AdapterRegistry:
    """Thread-safe table of resident adapters over one base's adapter layers."""

    def __init__(self, layers: Mapping[str, AdapterLayer], fingerprint: str, root: Path | None, max_count: int, max_bytes: int | None):
        self._layers = layers
        self._fingerprint = fingerprint
        self._root = None if root is None else root.resolve()
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._serving: OrderedDict[str, _Entry] = OrderedDict()  # by name, least recently used first
        self._draining: dict[str, _Entry] = {}  # unloaded while in use, by key
        self._keys = itertools.count()
        self._lock = threading.Lock()

    def load(self, name: str, path: str | Path, trusted: bool = False) -> AdapterInfo:
        """Read, check and attach the adapter at ``path`` as ``name``; ``trusted`` skips the adapter-root check."""
        check_name(name)
        folder = Path(path) if trusted else under_root(self._root, path)
        with self._lock:
            self._check_free(name)
        began = time.perf_counter()
        try:
            adapter = read_adapter(folder)
            check_fits(self._layers, adapter, self._fingerprint)
        except CompressorError as e:
            raise AdapterRejected(str(e)) from None
        with self._lock:
            self._check_free(name)  # another load of the same name may have won meanwhile
            self._make_room(_nbytes(adapter))
            key = f"{name}#{next(self._keys)}"
            nbytes = sum(self._layers[m].attach(key, a, b, adapter.config.scaling) for m, (a, b) in adapter.weights.items())
            entry = _Entry(key, adapter.config, tuple(adapter.weights), str(folder), nbytes, time.perf_counter() - began, last_used=time.monotonic())
            self._serving[name] = entry
            return self._info(name, entry)

    def unload(self, name: str) -> None:
        """Stop routing new requests to ``name``; its weights go when its last request finishes."""
        with self._lock:
            entry = self._serving.pop(name, None)
            if entry is None:
                raise UnknownAdapter(f"adapter {name!r} is not loaded")
            if entry.in_use:
                self._draining[entry.key] = entry
            else:
                self._detach(entry)

    def acquire(self, name: str) -> str:
        """Pin ``name`` for one request and return the key its layers know it by; :class:`UnknownAdapter` if not loaded."""
        with self._lock:
            entry = self._serving.get(name)
            if entry is None:
                raise UnknownAdapter(f"model {name!r} is not loaded")
            entry.in_use += 1
            entry.last_used = time.monotonic()
            self._serving.move_to_end(name)
            return entry.key

    def release(self, key: str) -> None:
        """Unpin the adapter loaded as ``key``; detach it if it was unloaded meanwhile."""
        with self._lock:
            entry = self._draining.get(key) or next(e for e in self._serving.values() if e.key == key)
            entry.in_use -= 1
            if entry.in_use == 0 and self._draining.pop(key, None) is not None:
                self._detach(entry)

    def infos(self) -> list[AdapterInfo]:
        """Every adapter that takes requests, least recently used first."""
        with self._lock:
            return [self._info(n, e) for n, e in self._serving.items()]

    def resident_bytes(self) -> int:
        """Bytes of adapter weights attached to the layers now, draining ones included."""
        with self._lock:
            return sum(e.nbytes for e in [*self._serving.values(), *self._draining.values()])

    def _check_free(self, name: str) -> None:
        if name in self._serving:
            raise AdapterConflict(f"adapter {name!r} is already loaded; unload it first")

    def _make_room(self, incoming: int) -> None:
        # Called with the lock held: evict idle adapters, least recently used first, until it fits.
        def over() -> bool:
            held = [*self._serving.values(), *self._draining.values()]
            total = sum(e.nbytes for e in held) + incoming
            return len(held) + 1 > self._max_count or (self._max_bytes is not None and total > self._max_bytes)

        for name in [n for n, e in self._serving.items() if e.in_use == 0]:
            if not over():
                return
            self._detach(self._serving.pop(name))
        if over():
            raise AdapterConflict("no room for the adapter: the resident ones are all serving requests (or it alone exceeds the memory budget)")

    def _detach(self, entry: _Entry) -> None:
        for module in entry.modules:
            self._layers[module].detach(entry.key)

    @staticmethod
    def _info(name: str, e: _Entry) -> AdapterInfo:
        return AdapterInfo(name, e.path, e.config.rank, tuple(e.config.targets), e.nbytes, e.in_use, e.load_seconds, e.last_used)


def check_name(name: str) -> None:
    """Raise :class:`BadAdapterPath` unless ``name`` may name an adapter."""
    if not NAME.fullmatch(name):
        raise BadAdapterPath(f"adapter name {name!r}: {NAME_RULE}")


def under_root(root: Path | None, folder: str | Path) -> Path:
    """``folder`` resolved under the adapter ``root`` (relative paths are taken under it); :class:`BadAdapterPath` if it leaves the root."""
    if root is None:
        raise BadAdapterPath("loading adapters at run time needs --adapter-root")
    root = root.resolve()
    resolved = (root / folder).resolve()
    if not resolved.is_relative_to(root):
        raise BadAdapterPath(f"{folder}: adapter paths must lie under the adapter root")
    return resolved


def _nbytes(adapter: Adapter) -> int:
    # What the layers will hold: A and B in float32.
    return sum(4 * (a.numel() + b.numel()) for a, b in adapter.weights.values())
