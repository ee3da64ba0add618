"""``python -m serve``: load a base and its adapters, then serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from compressor import CompressorError, named_path, positive_int

from .arguments import add_engine_arguments, engine_config
from .auth import ApiKeys
from .errors import ServeError


def build_parser() -> argparse.ArgumentParser:
    """The command line; every engine limit maps to one :class:`EngineConfig` field."""
    p = argparse.ArgumentParser(prog="python -m serve", description="Serve one base model and many LoRA adapters over HTTP.")
    add_engine_arguments(p)
    p.add_argument("--adapter", action="append", default=[], type=named_path, metavar="NAME=DIR", help="adapter to load at start-up (repeatable)")
    p.add_argument("--max-adapters", type=int, default=64, help="resident adapters; idle ones are evicted first")
    p.add_argument("--threads", type=positive_int, help="cores the kernels use (default: every core this process may run on)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (it returns only once the server stops)."""
    args = build_parser().parse_args(argv)
    try:
        # The keys file first: a typo in it should not cost a model load.
        keys = ApiKeys.from_file(args.api_keys) if args.api_keys else None
        config = engine_config(args, max_adapters=args.max_adapters, threads=args.threads)
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
