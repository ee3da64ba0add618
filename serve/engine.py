"""The serving engine: one base, many adapters, continuous batching on one scheduler thread.

Requests wait in a queue; between decode steps the scheduler admits as many as the batch has room
for and prefills prompts, a chunk of ``prefill_chunk`` tokens at a time and at most that many
tokens a step (a step's chunks in one forward, each computed as if alone), so that a long prompt delays the running streams by one chunk per step
rather than by its whole length; then it decodes one token for every running sequence, each with
its own adapter and its own key/value cache. Chunks always start at multiples of
``prefill_chunk`` in their prompt, so how a prompt is cut, and so its numbers, depends on the
prompt alone. Finished and cancelled sequences leave between steps.

The model itself is a backend (:mod:`serve.backend`): :mod:`serve.torch_backend` decodes the whole
batch in one forward with row-wise kernels, so a row's bits do not depend on its neighbours;
:mod:`serve.onnx_backend` runs each sequence alone through an ONNX export. Either way a request's
tokens do not depend on what else is served.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable

import torch

from .backend import Cache, open_backend
from .detokenize import Detokenizer
from .errors import AdapterConflict, BadRequest, PromptTooLong, QueueFull
from .registry import AdapterRegistry
from .sampling import adjust, generator_for, logprobs_of, pick
from .types import AdapterInfo, EngineConfig, Event, SamplingParams, TokenLogprob

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
        self.output = Detokenizer(tokenizer, params.stop)  # the generated ids, and their text as it may be sent
        self.generator = generator_for(params)
        self.ends: frozenset[int] = frozenset()  # the tokens that end it (the engine's end-of-sequence ids and the request's stop ids)
        self.logprobs: list[TokenLogprob] = []  # of the tokens generated since the last event
        self.prompt_logprobs: list[TokenLogprob] | None = None if params.prompt_logprobs is None else []  # None again once sent
        self.kv: Cache | None = None
        self.prefilled = 0  # prompt tokens in the cache so far
        self.sent_tokens = 0  # generated tokens that events have reported
        self.kv_bytes = 0  # the cache it needs: its whole length, prompt plus max_tokens
        self.reserved = False  # whether kv_bytes is counted against the engine's budget (from admission)
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        """Ask the engine to stop this request; a last event with ``finish_reason="cancelled"`` follows."""
        self.cancelled = True


class Engine:
    """Holds the base (through its backend) and its adapters, and generates for submitted requests on a background thread."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.backend = open_backend(config)
        self.tokenizer = self.backend.tokenizer
        self.base_name = config.base_name or config.base_dir.name
        self.context_length = self.backend.context_length
        self.eos_ids = self.backend.eos_ids
        self.vocab_size = len(self.tokenizer)  # token ids a request may name: prompts, biases, stop ids
        budget = None if config.adapter_memory_mb is None else int(config.adapter_memory_mb * 2**20)
        self.registry = AdapterRegistry(self.backend.layers, self.backend.fingerprint, config.adapter_root, config.max_adapters, budget)
        self._kv_budget = None if config.kv_cache_mb is None else int(config.kv_cache_mb * 2**20)
        self._kv_reserved = 0
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._prefilling: list[Request] = []  # admitted, prompt not yet all in the cache
        self._wake = threading.Condition()
        self._forward = threading.Lock()  # one forward at a time: the scheduler's steps, or a score()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stepping = False  # a run() is on (in the thread start() made, or the caller's own)
        self._stepped = threading.Event()  # set when that run() has returned

    # -- the public interface -------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler in a thread of its own."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self.run, name="serve-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Run the scheduler in the calling thread until :meth:`stop`, then cancel what is left.

        ``python -m serve`` steps the model on the main thread this way: torch's bfloat16 GEMMs
        (``--prefill bfloat16``) run about 1.4x slower when started from any other thread here.
        """
        with self._wake:
            if self._stepping:
                raise RuntimeError("the engine is already running")
            self._stepping = True  # a stop() that came first still holds: the loop then ends at once
            self._stepped.clear()
        try:
            self._loop()
        finally:
            self._cancel_all()
            with self._wake:
                self._stepping = False
            self._stepped.set()

    def stop(self) -> None:
        """Cancel every request and stop the scheduler, waiting for it (from any thread)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
            stepping = self._stepping
        if stepping:
            self._stepped.wait()
        else:
            self._cancel_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _cancel_all(self) -> None:
        for r in list(self._waiting) + self._running + self._prefilling:
            self._finish(r, "cancelled")
        self._waiting.clear()
        self._running.clear()
        self._prefilling.clear()

    def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams, on_event: Callable[[Event], None]) -> Request:
        """Queue a generation; ``on_event`` is called on the engine thread with each piece of text."""
        if not prompt_ids:
            raise PromptTooLong("the prompt is empty")
        bad = next((t for t in (*prompt_ids, *params.stop_token_ids, *(t for t, _ in params.logit_bias)) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"token ids must be in [0, {self.vocab_size}), the tokenizer's vocabulary: {bad} is outside the vocabulary")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise PromptTooLong(
                f"prompt of {len(prompt_ids)} tokens plus max_tokens {params.max_tokens} exceeds the context of {self.context_length}"
            )
        need = self.backend.kv_shape.bytes(len(prompt_ids) + params.max_tokens)  # sliding layers' rings bounded
        if self._kv_budget is not None and need > self._kv_budget:
            raise PromptTooLong(
                f"prompt plus max_tokens needs {need / 2**20:.1f} MB of key/value cache; the budget is {self._kv_budget / 2**20:.1f} MB"
            )
        key = None if adapter is None else self.registry.acquire(adapter)
        request = Request(list(prompt_ids), key, params, on_event, self.tokenizer)
        request.kv_bytes = need
        request.ends = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_ids))
        with self._wake:
            if len(self._waiting) >= self.config.max_queue:
                if key is not None:
                    self.registry.release(key)
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def score(self, prompt_ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """Logits ``(len(prompt_ids), vocab)`` at every position, through the serving path: for checks against a reference."""
        key = None if adapter is None else self.registry.acquire(adapter)
        try:
            cache = self.backend.new_cache(capacity=len(prompt_ids))
            with self._forward:
                return self.backend.prompt_forward(prompt_ids, key, cache, logits_to_keep=0)
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
        return {"queue_depth": len(self._waiting), "running": sum(not r.done for r in self._running + self._prefilling),
                "adapters_loaded": len(self.registry.infos()), "adapter_bytes": self.registry.resident_bytes(),
                "kv_cache_bytes": self._kv_reserved}  # fmt: skip

    # -- the scheduler ---------------------------------------------------------------------------

    def _loop(self) -> None:
        self.backend.setup_thread()
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running and not self._prefilling:
                    # Woken by submit() and stop(); the timeout lets Python run signal handlers when
                    # this is the main thread (python -m serve) and a SIGTERM landed on another
                    # thread, which leaves an untimed wait asleep.
                    self._wake.wait(timeout=0.5)
                if self._stopping:
                    return
                admitted = []
                busy = len(self._running) + len(self._prefilling)
                while self._waiting and busy + len(admitted) < self.config.max_batch and self._fits(self._waiting[0]):
                    admitted.append(self._waiting.popleft())
                    admitted[-1].reserved = True
                    self._kv_reserved += admitted[-1].kv_bytes
                cancelled = [r for r in self._waiting if r.cancelled]
                for r in cancelled:
                    self._waiting.remove(r)
            for r in cancelled:
                self._finish(r, "cancelled")
            self._prefilling += admitted
            budget, chunks = self.config.prefill_chunk, []
            for r in self._prefilling:
                if budget <= 0:
                    break
                budget -= self._chunk_size(r)
                chunks.append(r)
            if chunks:  # in one forward: long chunks then unpack each weight once for all of them
                self._guarded(chunks, self._prefill)
            prefilled = [r for r in self._prefilling if r.done or r.prefilled == len(r.prompt_ids)]
            self._prefilling = [r for r in self._prefilling if r not in prefilled]
            for r in self._running:
                if r.cancelled:
                    self._finish(r, "cancelled")
            self._running = [r for r in self._running + prefilled if not r.done]
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

    def _chunk_size(self, r: Request) -> int:
        # From where the prompt stands to the next multiple of prefill_chunk (or its end).
        chunk = self.config.prefill_chunk
        return min(len(r.prompt_ids), (r.prefilled // chunk + 1) * chunk) - r.prefilled

    def _prefill(self, requests: list[Request]) -> None:
        live = []
        for r in requests:
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            if r.kv is None:
                # Room for a short answer now, doubling later up to the whole length the budget reserved.
                whole = len(r.prompt_ids) + r.params.max_tokens
                r.kv = self.backend.new_cache(capacity=min(whole, len(r.prompt_ids) + 256), limit=whole)
            live.append(r)
        if not live:
            return
        ends = [r.prefilled + self._chunk_size(r) for r in live]
        rows: list[torch.Tensor | None] = [None] * len(live)
        batched = [i for i, r in enumerate(live) if r.prompt_logprobs is None]  # the others need every position's logits: alone
        if batched:
            logits = self.backend.prompts_forward([live[i].prompt_ids[live[i].prefilled : ends[i]] for i in batched],
                                                  [live[i].adapter_key for i in batched], [live[i].kv for i in batched])  # fmt: skip
            for i, row in zip(batched, logits):
                rows[i] = row
        for i, r in enumerate(live):
            if rows[i] is None:
                rows[i] = self._score_chunk(r, ends[i])
        for r, end, row in zip(live, ends, rows):
            r.prefilled = end
            if end == len(r.prompt_ids):
                if r.params.max_tokens == 0:  # scoring only (echo): the prompt's log-probabilities are the answer
                    self._finish(r, "length")
                else:
                    self._emit(r, row)

    def _score_chunk(self, r: Request, end: int) -> torch.Tensor:
        # Logits at position i give the log-probability of prompt token i + 1; the last row picks the first new token.
        logits = self.backend.prompt_forward(r.prompt_ids[r.prefilled : end], r.adapter_key, r.kv, logits_to_keep=0)
        following = r.prompt_ids[r.prefilled + 1 : end + 1]
        r.prompt_logprobs += logprobs_of(logits[: len(following)], following, r.params.prompt_logprobs)
        return logits[-1]

    def _decode(self, requests: list[Request]) -> None:
        logits = self.backend.decode([r.output.ids[-1] for r in requests], [r.adapter_key for r in requests], [r.kv for r in requests])
        for i, r in enumerate(requests):
            self._emit(r, logits[i])

    def _emit(self, r: Request, row: torch.Tensor) -> None:
        # Pick the next token from the model's logits row, then send what text it completes.
        params, ids = r.params, r.output.ids
        banned = r.ends if len(ids) < params.min_tokens else frozenset()
        token = pick(adjust(row, params, r.prompt_ids, ids, banned), params, r.generator)
        if token in r.ends:
            self._finish(r, "stop")
            return
        if params.logprobs is not None:
            r.logprobs += logprobs_of(row[None], [token], params.logprobs)
        delta = r.output.push(token)
        if r.output.stopped:
            self._finish(r, "stop", text=delta)
        elif len(r.output.ids) >= params.max_tokens:
            self._finish(r, "length", text=delta + r.output.flush())
        elif delta:
            self._send(r, self._event(r, delta))

    def _finish(self, r: Request, reason: str, error: str | None = None, text: str | None = None) -> None:
        if r.done:
            return
        r.done = True
        r.kv = None
        if r.reserved:
            self._kv_reserved -= r.kv_bytes
        if r.adapter_key is not None:
            self.registry.release(r.adapter_key)
        tail = r.output.flush() if text is None and reason == "stop" else (text or "")
        self._send(r, self._event(r, tail, reason, error))

    @staticmethod
    def _event(r: Request, text: str, reason: str | None = None, error: str | None = None) -> Event:
        # An event carries the tokens since the last one, their log-probabilities, and once the prompt's.
        sent = r.sent_tokens
        r.sent_tokens = len(r.output.ids)
        logprobs, r.logprobs = tuple(r.logprobs), []
        prompt = None
        if r.prompt_logprobs is not None:
            prompt, r.prompt_logprobs = tuple(r.prompt_logprobs), None
        return Event(text, tuple(r.output.ids[sent:]), len(r.prompt_ids), len(r.output.ids), reason, error, logprobs, prompt)

    @staticmethod
    def _send(r: Request, event: Event) -> None:
        # A caller's callback that fails ends its own request, not the batch it shares a step with.
        try:
            r.on_event(event)
        except Exception:  # noqa: BLE001 - the caller's code; logged and contained
            log.exception("on_event of %s failed; cancelling it", r.id)
            r.cancelled = True
