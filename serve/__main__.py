"""``python -m serve``: load a base and its adapters, then serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading

from compressor import CompressorError, named_path, positive_int

from .arguments import add_engine_arguments, check_folders, engine_config, port
from .auth import ApiKeys
from .errors import ServeError


def build_parser() -> argparse.ArgumentParser:
    """The command line; every engine limit maps to one :class:`EngineConfig` field."""
    p = argparse.ArgumentParser(prog="python -m serve", description="Serve one base model and many LoRA adapters over HTTP.")
    add_engine_arguments(p)
    p.add_argument("--adapter", action="append", default=[], type=named_path, metavar="NAME=DIR", help="adapter to load at start-up (repeatable)")
    p.add_argument("--max-adapters", type=positive_int, default=64, help="resident adapters; idle ones are evicted first")
    p.add_argument("--threads", type=positive_int, help="cores the kernels use (default: every core this process may run on)")
    p.add_argument("--metrics-port", type=port, metavar="PORT",
                   help="also serve /metrics on this port (same host) without keys, for a scraper on a private network")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (it returns only once the server stops)."""
    args = build_parser().parse_args(argv)
    try:
        # The keys file first: a typo in it should not cost a model load.
        keys = ApiKeys.from_file(args.api_keys) if args.api_keys else None
        check_folders(args)
        if args.metrics_port is not None and args.metrics_port == args.port != 0:
            raise CompressorError(None, f"--metrics-port {args.metrics_port} is also --port")
        try:
            config = engine_config(args, max_adapters=args.max_adapters, threads=args.threads)
        except ValueError as e:
            raise CompressorError(None, str(e)) from None
        from .engine import Engine  # imports torch: after the cheap checks

        try:
            engine = Engine(config)
        except (OSError, ValueError) as e:  # transformers' errors for a folder without a model or tokenizer
            problem = " ".join(str(e).split())  # transformers' messages run over several lines; ours is one
            raise CompressorError(args.base, f"cannot serve this base: {problem}") from None
        for name, folder in args.adapter:
            try:
                engine.load_adapter(name, folder, trusted=True)
            except ServeError as e:
                raise CompressorError(folder, f"adapter {name!r}: {e}") from None
    except CompressorError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    return serve(engine, keys, args.host, args.port, args.metrics_port)


def serve(engine, keys, host: str, port: int, metrics_port: int | None = None) -> int:
    """HTTP in a thread, the engine's steps on this (the main) thread, until SIGINT or SIGTERM; then re-raise the signal, as uvicorn does.

    With ``metrics_port``, a second listener on the same loop serves ``/metrics`` without keys.
    """
    import uvicorn

    from .api import create_app, metrics_app
    from .service import EngineService

    app = create_app(EngineService(engine, own_thread=False), keys)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port))
    scraper = None if metrics_port is None else uvicorn.Server(uvicorn.Config(metrics_app(app), host=host, port=metrics_port, lifespan="off"))
    caught: list[int] = []

    def on_signal(sig, frame):
        caught.append(sig)
        server.should_exit = True  # uvicorn shuts down gracefully; its lifespan then stops the engine

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    async def both():
        side = asyncio.create_task(scraper.serve())
        try:
            await server.serve()
        finally:
            scraper.should_exit = True
            await side

    def http_main():
        try:
            if scraper is None:
                server.run()
            else:
                asyncio.run(both())
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
