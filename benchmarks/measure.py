"""Measuring helpers shared by the benchmarks: run a command, report wall time and peak resident memory.

A child's peak RSS as the kernel reports it (``ru_maxrss``) includes the memory of the process that
spawned it, up to the moment it ran ``exec``. A benchmark that already holds a model would inflate
every child it measures, so each command is launched from a fresh, lean interpreter running this
module (``python -m benchmarks.measure RESULT_FILE CMD...``), which imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Run:
    """Wall-clock seconds and peak resident set size of one child process."""

    seconds: float
    peak_rss: int  # bytes
    returncode: int
    output: str


def _spawn_and_wait(args: list[str]) -> Run:
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Read the output while waiting so a chatty child cannot block on a full pipe.
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(seconds=seconds, peak_rss=usage.ru_maxrss * 1024, returncode=proc.returncode, output=output)


def run_measured(args: list[str]) -> Run:
    """Run ``args`` as a child of a lean launcher; its peak RSS comes from ``wait4``, not from polling."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "run.json")
        launcher = _spawn_and_wait([sys.executable, "-m", "benchmarks.measure", result, *args])
        if not os.path.exists(result):
            raise RuntimeError(f"measuring launcher failed:\n{launcher.output[-3000:]}")
        with open(result) as f:
            return Run(**json.load(f))


def python(code: str) -> list[str]:
    """The command that runs ``code`` in this interpreter."""
    return [sys.executable, "-c", code]


def check(run: Run, what: str) -> Run:
    """Raise with the child's output if it failed."""
    if run.returncode != 0:
        raise RuntimeError(f"{what} failed with status {run.returncode}:\n{run.output[-3000:]}")
    return run


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(asdict(_spawn_and_wait(sys.argv[2:])), f)
