"""The command-line flags that ``python -m serve`` and ``python -m serve.cluster`` share: one engine's base and limits, keys, address."""

from __future__ import annotations

import argparse
from pathlib import Path

from compressor import CompressorError, positive_int

from .types import ACTIVATIONS, BACKENDS, HEADS, PREFILLS, EngineConfig


def port(text: str) -> int:
    """An argparse type for a TCP port (0: any free one)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port in 0..65535, got {text!r}")
    return int(text)


def megabytes(text: str) -> float:
    """An argparse type for a memory budget in MB, above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"a number of MB above 0, got {text!r}")
    return value


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Add the flags of one engine (each maps to an :class:`EngineConfig` field), ``--api-keys``, ``--host`` and ``--port``."""
    p.add_argument(
        "--base", required=True, type=Path, help="base model folder (a compressor output or a float checkpoint; for --backend onnx, an export)"
    )
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch: run the checkpoint with torch; onnx: run a folder written by 'compressor export onnx' with onnxruntime")  # fmt: skip
    p.add_argument("--adapter-root", type=Path, help="folder that adapters loaded over HTTP must lie under; without it, none can be")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--adapter-memory", type=megabytes, metavar="MB", help="memory budget for resident adapters' weights")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests; more are answered 429")
    p.add_argument("--max-batch", type=positive_int, default=16, help="sequences decoded together")
    p.add_argument("--prefill-chunk", type=positive_int, default=256, metavar="TOKENS",
                   help="prompt tokens prefilled per step, between decode steps (a long prompt then stalls the others by one chunk)")  # fmt: skip
    p.add_argument("--kv-cache", type=megabytes, metavar="MB", help="memory for key/value caches; requests wait until theirs fits")
    p.add_argument("--head", choices=HEADS, default="float",
                   help="output head: float (exact), or a bfloat16 or int8-per-row copy that decoding reads a half or a quarter of")  # fmt: skip
    p.add_argument("--activations", choices=ACTIVATIONS, default="float32",
                   help="float32: packed products take activations exactly; int8: quantized per run of 32 (faster; its cost is in the README)")  # fmt: skip
    p.add_argument("--prefill", choices=PREFILLS, default="float32",
                   help="float32: prompts' long chunks by an exact GEMM; bfloat16: rounded for the CPU's bfloat16 matrix units; rowwise: by the decode step's kernels (with --activations int8, the fastest; costs in the README)")  # fmt: skip
    p.add_argument(
        "--api-keys", type=Path, metavar="FILE", help='JSON {"KEY": {"adapters": [...] or "*", "base": bool, "admin": bool, "metrics": bool}}'
    )


def check_folders(args: argparse.Namespace) -> None:
    """Raise :class:`CompressorError` (one line) if ``--base`` or ``--adapter-root`` is not a folder: before anything slow starts."""
    if not args.base.is_dir():
        raise CompressorError(args.base, "no such folder (--base)")
    if args.adapter_root is not None and not args.adapter_root.is_dir():
        raise CompressorError(args.adapter_root, "not a folder (--adapter-root)")


def engine_config(args: argparse.Namespace, max_adapters: int, threads: int | None) -> EngineConfig:
    """The :class:`EngineConfig` that the flags of :func:`add_engine_arguments` describe."""
    return EngineConfig(
        base_dir=args.base, backend=args.backend, adapter_root=args.adapter_root, max_batch=args.max_batch, max_queue=args.max_queue,
        max_adapters=max_adapters, adapter_memory_mb=args.adapter_memory, kv_cache_mb=args.kv_cache, head=args.head,
        activations=args.activations, threads=threads, prefill_chunk=args.prefill_chunk, prefill=args.prefill,
    )  # fmt: skip
