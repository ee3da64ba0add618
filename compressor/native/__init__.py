"""The C kernels of inference, compiled for this machine on first use and called through ctypes.

The sources beside this file are plain C (no Python or torch headers), built with the system C
compiler for the CPU it runs on (``-march=native``: AVX-512 where the CPU has it, the portable
lane-by-lane code elsewhere, which gives the same bits). A build is cached under
``~/.cache/compressor/native``, keyed by the sources, the flags and the CPU's features, so a change
of any of them rebuilds; ``make setup`` builds it once. ctypes releases the GIL during every call.
"""

from __future__ import annotations

import ctypes
import hashlib
import platform
import shutil
import subprocess
import threading
from functools import lru_cache
from pathlib import Path

from ..checkpoint.atomic import atomic_file
from ..errors import CompressorError

SOURCES = ("pool.c", "matmul.c", "int8_activations.c", "ops.c", "lowrank.c", "backward.c", "step.c")
HEADERS = ("pool.h", "kernels.h")
FLAGS = ("-O3", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC")
# This CPU's instructions; the portable build (tests compare the two) targets baseline x86-64 or arm64.
NATIVE = ("-march=native", "-mprefer-vector-width=512")
CACHE = Path.home() / ".cache" / "compressor" / "native"
_BUILDING = threading.Lock()  # one build at a time in this process (see build)

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "matmul": (_P, _P, _I64, _I64, _P, _P, _I64, _I32, _I32, _I32),
    "int8_activations_supported": (_I32, _I64),
    "unpack": (_P, _P, _I32, _I32),
    "rms_norm": (_P, _I64, _I64, _I64, _P, _F32, _F32, _P, _I64, _P),
    "act_mul": (_P, _I64, _P, _I64, _I64, _I64, _I32, _P, _I64),
    "rms_norm_forward": (_P, _I64, _I64, _P, _F32, _F32, _P, _P, _I32),
    "rms_norm_backward": (_P, _P, _P, _I64, _I64, _P, _F32, _P, _I32),
    "act_mul_forward": (_P, _I64, _P, _I64, _I64, _I64, _I32, _P, _I32),
    "act_mul_backward": (_P, _I64, _P, _I64, _P, _I64, _I64, _I32, _P, _P, _I32),
    "rope": (_P, _I64, _I64, _I64, _I64, _P, _P, _I64),
    "dropout": (_P, _I64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, _F32, _P),
    "dropout_bf16": (_P, _I64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, _F32, _P),
    "low_rank_in": (_P, _I64, _I64, _P, _I64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, _F32, _P, ctypes.c_int),
    "low_rank_grad_a": (_P, _P, _I64, _I64, _I64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, _F32, _P, ctypes.c_int),
    "low_rank_add_grad_x": (_P, _P, _I64, _I64, _I64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, _F32, _P, ctypes.c_int),
    "attention": (_P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _F32, _F32, _I64, _P, _I64, _I32),
    "lora_add": (_P, _I64, _P, _I64, _P, _I64, _I64, _P, _I64, _I32),
    "decoder_step": (_P, _P),
}


class NativeBuildError(CompressorError):
    """The C kernels could not be compiled (no C compiler, or it failed); the CLIs print it as one line."""

    def __init__(self, problem: str):
        super().__init__(None, problem)


def cpu_features() -> str:
    """This CPU's feature line from /proc/cpuinfo (``flags`` on x86, ``Features`` on arm), or the platform's processor name."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler() -> str:
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    raise NativeBuildError("no C compiler (cc, gcc or clang) on PATH: the inference kernels are C, built on first use")


def build(portable: bool = False) -> Path:
    """The path of this machine's build of the kernels (or, with ``portable``, of the plain-C one), compiling it if the cache has none."""
    here = Path(__file__).parent
    flags = FLAGS if portable else (*FLAGS, *NATIVE)
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((here / name).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(cpu_features().encode())
    target = CACHE / f"kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = _compiler()
    # Built into atomic_file's temporary and renamed into place: concurrent first uses in other
    # processes (test workers) each build their own file, and whichever rename lands last leaves a
    # complete library. This process's threads would share one temporary, hence one build at a time.
    with _BUILDING:
        if target.exists():
            return target
        with atomic_file(target) as tmp:
            cmd = [compiler, *flags, "-o", str(tmp), *(str(here / name) for name in SOURCES)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
                raise NativeBuildError(f"compiling the inference kernels failed ({cmd[0]} exit {done.returncode}): {first}")
    return target


@lru_cache(maxsize=None)
def library(portable: bool = False) -> ctypes.CDLL:
    """The loaded kernels, with their argument types declared (``portable``: the plain-C build, for tests)."""
    lib = ctypes.CDLL(str(build(portable)))
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int if name.endswith("_supported") else None
    return lib
