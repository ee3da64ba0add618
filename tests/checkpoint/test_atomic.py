import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor.checkpoint import atomic
from compressor.checkpoint.atomic import atomic_file, atomic_folder, scratch_folder


def test_folder_appears_only_when_the_block_succeeds(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "done.txt").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out/done.txt").exists()


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid():
    """The pid of a process that runs for the test's length, started before the test makes anything."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def _leftover(path: Path, folder: bool = True) -> Path:
    if folder:
        path.mkdir()
        (path / "model.safetensors.partial").write_bytes(b"\0" * 64)
    else:
        path.write_text("half")
    return path


def test_a_later_run_removes_what_a_gone_process_left_and_says_so(tmp_path, dead_pid, capsys):
    left = [_leftover(tmp_path / f".out.{kind}-{dead_pid}") for kind in ("tmp", "old", "scratch")]
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "done.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    lines = capsys.readouterr().err.splitlines()
    assert sorted(lines) == sorted(f"compressor: removed {p.name}, left by process {dead_pid} which is gone" for p in left)


def test_a_live_process_keeps_its_temporaries(tmp_path, live_pid, capsys):
    tmp = _leftover(tmp_path / f".out.tmp-{live_pid}")
    old = _leftover(tmp_path / f".out.old-{live_pid}")
    with atomic_folder(tmp_path / "out") as mine:
        (mine / "done.txt").write_text("x")
    assert tmp.exists() and old.exists() and (tmp_path / "out" / "done.txt").exists()
    assert capsys.readouterr().err == ""


def test_a_pid_taken_by_a_later_process_does_not_keep_the_temporary(tmp_path, live_pid, monkeypatch, capsys):
    tmp = _leftover(tmp_path / f".out.tmp-{live_pid}")
    monkeypatch.setattr(atomic, "_proc_state", lambda pid: ("S", time.time() + 60))  # as if the pid's process began after the leftover
    with atomic_folder(tmp_path / "out"):
        pass
    assert not tmp.exists()
    assert f"removed {tmp.name}, left by process {live_pid} which is gone (its pid now belongs to a later process)" in capsys.readouterr().err


def test_our_own_process_start_is_read_from_proc():
    state = atomic._proc_state(os.getpid())
    if state is None:
        pytest.skip("no /proc here: a live pid always keeps its temporary")
    assert state[0] == "R" and state[1] <= time.time()


def test_a_killed_process_not_yet_reaped_counts_as_gone(tmp_path, capsys):
    if atomic._proc_state(os.getpid()) is None:
        pytest.skip("no /proc here to tell a zombie from a live process")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp = _leftover(tmp_path / f".out.tmp-{child.pid}")
        child.send_signal(signal.SIGKILL)
        while atomic._proc_state(child.pid)[0] != "Z":  # killed; its parent (this test) has not reaped it yet
            time.sleep(0.01)
        with atomic_folder(tmp_path / "out"):
            pass
        assert not tmp.exists() and f"removed {tmp.name}, left by process {child.pid} which is gone" in capsys.readouterr().err
    finally:
        child.kill()
        child.wait()


def test_only_the_outputs_own_leftovers_are_touched(tmp_path, dead_pid, capsys):
    others = [
        tmp_path / f".other.tmp-{dead_pid}",
        tmp_path / ".out.tmp-notapid",
        tmp_path / f".out.json.tmp-{dead_pid}.json",
        tmp_path / f"out.tmp-{dead_pid}",
    ]
    for p in others:
        _leftover(p)
    with atomic_folder(tmp_path / "out"):
        pass
    assert all(p.exists() for p in others)
    assert capsys.readouterr().err == ""


def test_a_file_written_through_a_temporary_removes_a_gone_process_temporary_file(tmp_path, dead_pid, capsys):
    stale = _leftover(tmp_path / f".report.json.tmp-{dead_pid}.json", folder=False)
    with atomic_file(tmp_path / "report.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert f"removed {stale.name}, left by process {dead_pid} which is gone" in capsys.readouterr().err


def test_a_refused_run_removes_nothing(tmp_path, dead_pid):
    (tmp_path / "out").mkdir()
    stale = _leftover(tmp_path / f".out.tmp-{dead_pid}")
    with pytest.raises(Exception, match="already exists"):
        with atomic_folder(tmp_path / "out"):
            pass
    assert stale.exists()


def test_scratch_sits_beside_the_output_and_goes_when_done(tmp_path):
    with scratch_folder(tmp_path / "out") as scratch:
        assert scratch == tmp_path / f".out.scratch-{os.getpid()}" and scratch.is_dir()
        (scratch / "x").write_text("x")
    assert list(tmp_path.iterdir()) == []
    with scratch_folder(tmp_path / "missing" / "out") as scratch:  # nothing is created where the output's parent is not
        assert scratch.is_dir() and tmp_path not in scratch.parents
    assert list(tmp_path.iterdir()) == []


def _float_checkpoint(root: Path) -> Path:
    # ~27 MB of random float32 weights: quantizing them takes long enough to be killed half way.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.helpers import CONFIGS

    config = LlamaConfig(**{**CONFIGS["llama"]().to_dict(), "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8,
                            "num_key_value_heads": 4, "vocab_size": 2048})  # fmt: skip
    with torch.device("meta"):  # only the names and shapes; random values are much quicker than an initialisation
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    out = root / "float"
    config.save_pretrained(out)
    save_file({name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}, out / "model.safetensors")
    return out


def test_a_killed_quantize_leaves_its_temporary_and_the_next_run_removes_it(tmp_path, capsys):
    from compressor.cli import main

    model, out = _float_checkpoint(tmp_path), tmp_path / "out"
    log = tmp_path / "first-run.log"
    with open(log, "w") as f:
        run = subprocess.Popen(
            [sys.executable, "-m", "compressor", "quantize", str(model), str(out), "--method", "int8", "--quiet"], stdout=f, stderr=f
        )
    tmp = tmp_path / f".out.tmp-{run.pid}"
    try:
        deadline = time.monotonic() + 60
        while not any(tmp.glob("*")):  # the temporary folder exists and quantize has begun writing into it
            assert run.poll() is None and time.monotonic() < deadline, f"quantize ended or never began writing: {log.read_text()[-2000:]}"
            time.sleep(0.01)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert tmp.is_dir() and not out.exists()
    assert main(["quantize", str(model), str(out), "--method", "int8", "--quiet"]) == 0
    assert (out / "model.safetensors").exists() and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first-run.log", "float", "out"]
    assert f"compressor: removed {tmp.name}, left by process {run.pid} which is gone" in capsys.readouterr().err
