"""Serving many tenants from one NF4 base: mixed-adapter batches, the naive way, adapter loading, and a load test.

``python -m benchmarks.serve --model ~/.cache/compressor/models/SmolLM2-135M-Instruct --work bench-results/serve``

Every figure comes from one run, side by side, on rank-8 adapters over all projections (random B,
so each visibly changes the output). Throughput is greedy decoding of a fixed number of tokens per
stream (``ignore_eos``), prompts are sentences of Debian's licence texts, and each engine scenario
is run twice, interleaved, keeping the faster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from benchmarks.qlora import nf4_base, sentences

STREAMS = 16


def make_adapters(base: Path, work: Path, count: int) -> list[Path]:
    """``count`` rank-8 adapters on every projection of ``base``, made once into ``work``."""
    from compressor.lora import LoraConfig
    from compressor.lora.adapters import random_adapter

    out = []
    for i in range(count):
        folder = work / "adapters" / f"tenant-{i}"
        if not (folder / "adapter_model.safetensors").exists():
            random_adapter(base, folder, LoraConfig(rank=8, alpha=16), seed=i, scale=0.05)
        out.append(folder)
    return out


def prompt_ids(tokenizer, count: int) -> list[list[int]]:
    """``count`` licence sentences as chat prompts, tokenized."""
    chosen = sentences()[:count]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True, tokenize=True, return_dict=False) for s in chosen
    ]


def run_streams(engine, jobs: list[tuple[list[int], str | None]], tokens: int) -> dict:
    """Submit ``jobs`` at once, greedy, ``tokens`` each; aggregate tokens per second."""
    from serve.types import SamplingParams

    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    done = threading.Semaphore(0)
    generated = []

    def on_event(event):
        if event.finished:
            generated.append(event.completion_tokens)
            done.release()

    start = time.perf_counter()
    for ids, adapter in jobs:
        engine.submit(ids, adapter, params, on_event)
    for _ in jobs:
        done.acquire()
    seconds = time.perf_counter() - start
    return {"streams": len(jobs), "tokens": sum(generated), "seconds": seconds, "tokens_per_s": sum(generated) / seconds}


def engine_throughput(base: Path, adapters: list[Path], prompts: list[list[int]], tokens: int) -> dict:
    """One stream, 16 streams on one adapter, 16 streams over 8 adapters: best of two interleaved rounds."""
    from serve.engine import Engine
    from serve.types import EngineConfig

    engine = Engine(EngineConfig(base, max_batch=STREAMS, max_adapters=len(adapters)))
    for i, folder in enumerate(adapters):
        engine.load_adapter(f"t{i}", folder, trusted=True)
    engine.start()
    scenarios = {
        "single_stream": [(prompts[0], "t0")],
        "16_streams_1_adapter": [(prompts[i], "t0") for i in range(STREAMS)],
        "16_streams_8_adapters": [(prompts[i], f"t{i % 8}") for i in range(STREAMS)],
    }
    results: dict[str, dict] = {}
    try:
        run_streams(engine, scenarios["single_stream"], 4)  # warm-up
        for _ in range(2):
            for name, jobs in scenarios.items():
                r = run_streams(engine, jobs, tokens)
                if name not in results or r["tokens_per_s"] > results[name]["tokens_per_s"]:
                    results[name] = r
    finally:
        engine.stop()
    return results


def naive_peft(base: Path, adapters: list[Path], prompts: list[list[int]], tokens: int, requests: int = 4) -> dict:
    """PEFT over stock transformers + bitsandbytes on the same NF4 folder: ``set_adapter`` and one ``generate`` at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, device_map="cpu"), adapters[0], adapter_name="t0")
    for i, folder in enumerate(adapters[1:8], 1):
        model.load_adapter(folder, adapter_name=f"t{i}")
    model.eval()
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False)  # warm-up (bitsandbytes repacks here)
        start = time.perf_counter()
        generated = 0
        for i in range(requests):
            model.set_adapter(f"t{i % 8}")
            out = model.generate(input_ids=torch.tensor([prompts[i]]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            generated += out.shape[1] - len(prompts[i])
    seconds = time.perf_counter() - start
    return {"requests": requests, "tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}


def reference_check(model_dir: Path, base: Path, adapter: Path, prompts: list[list[int]]) -> dict:
    """Largest logit difference of the serving path against PEFT (float base) and against our LoRA layers (NF4 base)."""
    import torch
    from peft import PeftModel

    import compressor
    from compressor.lora.adapters import apply_adapter, read_adapter
    from serve.engine import Engine
    from serve.types import EngineConfig

    out = {}
    for name, folder in (("float32_vs_peft", model_dir), ("nf4_vs_our_lora_layers", base)):
        engine = Engine(EngineConfig(folder))
        engine.load_adapter("t", adapter, trusted=True)
        reference = compressor.load(folder, float32=True)
        if name.startswith("float32"):
            reference = PeftModel.from_pretrained(reference, adapter)
        else:
            apply_adapter(reference, read_adapter(adapter), folder)
        diffs, scale = [], []
        with torch.inference_mode():
            for ids in prompts:
                expected = reference(input_ids=torch.tensor([ids])).logits[0]
                diffs.append((engine.score(ids, "t") - expected).abs().max().item())
                scale.append(expected.abs().mean().item())
        out[name] = {"max_abs_logit_diff": max(diffs), "mean_abs_logit": sum(scale) / len(scale), "prompts": len(prompts)}
    return out


def adapter_loading(base: Path, adapters: list[Path], resident: int = 100) -> dict:
    """Load latency of rank-8 adapters from disk, and the memory of ``resident`` of them against their file sizes."""
    from serve.engine import Engine
    from serve.types import EngineConfig

    engine = Engine(EngineConfig(base, max_adapters=resident))
    before = psutil.Process().memory_info().rss
    seconds, files = [], 0
    for i in range(resident):
        folder = adapters[i % len(adapters)]
        began = time.perf_counter()
        engine.load_adapter(f"r{i}", folder, trusted=True)
        seconds.append(time.perf_counter() - began)
        files += (folder / "adapter_model.safetensors").stat().st_size
    grown = psutil.Process().memory_info().rss - before
    ms = sorted(s * 1000 for s in seconds)
    return {"loads": resident, "p50_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * len(ms))], "max_ms": ms[-1],
            "resident_bytes": grown, "file_bytes": files, "memory_over_files": grown / files}  # fmt: skip


def load_test(base: Path, adapters: list[Path], work: Path, clients: int = 32, requests: int = 320, names: int = 10) -> dict:
    """HTTP on loopback: ``clients`` concurrent clients over ``names`` adapters while two of them are unloaded and reloaded every 100 ms."""
    import httpx

    root = work / "adapters"
    port = _free_port()
    args = [sys.executable, "-m", "serve", "--base", str(base), "--port", str(port), "--adapter-root", str(root), "--max-queue", "256"]
    for i in range(names):
        args += ["--adapter", f"n{i}={adapters[i % len(adapters)]}"]
    server = _start(args, work / "server.log")
    url = f"http://127.0.0.1:{port}"
    churn = {f"n{names - 2}", f"n{names - 1}"}  # these come and go; 404s for them are intended
    texts = [s[:120] for s in sentences()[:64]]
    try:
        _wait_healthy(url, server, work / "server.log")

        async def main() -> dict:
            statuses: dict[str, int] = {}
            failures: list[str] = []
            stop = asyncio.Event()
            queue = list(range(requests))
            rng = random.Random(0)
            async with httpx.AsyncClient(base_url=url, timeout=300) as http:

                async def client():
                    while queue:
                        queue.pop()
                        name = f"n{rng.randrange(names)}"
                        r = await http.post("/v1/completions", json={"model": name, "prompt": rng.choice(texts), "max_tokens": 16})
                        key = f"{r.status_code}{' (churned adapter)' if name in churn else ''}"
                        statuses[key] = statuses.get(key, 0) + 1
                        if r.status_code != 200 and not (r.status_code == 404 and name in churn):
                            failures.append(f"{name}: {r.status_code} {r.text[:200]}")

                async def admin():
                    cycles = 0
                    while not stop.is_set():
                        for name in sorted(churn):
                            await http.delete(f"/v1/adapters/{name}")
                            await asyncio.sleep(0.05)
                            r = await http.post("/v1/adapters", json={"name": name, "path": adapters[0].name})
                            if r.status_code != 201:
                                failures.append(f"reload {name}: {r.status_code} {r.text[:200]}")
                            await asyncio.sleep(0.05)
                        cycles += 1
                    return cycles

                rss = []
                admin_task = asyncio.create_task(admin())
                for _ in range(2):  # two equal rounds: memory after the second should not exceed the first
                    queue[:] = range(requests // 2)
                    await asyncio.gather(*(client() for _ in range(clients)))
                    rss.append(psutil.Process(server.pid).memory_info().rss)
                stop.set()
                cycles = await admin_task
            return {"statuses": statuses, "failures": failures, "reload_cycles": cycles, "rss_after_round": rss}

        result = asyncio.run(main())
        result["server_alive"] = server.poll() is None
        return result
    finally:
        server.terminate()
        server.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    # The server's log goes to a file: a pipe nobody reads would block it once full.
    with open(log, "w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited; the end of {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def demo(work: Path) -> None:
    """Serve the NF4 base with the two tenant adapters of ``benchmarks.qlora --demo`` (in ``work``), ask each one thing, stop."""
    import httpx

    base = work / "nf4"
    port = _free_port()
    args = [sys.executable, "-m", "serve", "--base", str(base), "--port", str(port)]
    args += [a for tenant in ("ledger", "herald") for a in ("--adapter", f"{tenant}={work / f'adapter-{tenant}'}")]
    print(" ".join(["python"] + args[1:]))
    server = _start(args, work / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server, work / "server.log")
        print("models:", [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]])
        question = sentences()[1]
        for model in ("ledger", "herald", base.name):
            body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 0}
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
            print(f"\n{model}: {question!r}\n  -> {reply['choices'][0]['message']['content']!r}")
    finally:
        server.terminate()
        server.wait(30)
    print("\nserver stopped")


def main(argv: list[str] | None = None) -> int:
    """Command line of the benchmark."""
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="float checkpoint (SmolLM2-135M-Instruct); not needed with --demo")
    parser.add_argument("--work", type=Path, default=Path("bench-results/serve"))
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per stream")
    parser.add_argument("--skip", nargs="*", default=[], choices=("engine", "naive", "loading", "load-test"))
    parser.add_argument("--demo", action="store_true", help="serve the adapters of `benchmarks.qlora --demo` in WORK and ask each one question")
    args = parser.parse_args(argv)
    if args.demo:
        demo(args.work)
        return 0
    if args.model is None:
        parser.error("--model is required")
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = nf4_base(args.model, args.work)
    adapters = make_adapters(base, args.work, 10)
    prompts = prompt_ids(AutoTokenizer.from_pretrained(base), STREAMS)
    results: dict = {}
    if "engine" not in args.skip:
        results["engine"] = engine_throughput(base, adapters, prompts, args.tokens)
    if "naive" not in args.skip:
        results["naive_peft"] = naive_peft(base, adapters, prompts, args.tokens)
    if "engine" not in args.skip and "naive" not in args.skip:
        e = results["engine"]
        results["ratios"] = {
            "8_adapters_over_1_adapter": e["16_streams_8_adapters"]["tokens_per_s"] / e["16_streams_1_adapter"]["tokens_per_s"],
            "batch16_over_naive_peft": e["16_streams_8_adapters"]["tokens_per_s"] / results["naive_peft"]["tokens_per_s"],
            "batch16_over_single_stream": e["16_streams_8_adapters"]["tokens_per_s"] / e["single_stream"]["tokens_per_s"],
        }
    results["reference"] = reference_check(args.model, base, adapters[0], prompts[:4])
    if "loading" not in args.skip:
        results["adapter_loading"] = adapter_loading(base, adapters)
    if "load-test" not in args.skip:
        results["load_test"] = load_test(base, adapters, args.work)
    results["seconds"] = time.perf_counter() - started
    (args.work / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
