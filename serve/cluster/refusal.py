"""How a refusal (a :class:`~serve.errors.ServeError`: unknown adapter, full queue, ...) crosses a Ray Serve call.

As a value, not an exception: Ray logs every exception a deployment raises as a failed request,
traceback and all, and a 404 is no failure of the server's. The deployments return
:class:`Refused`; the ingress's :func:`call` raises the error again.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ServeError


@dataclass(frozen=True)
class Refused:
    """A call's answer that is a refusal; ``error`` is what the ingress raises."""

    error: ServeError


async def call(response):
    """Await a Ray Serve response (or a stream's next item); a :class:`Refused` is raised as its error."""
    result = await response
    if isinstance(result, Refused):
        raise result.error
    return result
