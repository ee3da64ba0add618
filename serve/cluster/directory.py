"""The cluster's one shared table: which adapters it serves (the catalog), and what each replica last reported.

Ray Serve routes a request to a replica that holds its adapter, but it has no call that reaches
every replica, and the ingress cannot see inside them. So each replica reports to the
:class:`Directory` every :data:`REPORT_SECONDS` (its resident adapters and its load) and gets the
catalog back: an adapter unloaded from the catalog is dropped by every replica at its next report,
and ``/metrics`` shows the reports. The directory is one Serve deployment with one replica; if it
dies, Serve starts it again with the start-up catalog.
"""

from __future__ import annotations

import time

from ..errors import AdapterConflict, UnknownAdapter
from .refusal import Refused

REPORT_SECONDS = 0.5  # how often a replica reports: an unload reaches every replica within about this
STALE_SECONDS = 3.0  # a replica silent this long is gone (killed, or being replaced)


class Directory:
    """The catalog (adapter name -> folder) and the replicas' latest reports."""

    def __init__(self, catalog: dict[str, str]):
        self._catalog = dict(catalog)
        self._version = 0
        self._reports: dict[str, tuple[float, dict]] = {}

    async def catalog(self) -> tuple[int, dict[str, str]]:
        """The catalog and its version (which grows with each change)."""
        return self._version, dict(self._catalog)

    async def add(self, name: str, path: str) -> int | Refused:
        """Serve ``name`` from ``path``; refused with :class:`AdapterConflict` if the name is taken. Returns the new version."""
        if name in self._catalog:
            return Refused(AdapterConflict(f"adapter {name!r} is already loaded; unload it first"))
        self._catalog[name] = path
        self._version += 1
        return self._version

    async def remove(self, name: str) -> int | Refused:
        """Stop serving ``name``; refused with :class:`UnknownAdapter` if it is not served. Returns the new version."""
        if self._catalog.pop(name, None) is None:
            return Refused(UnknownAdapter(f"adapter {name!r} is not loaded"))
        self._version += 1
        return self._version

    async def report(self, report: dict) -> tuple[int, dict[str, str]]:
        """Take one replica's report (see :meth:`serve.cluster.replica.Replica.report`); returns the catalog."""
        self._reports[report["replica"]] = (time.monotonic(), report)
        return self._version, dict(self._catalog)

    async def replicas(self) -> list[dict]:
        """The latest report of every replica heard from within :data:`STALE_SECONDS`, by replica id."""
        now = time.monotonic()
        self._reports = {k: v for k, v in self._reports.items() if now - v[0] < STALE_SECONDS}
        return [report for _, (_, report) in sorted(self._reports.items())]
