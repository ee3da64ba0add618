"""Argument types both command lines (``compressor``, ``python -m serve``) share, importable without torch."""

from __future__ import annotations

import argparse
from pathlib import Path


def named_path(text: str) -> tuple[str, Path]:
    """An argparse type for ``NAME=DIR`` (adapters named on a command line)."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(folder)


def positive_int(text: str) -> int:
    """An argparse type for an integer of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, got {text!r}")
    return int(text)


def rank(text: str) -> int | None:
    """An argparse type for a LoRA rank: an integer (its range is the job's to check), or ``auto`` (``None``)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("an integer or 'auto'") from None
