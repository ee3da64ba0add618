"""One replica of the cluster: one :class:`~serve.engine.Engine` (a copy of the base, its own adapters and batching).

Adapters are loaded where requests land. With multiplexed routing the ingress names each request's
adapter as its multiplexed model id; ``@serve.multiplexed`` keeps at most ``max_adapters`` per
replica (least recently used out first) and tells Ray Serve's router which replica holds which, so
that later requests for an adapter go where it already is. With default routing the router ignores
adapters, and the engine's own registry keeps the same bound.

A generation is an async generator: first the engine's request id, once the engine has taken the
request (so the ingress knows the request was in flight here if this replica dies), then its
events. Cancelling it (the client left) cancels the engine's request.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace

from ray import serve
from starlette.concurrency import run_in_threadpool

from ..engine import Engine
from ..errors import AdapterConflict, ServeError, UnknownAdapter
from ..service import EngineStream
from ..types import AdapterInfo, EngineConfig, Event, SamplingParams
from .directory import REPORT_SECONDS
from .refusal import Refused

log = logging.getLogger(__name__)
_TRIES = 5  # loads of one adapter a request may need when the others keep evicting it


class _Resident:
    """What ``@serve.multiplexed`` caches for one adapter; Ray calls ``__del__`` when it evicts it (and Python may again, at collection)."""

    def __init__(self, replica: Replica, name: str):
        self._replica, self._name, self._gone = replica, name, False

    def __del__(self):
        if not self._gone:
            self._gone = True
            self._replica.drop(self._name)


class Replica:
    """A Serve deployment holding one engine; ``directory`` is the :class:`~serve.cluster.directory.Directory`'s handle."""

    async def __init__(self, config: EngineConfig, directory, max_adapters: int):
        self.engine = await run_in_threadpool(Engine, config)  # seconds of loading, off the replica's event loop
        self.engine.start()
        self._directory = directory
        self._catalog: dict[str, str] = {}
        self._loading = asyncio.Lock()
        self._loads = 0
        self._max_adapters = max_adapters
        self._tokens = 0
        self._id = serve.get_replica_context().replica_id.unique_id

        async def resident(name: str) -> _Resident:
            await self._attach(name)
            return _Resident(self, name)

        # Wrapped here, not decorated on the class, because the bound is a command-line flag; and a
        # function, not the bound method: multiplexing keeps its cache as an attribute of what it wraps.
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=max_adapters)(resident)
        self._reporting = asyncio.get_running_loop().create_task(self._report_forever())

    async def describe(self) -> dict:
        """What the ingress needs to know of the base: its name and context."""
        return {"base_name": self.engine.base_name, "context_length": self.engine.context_length}

    async def generate(self, adapter: str | None, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[str | Event | Refused]:
        """The engine's request id once it is queued, then the request's events; or only a :class:`Refused`."""
        try:
            stream = await self._submit(adapter, prompt_ids, params)
        except ServeError as e:
            yield Refused(e)
            return
        try:
            yield f"{self._id}-{stream.id}"  # the engine's ids are unique within one replica only
            while True:
                event = await stream.next()
                yield event
                if event.finished:
                    self._tokens += event.completion_tokens
                    return
        finally:  # also when Ray cancels the generator because the client left
            stream.close()

    async def admit(self, name: str) -> AdapterInfo | Refused:
        """Admin: load ``name`` here now, so that its files are checked against the base; its info (with this replica), or why not."""
        try:
            await self._hold(name)
        except ServeError as e:
            return Refused(e)
        info = next(info for info in self.engine.adapters() if info.name == name)
        return replace(info, replicas=(self._id,))

    async def report(self) -> dict:
        """This replica's state, as the directory and ``/metrics`` show it."""
        stats = self.engine.stats()
        infos = self.engine.adapters()
        return stats | {"replica": self._id, "pid": os.getpid(), "adapters": [i.name for i in infos], "infos": infos,
                        "adapter_loads": self._loads, "generated_tokens": self._tokens}  # fmt: skip

    def drop(self, name: str) -> None:
        """Unload ``name`` from the engine if it holds it (requests using it finish first)."""
        try:
            self.engine.unload_adapter(name)
        except UnknownAdapter:
            pass

    async def __del__(self):
        """Serve's shutdown of this replica: stop reporting, cancel what runs."""
        self._reporting.cancel()
        await run_in_threadpool(self.engine.stop)

    async def _submit(self, adapter: str | None, prompt_ids: list[int], params: SamplingParams) -> EngineStream:
        if adapter is None:
            return EngineStream(self.engine, adapter, prompt_ids, params)
        for _ in range(_TRIES):
            await self._hold(adapter)
            try:
                return EngineStream(self.engine, adapter, prompt_ids, params)
            except UnknownAdapter:
                # Another request's load evicted it between our load and our submit (it was idle
                # then: a submitted request pins its adapter). Load it again.
                continue
        raise UnknownAdapter(f"model {adapter!r} was evicted {_TRIES} times before a request could use it; raise --max-adapters-per-replica")

    async def _hold(self, name: str) -> None:
        if serve.get_multiplexed_model_id():
            await self._multiplexed(name)
        # With default routing there is no multiplexed id; and an adapter the catalog dropped and
        # took back may still be in multiplexing's cache without being in the engine.
        await self._attach(name)

    async def _attach(self, name: str) -> None:
        async with self._loading:  # one load at a time: a second request for the same adapter waits for the first
            if any(info.name == name for info in self.engine.adapters()):
                return
            path = self._catalog.get(name)
            if path is None:  # loaded on another ingress, or since this replica last reported
                _, self._catalog = await self._directory.catalog.remote()
                path = self._catalog.get(name)
            if path is None:
                raise UnknownAdapter(f"model {name!r} is not loaded")
            try:
                # Trusted: the ingress checked the path under the adapter root before the catalog took it.
                await run_in_threadpool(self.engine.load_adapter, name, path, True)
            except AdapterConflict:  # loaded meanwhile by a request that did not wait for the lock
                return
            self._loads += 1
            if not serve.get_multiplexed_model_id():
                self._trim(keep=name)

    def _trim(self, keep: str) -> None:
        # Default routing: no multiplexing evicts for us. Idle adapters go, least recently used
        # first, down to the bound; ones serving requests stay (the bound is exceeded while they do).
        infos = self.engine.adapters()  # least recently used first
        for info in infos[: max(0, len(infos) - self._max_adapters)]:
            if info.in_use == 0 and info.name != keep:
                self.drop(info.name)

    async def _report_forever(self) -> None:
        while True:
            try:
                _, catalog = await self._directory.report.remote(await self.report())
                self._catalog = catalog
                for info in self.engine.adapters():
                    if catalog.get(info.name) != info.path:  # unloaded cluster-wide, or loaded again from other files
                        self.drop(info.name)
            except Exception:  # noqa: BLE001 - the directory restarting; the next report tries again
                log.exception("report to the directory failed")
            await asyncio.sleep(REPORT_SECONDS)
