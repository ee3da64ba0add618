"""Write a folder so that it appears complete or not at all.

Everything a command writes goes through a temporary beside its output, named after the output and
the writing process: ``.{name}.tmp-{pid}`` (the folder or file being written), ``.{name}.old-{pid}``
(the output being replaced, for the moment between two renames) and ``.{name}.scratch-{pid}``
(intermediate files). A process that is killed cannot remove them, so each of these functions first
removes the ones beside the same output that a process which is gone left behind, and says so on
stderr. A leftover whose process still runs is left alone: another run may be writing it.

Note (pid reuse): a pid is reused once its process is gone, so a live pid does not prove the
leftover is still being written. On Linux a leftover last changed (ctime) before its pid's current
process started cannot be that process's, and is removed too; elsewhere a live pid keeps its
leftover. A process that was killed but not yet reaped by its parent (a zombie) counts as gone.
A pid means something only on the machine that wrote it: on a folder that several machines
write into at once (NFS), a temporary another machine is writing would look abandoned.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CompressorError

_KINDS = ("tmp", "old", "scratch")
_CLOCK_SLACK = 2.0  # seconds: /proc's boot time is whole seconds, and file times and clocks are coarse


@contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir`` that is renamed to ``out_dir`` if the block succeeds.

    On any error (or interruption) the temporary folder is removed and ``out_dir`` is left as it was.
    Leftovers of earlier runs into ``out_dir`` whose process is gone are removed first (module docstring).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CompressorError(out, "already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = _fresh_folder(out, "tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _beside(out, "old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; whatever is written there replaces ``path`` if the block succeeds."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = _beside(out, "tmp", out.suffix)  # keeps the suffix: matplotlib reads it
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def scratch_folder(beside: str | Path) -> Iterator[Path]:
    """Yield an empty folder for a command's intermediate files, removed when the block ends.

    It is ``.{name}.scratch-{pid}`` beside ``beside`` (the output) when the output's parent exists, so
    that moving finished files into the output is a rename and a killed run's scratch is found by
    the next run; otherwise it is in the system's temporary folder, and nothing is created beside.
    """
    out = Path(beside)
    if not out.parent.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
        return
    remove_stale(out)
    scratch = _fresh_folder(out, "scratch")
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _beside(out: Path, kind: str, suffix: str = "") -> Path:
    """This process's ``kind`` (one of _KINDS) of temporary for ``out``, as remove_stale recognises it."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}{suffix}")


def _fresh_folder(out: Path, kind: str) -> Path:
    """An empty :func:`_beside` folder (what this pid left there from an earlier run of its own is removed)."""
    folder = _beside(out, kind)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def remove_stale(out: str | Path) -> list[Path]:
    """Remove the temporaries beside ``out`` that processes which are gone left; return them.

    Each removal is announced on stderr in one line. Leftovers of live processes stay.
    """
    out = Path(out)
    pattern = re.compile(re.escape(f".{out.name}.") + f"({'|'.join(_KINDS)})-([0-9]+)" + f"({re.escape(out.suffix)})?")
    removed = []
    try:
        entries = list(os.scandir(out.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group(2))
        try:
            changed = entry.stat(follow_symlinks=False).st_ctime
        except FileNotFoundError:
            continue  # its own process finished with it meanwhile
        why = _why_abandoned(pid, changed)
        if why is None:
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not os.path.lexists(path):
            print(f"compressor: removed {path.name}, left by process {pid} {why}", file=sys.stderr)
            removed.append(path)
    return removed


def _why_abandoned(pid: int, changed: float) -> str | None:
    """Why the leftover of process ``pid``, last changed at ``changed``, is no longer written; None if it may be."""
    if pid != os.getpid():
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return "which is gone"
        except PermissionError:
            pass  # it exists, under another user
    state = _proc_state(pid)
    if state is None:
        return None
    status, started = state
    if status == "Z":  # killed, and not yet reaped by its parent
        return "which is gone"
    if started > changed + _CLOCK_SLACK:
        return "which is gone (its pid now belongs to a later process)"
    return None


def _proc_state(pid: int) -> tuple[str, float] | None:
    """Process ``pid``'s state letter and start (seconds since the epoch), from Linux's /proc; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    # After the name (field 2, in parentheses, which may hold spaces): field 3 is the state, field 22
    # the start in clock ticks since boot.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")
