"""``python -m serve.cluster``: the API of ``python -m serve`` from several replicas on Ray Serve, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from compressor import CompressorError, positive_int

from ..arguments import add_engine_arguments, check_folders, engine_config
from ..auth import ApiKeys
from .app import APP_NAME, ROUTINGS, ClusterConfig


def build_parser() -> argparse.ArgumentParser:
    """The command line: the engine flags of ``python -m serve``, and the cluster's own."""
    p = argparse.ArgumentParser(prog="python -m serve.cluster", description="Serve one base and many LoRA adapters from replicas on Ray Serve.")
    add_engine_arguments(p)
    p.add_argument("--replicas", type=positive_int, default=2, help="engines, each with its own copy of the base")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="N", help="cores Ray reserves for each replica, and its kernels' threads")
    p.add_argument("--max-adapters-per-replica", type=positive_int, default=16, metavar="K",
                   help="adapters one replica keeps; the least recently used goes first")  # fmt: skip
    p.add_argument("--routing", choices=ROUTINGS, default="multiplexed",
                   help="multiplexed: a request goes to a replica holding its adapter; default: by load alone (for comparison)")  # fmt: skip
    p.add_argument("--address", help="a running Ray cluster (ray://HOST:10001, or auto); default: start a local Ray instance")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status once the cluster is shut down."""
    args = build_parser().parse_args(argv)
    try:
        keys = ApiKeys.from_file(args.api_keys) if args.api_keys else None  # before Ray: a typo should not cost a start-up
        check_folders(args)
        config = ClusterConfig(engine=engine_config(args, max_adapters=args.max_adapters_per_replica, threads=None), replicas=args.replicas,
                               cpus_per_replica=args.cpus_per_replica, max_adapters_per_replica=args.max_adapters_per_replica,
                               routing=args.routing, keys=keys)  # fmt: skip
        _check_base(config)
    except (CompressorError, ValueError) as e:
        print(f"serve.cluster: error: {e}", file=sys.stderr)
        return 1
    return run(config, args.host, args.port, args.address)


def _check_base(config: ClusterConfig) -> None:
    # The ingress needs the tokenizer, and a folder without one is the commonest mistake: say so
    # here, in one line, rather than in every replica's log.
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(config.engine.base_dir)
    except (OSError, ValueError) as e:
        raise CompressorError(config.engine.base_dir, f"cannot serve this base: {e}") from None


def run(config: ClusterConfig, host: str, port: int, address: str | None) -> int:
    """Start (or join) Ray, deploy, and serve until a signal; then shut the application down."""
    import ray
    from ray import serve

    from .app import build_app

    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica could not start: Ray's message ends with the replica's own error
            print(f"serve.cluster: error: the application did not start: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        print(f"serving {config.engine.base_dir} on http://{host}:{port} from {config.replicas} replicas", flush=True)
        while not stop.wait(1.0):
            pass
        serve.delete(APP_NAME)
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
