"""What the HTTP API serves from: one engine in this process, or many behind Ray Serve (:mod:`serve.cluster`).

The API (:mod:`serve.api`) checks keys, tokenizes and writes OpenAI's answers; a :class:`Service`
runs the generations and holds the adapters. :class:`EngineService` is the single process: it hands
requests to an :class:`~serve.engine.Engine` in this process. A generation is a :class:`Stream` of
:class:`~serve.types.Event`; the engine calls back from its own thread, and :class:`EngineStream`
moves each event onto the caller's event loop through ``loop.call_soon_threadsafe``, so thousands of
waiting clients cost no threads.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from starlette.concurrency import run_in_threadpool

from .errors import ServeError
from .types import AdapterInfo, Event, SamplingParams

if TYPE_CHECKING:
    from .engine import Engine


class Unavailable(ServeError):
    """The server cannot take or finish the request now: it is shutting down, or the replica serving it died."""

    status = 503


class Stream(Protocol):
    """One generation's events, in order; the last has a ``finish_reason``."""

    id: str

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; raises ``TimeoutError`` if none came within ``timeout`` seconds (the stream goes on)."""

    def close(self) -> None:
        """Cancel the generation unless it already finished; safe to call twice."""


class Service(Protocol):
    """The generations and adapters behind the API."""

    base_name: str  # the ``model`` id of the bare base
    context_length: int  # positions a sequence may reach, prompt included
    tokenizer: object  # a transformers tokenizer, for prompts and chat templates

    async def open(self, adapter: str | None, prompt_ids: list[int], params: SamplingParams) -> Stream:
        """Start a generation; raises a :class:`ServeError` (unknown adapter, full queue, too long) before any event."""

    def knows(self, model: str) -> bool:
        """True if ``model`` is the base or an adapter that takes requests (so it may become a metric label)."""

    async def adapters(self) -> list[AdapterInfo]:
        """The adapters that take requests."""

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Admin: make the adapter at ``path`` (under the adapter root) servable as ``name``."""

    async def unload_adapter(self, name: str) -> None:
        """Admin: stop serving ``name``; requests already using it finish first."""

    async def stats(self) -> dict:
        """Gauges for ``/metrics``: the keys of :data:`serve.metrics.GAUGES`, and ``replicas`` where there are several."""

    async def start(self) -> None:
        """Called when the app starts."""

    async def stop(self) -> None:
        """Called when the app stops: cancel what is running."""


class QueuedStream:
    """A :class:`Stream` whose events something else puts on ``_queue``; subclasses say how to cancel the generation."""

    def __init__(self):
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False

    async def next(self, timeout: float | None = None) -> Event:
        """The next event; raises ``TimeoutError`` if none came within ``timeout`` seconds."""
        event = await asyncio.wait_for(self._queue.get(), timeout)
        if event.finished:
            self.done = True
        return event

    def close(self) -> None:
        """Cancel the generation unless it already finished; safe to call twice."""
        if not self.done:
            self.done = True
            self._cancel()

    def _cancel(self) -> None:
        raise NotImplementedError


class EngineStream(QueuedStream):
    """A request submitted to an in-process engine, its events queued on the submitting event loop."""

    def __init__(self, engine: Engine, adapter: str | None, prompt_ids: list[int], params: SamplingParams):
        super().__init__()
        loop = asyncio.get_running_loop()

        def on_event(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the loop closed during shutdown: nobody waits for this event any more
                pass

        self._handle = engine.submit(prompt_ids, adapter, params, on_event)
        self.id = self._handle.id

    def _cancel(self) -> None:
        self._handle.cancel()


class EngineService:
    """One engine in this process; ``own_thread`` false when the caller runs its steps (``python -m serve`` on its main thread)."""

    def __init__(self, engine: Engine, own_thread: bool = True):
        self.engine = engine
        self.base_name = engine.base_name
        self.context_length = engine.context_length
        self.tokenizer = engine.tokenizer
        self._own_thread = own_thread

    async def open(self, adapter: str | None, prompt_ids: list[int], params: SamplingParams) -> EngineStream:
        """Submit to the engine (see :meth:`Service.open`)."""
        return EngineStream(self.engine, adapter, prompt_ids, params)

    def knows(self, model: str) -> bool:
        """True for the base and every loaded adapter."""
        return model == self.base_name or any(a.name == model for a in self.engine.adapters())

    async def adapters(self) -> list[AdapterInfo]:
        """Every resident adapter."""
        return self.engine.adapters()

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load from under the adapter root, off the event loop (it reads files)."""
        return await run_in_threadpool(self.engine.load_adapter, name, path)

    async def unload_adapter(self, name: str) -> None:
        """Unload; requests using it finish first."""
        await run_in_threadpool(self.engine.unload_adapter, name)

    async def stats(self) -> dict:
        """The engine's gauges."""
        return self.engine.stats()

    async def start(self) -> None:
        """Start the engine's thread, unless the caller steps it."""
        if self._own_thread:
            self.engine.start()

    async def stop(self) -> None:
        """Stop the engine, off the loop: stopping cancels requests, whose final events the loop must still deliver."""
        await run_in_threadpool(self.engine.stop)
