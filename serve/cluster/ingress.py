"""The cluster's HTTP ingress: the same app as ``python -m serve`` (:func:`serve.api.create_app`), over :class:`ClusterService`.

The ingress tokenizes and checks keys, as the single server does, then hands the generation to a
:class:`~serve.cluster.replica.Replica` through Ray Serve. With multiplexed routing the request's
adapter is its multiplexed model id, so Ray Serve's router sends it to a replica that holds the
adapter, or else to the one holding fewest.

A replica that dies fails the requests it had taken: they end ``unavailable`` (503). A request it
had not yet taken (the router chose it before learning of the death) goes to another replica.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from transformers import AutoTokenizer

from compressor import CompressorError, read_adapter_config

from ..api import create_app
from ..auth import ApiKeys
from ..errors import QueueFull, UnknownAdapter
from ..metrics import GAUGES
from ..registry import check_name, under_root
from ..service import QueuedStream, Unavailable
from ..types import AdapterInfo, Event, SamplingParams
from .directory import REPORT_SECONDS
from .refusal import call

_TRIES = 3  # replicas a request may be offered to when the ones chosen die before taking it
_UNLOAD_WAIT_SECONDS = 4 * REPORT_SECONDS  # an unload waits this long for every replica to report the adapter gone


class RemoteStream(QueuedStream):
    """A generation running on a replica; a background task moves its events into the queue, so a timed wait never cancels the call."""

    def __init__(self, response, request_id: str):
        super().__init__()
        self.id = request_id
        self._response = response
        self._pump = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        last = Event("", (), 0, 0)
        try:
            async for event in self._response:
                last = event
                self._queue.put_nowait(event)
        except RayActorError:
            self._queue.put_nowait(replace(last, text="", token_ids=(), finish_reason="unavailable",
                                           error="the replica serving this request stopped; send it again"))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - reported to the client as a failed generation
            cause = e.cause if isinstance(e, RayTaskError) else e
            self._queue.put_nowait(replace(last, text="", token_ids=(), finish_reason="error", error=f"{type(cause).__name__}: {cause}"))

    def _cancel(self) -> None:
        self._response.cancel()
        self._pump.cancel()


class ClusterService:
    """A :class:`~serve.service.Service` over the replicas' and the directory's deployment handles."""

    def __init__(self, replicas, directory, tokenizer, adapter_root: Path | None, multiplexed: bool):
        self.tokenizer = tokenizer
        self.base_name = ""  # the replicas say, at start()
        self.context_length = 0
        self._replicas, self._directory = replicas, directory
        self._root, self._multiplexed = adapter_root, multiplexed
        self._catalog: dict[str, str] = {}
        self._configs: dict[str, tuple[int, tuple[str, ...]]] = {}  # path -> (rank, targets) of adapters read by no replica yet
        self._refreshing: asyncio.Task | None = None

    async def start(self) -> None:
        """Learn the base from a replica and the catalog from the directory; keep the catalog fresh."""
        described = await call(self._replicas.describe.remote())
        self.base_name, self.context_length = described["base_name"], described["context_length"]
        await self._refresh()
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        """Stop refreshing; the replicas stop with Serve."""
        if self._refreshing is not None:
            self._refreshing.cancel()

    def knows(self, model: str) -> bool:
        """True for the base and every adapter in the catalog."""
        return model == self.base_name or model in self._catalog

    async def open(self, adapter: str | None, prompt_ids: list[int], params: SamplingParams) -> RemoteStream:
        """Offer the request to a replica (one that holds ``adapter``, with multiplexed routing); see :meth:`Service.open`."""
        if adapter is not None and adapter not in self._catalog:
            await self._refresh()  # loaded through another ingress replica moments ago?
            if adapter not in self._catalog:
                raise UnknownAdapter(f"model {adapter!r} is not loaded")
        handle = self._replicas.options(stream=True, multiplexed_model_id=adapter if adapter and self._multiplexed else "")
        for _ in range(_TRIES):
            response = handle.generate.remote(adapter, prompt_ids, params)
            try:
                request_id = await call(response.__anext__())
            except RayActorError:
                continue  # it died before taking the request: nothing ran, another replica may take it
            except BackPressureError:
                raise QueueFull("every replica's queue is full") from None
            return RemoteStream(response, request_id)
        raise Unavailable("no replica could take the request; send it again")

    async def adapters(self) -> list[AdapterInfo]:
        """Every adapter in the catalog, with the replicas holding it (merged from their reports)."""
        reports = await call(self._directory.replicas.remote())
        await self._refresh()
        out = []
        for name, path in self._catalog.items():
            held = [(r["replica"], info) for r in reports for info in r["infos"] if info.name == name]
            if held:
                first = held[0][1]
                out.append(replace(first, in_use=sum(i.in_use for _, i in held), last_used=max(i.last_used for _, i in held),
                                   replicas=tuple(replica for replica, _ in held)))  # fmt: skip
            else:
                rank, targets = self._config(path)
                out.append(AdapterInfo(name, path, rank, targets, nbytes=0, in_use=0, load_seconds=0.0))
        return out

    async def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Add to the catalog and load on one replica now, so that a bad adapter is refused here; taken out again if it is."""
        check_name(name)
        folder = str(under_root(self._root, path))
        await call(self._directory.add.remote(name, folder))
        self._catalog[name] = folder
        try:
            return await call(self._replicas.options(multiplexed_model_id=name if self._multiplexed else "").admit.remote(name))
        except BaseException:
            self._catalog.pop(name, None)
            await call(self._directory.remove.remote(name))
            raise

    async def unload_adapter(self, name: str) -> None:
        """Take out of the catalog, then wait (a little) for every replica to report it dropped."""
        await call(self._directory.remove.remote(name))
        self._catalog.pop(name, None)
        deadline = time.monotonic() + _UNLOAD_WAIT_SECONDS
        while time.monotonic() < deadline:
            if not any(name in r["adapters"] for r in await call(self._directory.replicas.remote())):
                return
            await asyncio.sleep(REPORT_SECONDS / 5)

    async def stats(self) -> dict:
        """The replicas' gauges summed, and each replica's report."""
        reports = await call(self._directory.replicas.remote())
        return {key: sum(r[key] for r in reports) for key in GAUGES} | {"replicas": reports}

    async def _refresh(self) -> None:
        _, self._catalog = await call(self._directory.catalog.remote())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            try:
                await self._refresh()
            except Exception:  # noqa: BLE001 - the directory restarting: keep the last catalog
                pass

    def _config(self, path: str) -> tuple[int, tuple[str, ...]]:
        if path not in self._configs:
            try:
                cfg = read_adapter_config(path)
                self._configs[path] = (cfg.rank, tuple(cfg.targets))
            except CompressorError:
                return 0, ()  # a replica will say what is wrong with it when a request needs it
        return self._configs[path]


@serve.ingress()
class Ingress:
    """The ingress deployment: builds the HTTP app in each of its replicas."""

    def __init__(self, replicas, directory, base_dir: Path, keys: ApiKeys | None, adapter_root: Path | None, multiplexed: bool):
        self._service = ClusterService(replicas, directory, AutoTokenizer.from_pretrained(base_dir), adapter_root, multiplexed)
        self._keys = keys

    def __serve_build_asgi_app__(self):
        """The app of ``python -m serve``, over the cluster."""
        return create_app(self._service, self._keys)
