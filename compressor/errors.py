"""The error users see: one line that names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class CompressorError(Exception):
    """A problem with the user's input or output; the CLI prints it as one line and exits non-zero."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
