"""The torch backend: a compressor checkpoint (packed or float) loaded with transformers, stepped by :mod:`compressor.inference.decoder`.

A decode step is one pass of :class:`~compressor.inference.decoder.Decoder` over every running sequence, each
row with its own adapter (:mod:`compressor.inference.multilora`) and its own key/value cache
(:mod:`compressor.inference.kv_cache`); a prompt chunk runs alone. Every product of a decode step is a native
row-wise kernel (packed layers on their codes, float layers and the output head on their weights),
which gives every row the same bits whatever the batch; a prompt chunk of many tokens takes
torch's GEMM by its own length. So a request's tokens do not depend on what else is served.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from compressor import (
    CacheShape,
    Decoder,
    Routing,
    RowwiseLinear,
    SequenceKV,
    UnsupportedModel,
    all_cores,
    base_fingerprint,
    head_weight,
    install_multilora,
    load,
)

from .eos import eos_set


class TorchBackend:
    """A base loaded with :func:`compressor.loading.load`, its linear layers wrapped for per-row adapters."""

    def __init__(self, base_dir: Path, head: str = "float", threads: int | None = None, activations: str = "float32", prefill: str = "float32",
                 slack: int = 256):  # fmt: skip
        self.model = load(base_dir, float32=True, activations=activations)
        self.threads = threads
        self.routing = Routing()
        self.layers = install_multilora(self.model, self.routing)
        output = self.model.get_output_embeddings()
        self.model.set_output_embeddings(RowwiseLinear(output, head_weight(output.weight, head), threads, activations))
        try:
            self.decoder = Decoder(self.model, self.routing, threads, prefill=prefill)
        except UnsupportedModel as e:
            raise ValueError(f"{base_dir}: the server cannot run this model: {e}") from None
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        generation = self.model.generation_config
        self.eos_ids = eos_set(None if generation is None else generation.eos_token_id, self.tokenizer)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.kv_shape: CacheShape = self.decoder.cache_shape(slack)  # slack: the engine's prefill chunk, the most tokens a forward writes
        self.fingerprint = base_fingerprint(base_dir)

    def setup_thread(self) -> None:
        """Give this thread's torch (the prompts' GEMMs) as many cores as the kernels."""
        # The setting is per thread; the kernels have their own pool (compressor/native/pool.c).
        torch.set_num_threads(self.threads or all_cores())

    def new_cache(self, capacity: int, limit: int | None = None) -> SequenceKV:
        """An empty float32 :class:`~compressor.inference.kv_cache.SequenceKV`."""
        return SequenceKV(self.kv_shape, dtype=torch.float32, capacity=capacity, limit=limit)

    def prompt_forward(self, prompt_ids: list[int], adapter_key: str | None, cache: SequenceKV, logits_to_keep: int) -> torch.Tensor:
        """One prompt alone, filling ``cache``: logits ``(positions, vocab)`` of the last ``logits_to_keep`` (0: all)."""
        keep = len(prompt_ids) if logits_to_keep == 0 else min(logits_to_keep, len(prompt_ids))
        return self.decoder.forward([prompt_ids], [adapter_key], [cache], logit_rows=list(range(len(prompt_ids) - keep, len(prompt_ids))))

    def prompts_forward(self, chunks: list[list[int]], adapter_keys: list[str | None], caches: list[SequenceKV]) -> torch.Tensor:
        """Several prompts' next chunks at once (see :meth:`compressor.inference.decoder.Decoder.prompts`): logits ``(len(chunks), vocab)`` of each last token."""
        return self.decoder.prompts(chunks, adapter_keys, caches)

    def decode(self, tokens: list[int], adapter_keys: list[str | None], caches: list[SequenceKV]) -> torch.Tensor:
        """One token for every sequence in a single step: logits ``(len(tokens), vocab)``."""
        return self.decoder.forward([[t] for t in tokens], adapter_keys, caches)
