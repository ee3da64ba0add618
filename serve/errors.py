"""Errors a request or an admin call can meet; the HTTP layer maps each to one status code."""

from __future__ import annotations


class ServeError(Exception):
    """Base of the serving errors; ``status`` is the HTTP status the API answers with."""

    status = 500


class UnknownAdapter(ServeError):
    """The request names an adapter that is not loaded."""

    status = 404


class AdapterRejected(ServeError):
    """An adapter that cannot be loaded: wrong base, wrong shapes, unreadable or malformed files."""

    status = 422


class BadAdapterPath(ServeError):
    """An adapter name with path tricks, or a path outside the adapter root."""

    status = 400


class AdapterConflict(ServeError):
    """A name that is already loaded (unload it first), or no room even after evicting idle adapters."""

    status = 409


class BadRequest(ServeError):
    """A well-formed body the server still cannot serve: an empty prompt, token ids outside the vocabulary, a field it does not support."""

    status = 400


class PromptTooLong(ServeError):
    """Prompt plus max tokens does not fit in the model's context."""

    status = 400


class QueueFull(ServeError):
    """The waiting queue is at its limit; try again shortly."""

    status = 429
