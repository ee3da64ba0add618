"""``python -m serve``: load a base and its adapters, then serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from compressor import CompressorError, named_path, positive_int

from .auth import ApiKeys
from .errors import ServeError
from .types import ACTIVATIONS, BACKENDS, HEADS, PREFILLS, EngineConfig


def build_parser() -> argparse.ArgumentParser:
    """The command line; every engine limit maps to one :class:`EngineConfig` field."""
    p = argparse.ArgumentParser(prog="python -m serve", description="Serve one base model and many LoRA adapters over HTTP.")
    p.add_argument(
        "--base", required=True, type=Path, help="base model folder (a compressor output or a float checkpoint; for --backend onnx, an export)"
    )
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch: run the checkpoint with torch; onnx: run a folder written by 'compressor export onnx' with onnxruntime")  # fmt: skip
    p.add_argument("--adapter", action="append", default=[], type=named_path, metavar="NAME=DIR", help="adapter to load at start-up (repeatable)")
    p.add_argument("--adapter-root", type=Path, help="folder that adapters loaded over HTTP must lie under; without it, none can be")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-adapters", type=int, default=64, help="resident adapters; idle ones are evicted first")
    p.add_argument("--adapter-memory", type=float, metavar="MB", help="memory budget for resident adapters' weights")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests; more are answered 429")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--prefill-chunk", type=positive_int, default=256, metavar="TOKENS",
                   help="prompt tokens prefilled per step, between decode steps (a long prompt then stalls the others by one chunk)")  # fmt: skip
    p.add_argument("--kv-cache", type=float, metavar="MB", help="memory for key/value caches; requests wait until theirs fits")
    p.add_argument("--head", choices=HEADS, default="float",
                   help="output head: float (exact), or a bfloat16 or int8-per-row copy that decoding reads a half or a quarter of")  # fmt: skip
    p.add_argument("--activations", choices=ACTIVATIONS, default="float32",
                   help="float32: packed products take activations exactly; int8: quantized per run of 32 (faster; its cost is in the README)")  # fmt: skip
    p.add_argument("--prefill", choices=PREFILLS, default="float32",
                   help="float32: prompts' long chunks by an exact GEMM; bfloat16: rounded for the CPU's bfloat16 matrix units; rowwise: by the decode step's kernels (with --activations int8, the fastest; costs in the README)")  # fmt: skip
    p.add_argument("--threads", type=positive_int, help="cores the kernels use (default: every core this process may run on)")
    p.add_argument("--api-keys", type=Path, metavar="FILE", help='JSON {"KEY": {"adapters": [...] or "*", "base": bool, "admin": bool}}')
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (it returns only once the server stops)."""
    args = build_parser().parse_args(argv)
    try:
        # The keys file first: a typo in it should not cost a model load.
        keys = ApiKeys.from_file(args.api_keys) if args.api_keys else None
        config = EngineConfig(
            base_dir=args.base, backend=args.backend, adapter_root=args.adapter_root, max_batch=args.max_batch, max_queue=args.max_queue,
            max_adapters=args.max_adapters, adapter_memory_mb=args.adapter_memory, kv_cache_mb=args.kv_cache, head=args.head,
            activations=args.activations, threads=args.threads, prefill_chunk=args.prefill_chunk, prefill=args.prefill,
        )  # fmt: skip
        from .engine import Engine  # imports torch: after the cheap checks

        try:
            engine = Engine(config)
        except (OSError, ValueError) as e:  # transformers' errors for a folder without a model or tokenizer
            raise CompressorError(args.base, f"cannot serve this base: {e}") from None
        for name, folder in args.adapter:
            try:
                engine.load_adapter(name, folder, trusted=True)
            except ServeError as e:
                raise CompressorError(folder, f"adapter {name!r}: {e}") from None
    except CompressorError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    return serve(engine, keys, args.host, args.port)


def serve(engine, keys, host: str, port: int) -> int:
    """HTTP in a thread, the engine's steps on this (the main) thread, until SIGINT or SIGTERM; then re-raise the signal, as uvicorn does."""
    import uvicorn

    from .api import create_app
    from .service import EngineService

    server = uvicorn.Server(uvicorn.Config(create_app(EngineService(engine, own_thread=False), keys), host=host, port=port))
    caught: list[int] = []

    def on_signal(sig, frame):
        caught.append(sig)
        server.should_exit = True  # uvicorn shuts down gracefully; its lifespan then stops the engine

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    def http_main():
        try:
            server.run()
        finally:
            engine.stop()  # also when the server could not start: the engine's loop below ends

    http = threading.Thread(target=http_main, name="serve-http")  # off the main thread, uvicorn leaves signals to us
    http.start()
    try:
        engine.run()  # torch's bfloat16 GEMMs run faster from the main thread (see Engine.run)
    finally:
        server.should_exit = True
        http.join()
    if caught:
        signal.signal(caught[0], signal.SIG_DFL)
        os.kill(os.getpid(), caught[0])
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
