"""The ONNX backend: a folder written by ``compressor export onnx``, run by onnxruntime.

The exported graph takes each adapted module's LoRA matrices as inputs (see
:mod:`compressor.export.decoder`), so one session serves every adapter: a sequence's forward feeds
its own adapter's arrays, and the modules it does not adapt keep their rank-0 defaults (the bare
base). The graph runs one sequence at a time (its positions assume no padding), so a decode step is
one batch-1 forward per running sequence; each sequence is computed alone, so its tokens cannot
depend on what else is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from compressor import EXPORT_META as META
from compressor import EXPORT_MODEL as MODEL
from compressor import CacheShape, CompressorError, OnnxDecoder, lora_names, module_arrays

from .eos import eos_set


class LoraInputs:
    """One adapted module's pair of graph inputs, and each resident adapter's arrays for them by registry key."""

    def __init__(self, module: str, in_features: int, out_features: int):
        self.module = module
        self.in_features, self.out_features = in_features, out_features
        self.adapters: dict[str, dict[str, np.ndarray]] = {}

    def attach(self, key: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> int:
        """Hold A ``(r, in)`` and B ``(out, r)`` as the graph's feeds (see ``module_arrays``); returns the bytes held."""
        arrays = module_arrays(self.module, a, b, scaling)
        self.adapters[key] = arrays
        return sum(array.nbytes for array in arrays.values())

    def detach(self, key: str) -> None:
        """Drop the feeds held under ``key``."""
        del self.adapters[key]


@dataclass
class OnnxKV:
    """One sequence's keys and values as the graph's past inputs take them: per layer, keys then values, ``(1, kv_heads, length, head_dim)``."""

    arrays: list[np.ndarray]
    length: int = 0


class OnnxBackend:
    """An :class:`~compressor.export.runtime.OnnxDecoder` over an export folder, with adapters held as LoRA feeds."""

    def __init__(self, folder: Path):
        try:
            self.decoder = OnnxDecoder(folder)
        except CompressorError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime's exceptions (Fail, InvalidProtobuf, ...) derive from Exception alone
            raise CompressorError(folder, f"onnxruntime cannot load {MODEL}: {str(e).splitlines()[0]}") from None
        meta = self.decoder.meta
        # The LoRA inputs' shapes come from the graph: A is (in, rank), B is (rank, out).
        shapes = {arg.name: arg.shape for arg in self.decoder.session.get_overridable_initializers()}
        try:
            self.layers = {m: LoraInputs(m, shapes[lora_names(m)[0]][0], shapes[lora_names(m)[1]][1]) for m in meta["lora_modules"]}
            # onnxruntime's cache holds every position, sliding layers' too
            self.kv_shape = CacheShape(int(meta["layers"]), int(meta["kv_heads"]), int(meta["head_dim"]))
            self.context_length = int(meta["max_positions"])
            self.fingerprint = meta["base_fingerprint"]
            eos = meta["eos_token_ids"]
        except KeyError as e:
            raise CompressorError(folder / META, f"no {e.args[0]}; export the model again with this version of compressor") from None
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.eos_ids = eos_set(eos, self.tokenizer)

    def setup_thread(self) -> None:
        """Nothing: onnxruntime keeps its own thread pool, and this thread's torch only samples."""

    def new_cache(self, capacity: int, limit: int | None = None) -> OnnxKV:
        """An empty :class:`OnnxKV`; each forward returns the grown arrays, so no room is reserved."""
        return OnnxKV(self.decoder.empty_cache())

    def prompt_forward(self, prompt_ids: list[int], adapter_key: str | None, cache: OnnxKV, logits_to_keep: int) -> torch.Tensor:
        """One prompt alone, filling ``cache``: logits ``(positions, vocab)`` of the last ``logits_to_keep`` (0: all)."""
        logits = self._forward(prompt_ids, adapter_key, cache)
        return torch.from_numpy(logits[-logits_to_keep:] if logits_to_keep else logits)

    def prompts_forward(self, chunks: list[list[int]], adapter_keys: list[str | None], caches: list[OnnxKV]) -> torch.Tensor:
        """One forward per chunk: logits ``(len(chunks), vocab)`` of each chunk's last token."""
        return torch.from_numpy(np.stack([self._forward(ids, key, cache)[-1] for ids, key, cache in zip(chunks, adapter_keys, caches)]))

    def decode(self, tokens: list[int], adapter_keys: list[str | None], caches: list[OnnxKV]) -> torch.Tensor:
        """One batch-1 forward per sequence: logits ``(len(tokens), vocab)``."""
        return torch.from_numpy(np.stack([self._forward([t], key, cache)[-1] for t, key, cache in zip(tokens, adapter_keys, caches)]))

    def _forward(self, ids: list[int], adapter_key: str | None, cache: OnnxKV) -> np.ndarray:
        logits, cache.arrays = self.decoder.forward(ids, cache.arrays, lora=self._feeds(adapter_key))
        cache.length += len(ids)
        return logits

    def _feeds(self, adapter_key: str | None) -> dict[str, np.ndarray] | None:
        # The adapter's arrays for the modules it adapts; the others keep the graph's rank-0 defaults.
        if adapter_key is None:
            return None
        feeds: dict[str, np.ndarray] = {}
        for layer in self.layers.values():
            feeds.update(layer.adapters.get(adapter_key, {}))
        return feeds
