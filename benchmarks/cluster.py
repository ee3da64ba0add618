"""One process against a Ray Serve cluster of the same cores, and routing by adapter against routing by load alone.

On SmolLM2's NF4 base with 8 rank-8 tenants, the same requests (16 concurrent clients, each
request naming a tenant drawn at random) go over HTTP to, each in fresh processes:

- ``python -m serve --threads 2``: one engine on both cores;
- ``python -m serve.cluster --replicas 2 --cpus-per-replica 1``, routed by adapter (multiplexed);
- the same cluster, routed by load alone (``--routing default``).

The replicas keep ``--max-adapters-per-replica`` tenants each (4: half of them), so routing that
ignores adapters loads and evicts them over and over. Reported: aggregate tokens/s, request
latency p50/p99, and the adapter loads the run caused (from ``/metrics``). The configurations run
in turn, ``--rounds`` times, so that the machine's drift falls on all of them alike.

    python -m benchmarks.cluster --model ~/.cache/compressor/models/SmolLM2-135M-Instruct --work DIR [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from benchmarks.peers import _percentile
from benchmarks.qlora import nf4_base, sentences
from benchmarks.serve import _free_port, _start, _wait_healthy, make_adapters

TENANTS = 8
CLIENTS = 16


def _loads(url: str) -> float:
    """Adapter loads every live replica has done, from /metrics (0 for the single process, which reports no replicas)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "serve_replica_adapter_loads")


async def _drive(url: str, names: list[str], requests: int, tokens: int, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    plan = [(rng.choice(names), rng.choice(sentences()[:64])[:160]) for _ in range(requests)]
    latencies: list[float] = []
    generated = 0

    async def client(http):
        nonlocal generated
        while plan:
            name, prompt = plan.pop()
            began = time.perf_counter()
            r = await http.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
            if r.status_code != 200:
                raise RuntimeError(f"{url}: {name}: {r.status_code} {r.text[:300]}")
            latencies.append(time.perf_counter() - began)
            generated += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
        wall = time.perf_counter() - began
    return {"tokens_per_s": generated / wall, "latency_ms_p50": 1e3 * _percentile(latencies, 0.5), "latency_ms_p99": 1e3 * _percentile(latencies, 0.99),
            "requests": len(latencies), "seconds": wall}  # fmt: skip


def run(name: str, args: list[str], work: Path, names: list[str], requests: int, tokens: int) -> dict:
    """Start one server, warm every tenant once, drive the requests, count the adapter loads they caused; stop it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / f"{name}.log"
    server = _start([sys.executable, *args, "--port", str(port)], log)
    try:
        _wait_healthy(url, server, log, timeout=300)
        asyncio.run(_drive(url, names, 2 * CLIENTS, 4, seed=1))  # warm-up: compiles, caches, a first load of most tenants
        before = _loads(url)
        result = asyncio.run(_drive(url, names, requests, tokens, seed=0))
        result["adapter_loads"] = _loads(url) - before
        return result
    finally:
        server.terminate()
        server.wait(timeout=120)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print a table and optionally write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="float checkpoint folder (quantized to NF4 once into WORK)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--tokens", type=int, default=48, help="tokens per request")
    p.add_argument("--max-adapters-per-replica", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    base = nf4_base(args.model, args.work)
    adapters = make_adapters(base, args.work, TENANTS)
    root = args.work / "adapters"
    names = [a.name for a in adapters]
    single = ["-m", "serve", "--base", str(base), "--threads", "2", "--adapter-root", str(root)]
    single += [flag for a in adapters for flag in ("--adapter", f"{a.name}={a}")]
    cluster = ["-m", "serve.cluster", "--base", str(base), "--adapter-root", str(root), "--replicas", "2", "--cpus-per-replica", "1",
               "--max-adapters-per-replica", str(args.max_adapters_per_replica)]  # fmt: skip
    configs = {
        "1 process, 2 cores": single,
        "2 replicas x 1 core, multiplexed": cluster,
        "2 replicas x 1 core, default routing": cluster + ["--routing", "default"],
    }
    rounds: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, cmd in configs.items():
            rounds[name].append(run(name.replace(" ", "-").replace(",", ""), cmd, args.work, names, args.requests, args.tokens))
            print(name, rounds[name][-1], flush=True)
    best = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in rounds.items()}
    results = {"model": str(args.model), "requests": args.requests, "tokens": args.tokens, "clients": CLIENTS, "tenants": TENANTS,
               "max_adapters_per_replica": args.max_adapters_per_replica, "best": best, "rounds": rounds}  # fmt: skip
    print("| configuration | tokens/s | latency p50 (ms) | latency p99 (ms) | adapter loads |\n|---|---:|---:|---:|---:|")
    for name, r in best.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['latency_ms_p50']:.0f} | {r['latency_ms_p99']:.0f} | {r['adapter_loads']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
