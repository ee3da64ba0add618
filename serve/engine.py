"""The serving engine: one packed base, many adapters, continuous batching on one scheduler thread.

Requests wait in a queue; between decode steps the scheduler admits as many as the batch has room
for, runs each newcomer's prompt alone (prefill), and then decodes one token for every running
sequence in a single forward, each row with its own adapter (:mod:`serve.multilora`) and its own
key/value cache (:mod:`serve.attention`). Finished and cancelled sequences leave between steps.

Packed layers run their format's fused kernel (for prompts too: beside a one-thread torch, see
``_loop``, it is also the faster, measured up to 64 rows on 2 cores); float layers (a float base,
the output head, formats without a fused kernel) and adapters run row-wise kernels
(:mod:`serve.kernels`): each gives every row the same bits whatever the batch. Attention is per sequence and prefill is alone. So a request's tokens do not depend on
what else is served.
"""

from __future__ import annotations

import itertools
import math
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from transformers import AutoTokenizer

from compressor.adapters import base_fingerprint
from compressor.architecture import kv_shape
from compressor.loading import load

from . import attention, multilora
from .detokenize import Detokenizer
from .errors import AdapterConflict, PromptTooLong, QueueFull
from .registry import AdapterRegistry
from .sampling import generator_for, pick
from .types import AdapterInfo, EngineConfig, Event, SamplingParams

log = logging.getLogger(__name__)


class Request:
    """One generation in flight; :meth:`cancel` ends it at the next step."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], adapter_key: str | None, params: SamplingParams, on_event: Callable[[Event], None], tokenizer):
        self.id = f"req-{next(self._ids)}"
        self.prompt_ids = prompt_ids
        self.adapter_key = adapter_key  # the registry's key of the adapter this request pinned
        self.params = params
        self.on_event = on_event
        self.text = Detokenizer(tokenizer, params.stop)
        self.generator = generator_for(params)
        self.kv: attention.SequenceKV | None = None
        self.kv_bytes = 0  # the cache it needs: its whole length, prompt plus max_tokens
        self.reserved = False  # whether kv_bytes is counted against the engine's budget (from admission)
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        """Ask the engine to stop this request; a last event with ``finish_reason="cancelled"`` follows."""
        self.cancelled = True


class Engine:
    """Holds the base and its adapters, and generates for submitted requests on a background thread."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model = load(config.base_dir, exact=True)
        try:
            attention.install(self.model)
        except ValueError as e:
            raise ValueError(f"{config.base_dir}: {e}") from None
        self.routing = multilora.Routing()
        layers = multilora.install(self.model, self.routing)
        self.tokenizer = AutoTokenizer.from_pretrained(config.base_dir)
        self.base_name = config.base_name or config.base_dir.name
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        budget = None if config.adapter_memory_mb is None else int(config.adapter_memory_mb * 2**20)
        self.registry = AdapterRegistry(layers, base_fingerprint(config.base_dir), config.adapter_root, config.max_adapters, budget)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self._kv_shape = kv_shape(self.model.config)
        self._kv_per_token = 2 * math.prod(self._kv_shape) * 4  # keys and values of every layer, float32
        self._kv_budget = None if config.kv_cache_mb is None else int(config.kv_cache_mb * 2**20)
        self._kv_reserved = 0
        self.model.set_output_embeddings(multilora.RowwiseLinear(self.model.get_output_embeddings()))
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._wake = threading.Condition()
        self._forward = threading.Lock()  # one forward at a time: the scheduler's steps, or a score()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the public interface -------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Cancel every request and stop the scheduler thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for r in list(self._waiting) + self._running:
            self._finish(r, "cancelled")
        self._waiting.clear()
        self._running.clear()

    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, on_event: Callable[[Event], None]) -> Request:
        """Queue a generation; ``on_event`` is called on the engine thread with each piece of text."""
        if not prompt_ids:
            raise PromptTooLong("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise PromptTooLong(f"prompt of {len(prompt_ids)} tokens plus max_tokens {params.max_tokens} exceeds the context of {self.context_length}")
        need = (len(prompt_ids) + params.max_tokens) * self._kv_per_token
        if self._kv_budget is not None and need > self._kv_budget:
            raise PromptTooLong(f"prompt plus max_tokens needs {need / 2**20:.1f} MB of key/value cache; the budget is {self._kv_budget / 2**20:.1f} MB")
        key = None if adapter is None else self.registry.acquire(adapter)
        request = Request(list(prompt_ids), key, params, on_event, self.tokenizer)
        request.kv_bytes = need
        with self._wake:
            if len(self._waiting) >= self.config.max_queue:
                if key is not None:
                    self.registry.release(key)
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self._wake.notify()
        return request

    @torch.inference_mode()
    def score(self, prompt_ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits ``(len(prompt_ids), vocab)`` at every position, through the serving path: for checks against a reference."""
        key = None if adapter is None else self.registry.acquire(adapter)
        try:
            cache = attention.SequenceKV(*self._kv_shape, dtype=torch.float32, capacity=len(prompt_ids))
            with self._forward:
                return self._prompt_forward(prompt_ids, key, cache, logits_to_keep=0)
        finally:
            if key is not None:
                self.registry.release(key)

    def load_adapter(self, name: str, path, trusted: bool = False) -> AdapterInfo:
        """Load an adapter while serving (see :meth:`AdapterRegistry.load`); the base's own name is taken."""
        if name == self.base_name:
            raise AdapterConflict(f"{name!r} is the base's name")
        return self.registry.load(name, path, trusted)

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter; requests already using it finish first."""
        self.registry.unload(name)

    def adapters(self) -> list[AdapterInfo]:
        """The adapters that take requests."""
        return self.registry.infos()

    def stats(self) -> dict:
        """Queue depth, running sequences, resident adapters and their bytes."""
        return {"queue_depth": len(self._waiting), "running": sum(not r.done for r in self._running),
                "adapters_loaded": len(self.registry.infos()), "adapter_bytes": self.registry.resident_bytes(),
                "kv_cache_bytes": self._kv_reserved}  # fmt: skip

    # -- the scheduler ---------------------------------------------------------------------------

    def _loop(self) -> None:
        # The packed layers' kernels (numba) use every core; torch's own worker pool, idling in a spin
        # between the many small ops of a decode step, would fight them for the cores (a 1-stream step
        # took 6 s instead of 0.1 s on 2 cores). This thread's torch ops therefore run on one core;
        # the setting is per thread, so the rest of the process keeps its pool.
        torch.set_num_threads(1)
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    return
                admitted = []
                while self._waiting and len(self._running) + len(admitted) < self.config.max_batch and self._fits(self._waiting[0]):
                    admitted.append(self._waiting.popleft())
                    admitted[-1].reserved = True
                    self._kv_reserved += admitted[-1].kv_bytes
                cancelled = [r for r in self._waiting if r.cancelled]
                for r in cancelled:
                    self._waiting.remove(r)
            for r in cancelled:
                self._finish(r, "cancelled")
            for r in admitted:
                self._guarded([r], self._prefill)
            for r in self._running:
                if r.cancelled:
                    self._finish(r, "cancelled")
            self._running = [r for r in self._running + admitted if not r.done]
            if self._running:
                self._guarded(self._running, self._decode)
                self._running = [r for r in self._running if not r.done]

    def _fits(self, r: Request) -> bool:
        # First come, first served: the queue's head waits for room rather than being overtaken.
        return self._kv_budget is None or self._kv_reserved + r.kv_bytes <= self._kv_budget

    def _guarded(self, requests: list[Request], step: Callable[[list[Request]], None]) -> None:
        # A failing forward ends the requests in it, never the server.
        try:
            with self._forward:
                step(requests)
        except Exception as e:  # noqa: BLE001 - reported to the requests' clients
            log.exception("generation step failed")
            for r in requests:
                self._finish(r, "error", f"{type(e).__name__}: {e}")

    @torch.inference_mode()
    def _prefill(self, requests: list[Request]) -> None:
        (r,) = requests
        if r.cancelled:
            self._finish(r, "cancelled")
            return
        # Room for a short answer now, doubling later up to the whole length the budget reserved.
        whole = len(r.prompt_ids) + r.params.max_tokens
        r.kv = attention.SequenceKV(*self._kv_shape, dtype=torch.float32, capacity=min(whole, len(r.prompt_ids) + 256), limit=whole)
        logits = self._prompt_forward(r.prompt_ids, r.adapter_key, r.kv, logits_to_keep=1)
        self._emit(r, pick(logits[-1], r.params, r.generator))

    def _prompt_forward(self, prompt_ids: list[int], adapter_key: str | None, cache: attention.SequenceKV, logits_to_keep: int) -> torch.Tensor:
        # One prompt alone, filling ``cache``: logits (positions, vocab) of the last logits_to_keep (0: all).
        ids = torch.tensor([prompt_ids])
        self.routing.set([adapter_key], tokens_per_row=ids.shape[1])
        kv = attention.StepKV([cache])
        logits = self.model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], kv=kv, use_cache=False, logits_to_keep=logits_to_keep).logits
        kv.advance(ids.shape[1])
        return logits[0]

    @torch.inference_mode()
    def _decode(self, requests: list[Request]) -> None:
        last = [r.text.ids[-1] for r in requests]
        positions = [r.kv.length for r in requests]
        self.routing.set([r.adapter_key for r in requests])
        kv = attention.StepKV([r.kv for r in requests])
        logits = self.model(input_ids=torch.tensor(last)[:, None], position_ids=torch.tensor(positions)[:, None], kv=kv, use_cache=False).logits
        kv.advance(1)
        for i, r in enumerate(requests):
            self._emit(r, pick(logits[i, -1], r.params, r.generator))

    def _emit(self, r: Request, token: int) -> None:
        if token in self.eos_ids and not r.params.ignore_eos:
            self._finish(r, "stop")
            return
        delta = r.text.push(token)
        if r.text.stopped:
            self._finish(r, "stop", text=delta)
        elif len(r.text.ids) >= r.params.max_tokens:
            self._finish(r, "length", text=delta + r.text.flush())
        elif delta:
            self._send(r, Event(delta, (token,), len(r.prompt_ids), len(r.text.ids)))

    def _finish(self, r: Request, reason: str, error: str | None = None, text: str | None = None) -> None:
        if r.done:
            return
        r.done = True
        r.kv = None
        if r.reserved:
            self._kv_reserved -= r.kv_bytes
        if r.adapter_key is not None:
            self.registry.release(r.adapter_key)
        tail = r.text.flush() if text is None and reason == "stop" else (text or "")
        self._send(r, Event(tail, (), len(r.prompt_ids), len(r.text.ids), reason, error))

    @staticmethod
    def _send(r: Request, event: Event) -> None:
        # A caller's callback that fails ends its own request, not the batch it shares a step with.
        try:
            r.on_event(event)
        except Exception:  # noqa: BLE001 - the caller's code; logged and contained
            log.exception("on_event of %s failed; cancelling it", r.id)
            r.cancelled = True


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
