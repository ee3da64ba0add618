"""The error users see: one line that names the file and the problem.

A job dataclass refuses a field out of range with :class:`FieldError` (a ``ValueError``, as a
library caller expects); the command line reports it as a :class:`CompressorError` naming the flag.
"""

from __future__ import annotations

from pathlib import Path


class CompressorError(Exception):
    """A problem with the user's input or output; the CLI prints it as one line and exits non-zero."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        # Messages quoted from other libraries may span lines; the user sees one.
        self.problem = " ".join(problem.split())
        super().__init__(f"{self.path}: {self.problem}" if self.path else self.problem)


class FieldError(ValueError):
    """A job field out of its range: ``field`` is its name, ``problem`` what is wrong with its value."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field} {problem}")


def at_least(field: str, value: float | None, minimum: float) -> None:
    """Raise :class:`FieldError` if ``value`` (``None`` means unset and passes) is below ``minimum``."""
    if value is not None and not value >= minimum:  # "not >=" refuses NaN too
        raise FieldError(field, f"must be at least {minimum}, got {value}")


def within(field: str, value: float, low: float, high: float, high_open: bool = False, low_open: bool = False) -> None:
    """Raise :class:`FieldError` unless ``low <= value <= high`` (``<`` on a side marked open)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise FieldError(field, f"must be in {interval}, got {value}")
