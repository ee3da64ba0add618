"""Tenant isolation: which API key may use which adapters, the bare base, and the admin routes.

The keys file is JSON, one entry per key::

    {"KEY": {"adapters": ["a", "b"] or "*", "base": true, "admin": false, "metrics": false}}

A field left out grants nothing. ``metrics`` alone makes a scraper's key: it reads ``/metrics`` and
nothing else (an admin key reads it too). Without a keys file the server is open: every caller gets
:data:`OPEN`.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from compressor import CompressorError

from .errors import ServeError

_FIELDS = {"adapters", "base", "admin", "metrics"}


class Unauthenticated(ServeError):
    """No ``Authorization: Bearer`` header, or a key the server does not know."""

    status = 401


class Forbidden(ServeError):
    """A known key asking for a model or route it was not granted."""

    status = 403


@dataclass(frozen=True)
class Grant:
    """What one key may do; ``adapters`` None means every adapter."""

    adapters: frozenset[str] | None = frozenset()
    base: bool = False
    admin: bool = False
    metrics: bool = False

    def may_use(self, model: str, base_name: str) -> bool:
        """True if this key may generate with ``model`` (an adapter name or the base's name)."""
        if model == base_name:
            return self.base
        return self.adapters is None or model in self.adapters

    def check_model(self, model: str, base_name: str) -> None:
        """Raise :class:`Forbidden` unless this key may use ``model``."""
        if not self.may_use(model, base_name):
            raise Forbidden(f"this API key may not use model {model!r}")

    def check_admin(self) -> None:
        """Raise :class:`Forbidden` unless this key may call the admin routes."""
        if not self.admin:
            raise Forbidden("this route needs an admin API key")

    def check_metrics(self) -> None:
        """Raise :class:`Forbidden` unless this key may read ``/metrics`` (a metrics or admin key)."""
        if not (self.metrics or self.admin):
            raise Forbidden("/metrics needs a metrics or admin API key")


OPEN = Grant(adapters=None, base=True, admin=True, metrics=True)


@dataclass(frozen=True)
class ApiKeys:
    """The grants by key, read once at start-up."""

    grants: dict[str, Grant]

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        """Read and check a keys file; raises :class:`CompressorError` naming the file on any problem."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise CompressorError(path, f"not a readable JSON keys file ({e})") from None
        if not isinstance(raw, dict) or not raw:
            raise CompressorError(
                path, 'expected a non-empty object {"KEY": {"adapters": [...] or "*", "base": bool, "admin": bool, "metrics": bool}}'
            )
        return cls({key: _grant(path, i, key, entry) for i, (key, entry) in enumerate(raw.items(), 1)})

    def grant_for(self, authorization: str | None) -> Grant:
        """The grant of the key in an ``Authorization`` header value; raises :class:`Unauthenticated`."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("missing API key: send 'Authorization: Bearer KEY'")
        key = key.strip().encode()
        # Compare against every key in constant time, so response timing does not reveal a prefix.
        found = None
        for known, grant in self.grants.items():
            if hmac.compare_digest(known.encode(), key):
                found = grant
        if found is None:
            raise Unauthenticated("unknown API key")
        return found


def _grant(path: str | Path, number: int, key: str, entry: object) -> Grant:
    where = f"entry {number}"  # not the key itself: the message may end up in logs
    if not key.strip() or key != key.strip():
        raise CompressorError(path, f"{where}: keys must be non-empty strings without surrounding spaces")
    if not isinstance(entry, dict):
        raise CompressorError(path, f"{where}: expected an object with adapters, base, admin, metrics")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise CompressorError(path, f"{where}: unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_FIELDS))}")
    adapters = entry.get("adapters", [])
    if adapters == "*":
        adapters = None
    elif isinstance(adapters, list) and all(isinstance(a, str) for a in adapters):
        adapters = frozenset(adapters)
    else:
        raise CompressorError(path, f'{where}: "adapters" must be a list of names or "*"')
    for flag in ("base", "admin", "metrics"):
        if not isinstance(entry.get(flag, False), bool):
            raise CompressorError(path, f'{where}: "{flag}" must be true or false')
    return Grant(adapters=adapters, base=entry.get("base", False), admin=entry.get("admin", False), metrics=entry.get("metrics", False))
