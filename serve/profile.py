"""Where a serving step's time goes: ``python -m serve.profile --base DIR [--adapter NAME=DIR ...] [--streams 16]``.

Loads the base as the server does, prefills ``--streams`` prompts of ``--prompt-tokens`` tokens
(adapters assigned round-robin), then times ``--steps`` decode steps twice: plainly (the step
time) and with each phase of :class:`compressor.inference.decoder.Decoder` timed (the breakdown, which costs a
little itself). The same for one prompt's prefill.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from compressor import named_path

from .types import ACTIVATIONS, HEADS, PREFILLS


def _table(title: str, run: dict) -> str:
    total = run["ms_with_timing"]
    lines = [f"{title}: {run['ms_a_step']:.2f} ms a step ({run['steps']} steps); with timing {total:.2f} ms", ""]
    lines.append(f"| {'phase':<24} | {'ms a step':>9} | {'share':>6} |")
    lines.append(f"|{'-' * 26}|{'-' * 11}|{'-' * 8}|")
    for phase, ms in sorted(run["phases_ms"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {phase:<24} | {ms:>9.3f} | {100 * ms / total:>5.1f}% |")
    return "\n".join(lines)


def _run(plain: float, timings: dict[str, float], steps: int) -> dict:
    # One run's figures in milliseconds a step: untimed, with phase timing, and each phase.
    return {"steps": steps, "ms_a_step": plain * 1e3 / steps, "ms_with_timing": sum(timings.values()) * 1e3 / steps,
            "phases_ms": {phase: seconds * 1e3 / steps for phase, seconds in timings.items()}}  # fmt: skip


def profile(base: Path, adapters: dict[str, Path], streams: int, steps: int, prompt_tokens: int, head: str = "float",
            threads: int | None = None, activations: str = "float32", prefill: str = "float32") -> dict[str, dict]:  # fmt: skip
    """The decode and prefill breakdowns: each run's title to its figures (see :func:`_run`)."""
    import torch

    from .registry import AdapterRegistry
    from .torch_backend import TorchBackend

    backend = TorchBackend(base, head=head, threads=threads, activations=activations, prefill=prefill)
    backend.setup_thread()
    registry = AdapterRegistry(backend.layers, backend.fingerprint, None, max(len(adapters), 1), None)
    for name, folder in adapters.items():
        registry.load(name, folder, trusted=True)
    keys = [registry.acquire(name) for name in adapters] or [None]
    g = torch.Generator().manual_seed(0)
    vocab = backend.model.config.vocab_size
    prompts = [torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist() for _ in range(streams)]
    routes = [keys[i % len(keys)] for i in range(streams)]
    caches = [backend.new_cache(prompt_tokens + 2 * steps + 8) for _ in range(streams)]
    for ids, key, cache in zip(prompts, routes, caches):
        backend.prompt_forward(ids, key, cache, 1)
    tokens = [ids[-1] for ids in prompts]
    decoder = backend.decoder
    report = {}
    for run in ("decode", "prefill"):
        for timed in (False, True):
            decoder.profile(timed)
            start = time.perf_counter()
            if run == "decode":
                for _ in range(steps):
                    backend.decode(tokens, routes, caches)
            else:
                backend.prompt_forward(prompts[0], routes[0], backend.new_cache(prompt_tokens), 1)
            seconds = time.perf_counter() - start
            if not timed:
                plain = seconds
        title = (
            f"decode, {streams} streams over {len(set(routes)) if routes[0] else 0} adapters"
            if run == "decode"
            else f"prefill, one prompt of {prompt_tokens} tokens"
        )
        report[title] = _run(plain, dict(decoder.timings), steps if run == "decode" else 1)
        decoder.profile(False)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m serve.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="a compressor or float checkpoint folder")
    parser.add_argument("--adapter", type=named_path, action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--head", choices=HEADS, default="float")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--activations", choices=ACTIVATIONS, default="float32")
    parser.add_argument("--prefill", choices=PREFILLS, default="float32")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    report = profile(args.base, dict(args.adapter), args.streams, args.steps, args.prompt_tokens, args.head, args.threads, args.activations,
                     args.prefill)  # fmt: skip
    print("\n\n".join(_table(title, run) for title, run in report.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
