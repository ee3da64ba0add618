"""What the engine asks of a model: the small interface its torch and ONNX backends share.

The engine owns the scheduling (queue, admission, key/value budget, prefill then decode, emit,
cancellation); a backend owns the model: its tokenizer, its per-sequence caches, its forwards, and
the layers that adapters attach to. :func:`open_backend` picks one for an :class:`EngineConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from compressor import EXPORT_META as META
from compressor import CacheShape, CompressorError

from .types import EngineConfig


class AdapterLayer(Protocol):
    """One adaptable module as the registry sees it: its shape, and resident adapters by registry key."""

    in_features: int
    out_features: int
    adapters: dict[str, object]

    def attach(self, key: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> int:
        """Hold A ``(r, in)``, B ``(out, r)`` and the scaling under ``key``; returns the bytes held."""

    def detach(self, key: str) -> None:
        """Drop what :meth:`attach` holds under ``key``."""


class Cache(Protocol):
    """One sequence's keys and values; ``length`` is how many positions it holds."""

    length: int


class Backend(Protocol):
    """A loaded model the engine drives: forwards are called from one thread at a time."""

    layers: Mapping[str, AdapterLayer]  # for the adapter registry
    tokenizer: object  # a transformers tokenizer
    eos_ids: set[int]
    context_length: int  # positions a sequence may reach, prompt included
    kv_shape: CacheShape  # what a sequence's float32 keys and values take per position and layer
    fingerprint: str  # the base's :func:`compressor.lora.adapters.base_fingerprint`, that adapters must match

    def setup_thread(self) -> None:
        """Per-thread settings for the scheduler thread, which runs every forward but score()'s."""

    def new_cache(self, capacity: int, limit: int | None = None) -> Cache:
        """An empty cache with room for ``capacity`` positions, growing up to ``limit`` if it must."""

    def prompt_forward(self, prompt_ids: list[int], adapter_key: str | None, cache: Cache, logits_to_keep: int) -> torch.Tensor:
        """Run one prompt, or its next chunk, alone into ``cache`` after what it holds: float32 logits ``(positions, vocab)`` of the last ``logits_to_keep`` (0: all)."""

    def prompts_forward(self, chunks: list[list[int]], adapter_keys: list[str | None], caches: list[Cache]) -> torch.Tensor:
        """Several prompts' next chunks, each into its cache with the numbers it gets alone: float32 logits ``(len(chunks), vocab)`` of each chunk's last token."""

    def decode(self, tokens: list[int], adapter_keys: list[str | None], caches: list[Cache]) -> torch.Tensor:
        """One step for each sequence (its last token, adapter and cache): float32 logits ``(len(tokens), vocab)``."""


def open_backend(config: EngineConfig) -> Backend:
    """Load ``config.base_dir`` with the backend ``config.backend``; a folder of the other kind is refused first."""
    folder = config.base_dir
    exported = (folder / META).is_file()
    if config.backend == "onnx":
        if not exported:
            raise CompressorError(folder, f"no {META}: --backend onnx serves a folder written by 'compressor export onnx'")
        from .onnx_backend import OnnxBackend

        return OnnxBackend(folder)  # head, activations, prefill and threads are the torch backend's
    if exported:
        raise CompressorError(folder, f"an ONNX export (it has {META}): serve it with --backend onnx")
    from .torch_backend import TorchBackend

    return TorchBackend(folder, head=config.head, threads=config.threads, activations=config.activations, prefill=config.prefill,
                        slack=config.prefill_chunk)  # fmt: skip
