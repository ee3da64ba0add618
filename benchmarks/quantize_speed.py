"""Quantization speed and memory, side by side with bitsandbytes, in one run.

    python -m benchmarks.quantize_speed --model ~/.cache/compressor/models/SmolLM2-135M-Instruct [--big]

1. Throughput of NF4 (double quantization) over the linear weights of ``--model``: our
   ``nf4.quantize`` against ``bitsandbytes.functional.quantize_4bit`` on the same tensors, checked
   bit-identical, best of ``--repeats`` interleaved runs.
2. The whole ``compressor quantize --method nf4`` run on ``--model``: wall time and the peak resident
   memory above the interpreter's baseline (a child that imports the same modules and exits).
3. With ``--big``: a checkpoint shaped like Llama-3.2-1B with random bfloat16 weights, written shard
   by shard, compressed by us and the stock way (transformers ``from_pretrained`` with
   ``BitsAndBytesConfig`` nf4 + double quantization, then ``save_pretrained``), interleaved and
   best of ``--rounds`` each; time, peak memory and a tensor-by-tensor comparison of the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks.measure import check, python, run_measured
from compressor.checkpoint.reader import folder_bytes

_STOCK = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16)
AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, device_map="cpu").save_pretrained(sys.argv[2])
"""
# The interpreter's baseline: the same modules imported and the compiled kernels loaded (a fixed cost,
# whatever the checkpoint), on a weight of one block.
_BASELINE = (
    "import torch, compressor.cli, compressor.quantize, compressor.checkpoint.model_info\n"
    "from compressor.formats import nf4\n"
    "w = torch.ones(64, dtype=torch.bfloat16)\n"
    "packed, state = nf4.quantize(w); nf4.error(w, packed, state)\n"
)


def linear_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights ``compressor quantize`` would quantize, as stored."""
    from compressor.checkpoint.model_info import load_config, meta_model, plan_linears
    from compressor.checkpoint.reader import find_checkpoint, open_shard

    ckpt = find_checkpoint(model_dir)
    plan = plan_linears(meta_model(load_config(ckpt.config_path)))
    out = {}
    for shard in ckpt.shards:
        with open_shard(shard) as reader:
            out.update({k: reader.get(k) for k in reader.keys() if k.removesuffix(".weight") in plan.quantize})
    return out


def throughput(weights: dict[str, torch.Tensor], repeats: int) -> dict:
    """MB/s of float32 input for bitsandbytes and for us, and whether every output matched."""
    import bitsandbytes.functional as bnbf

    from compressor.formats import nf4

    weights = {k: v.float() for k, v in weights.items()}
    mb = sum(w.numel() * 4 for w in weights.values()) / 1e6
    identical = True
    for w in weights.values():  # check once, outside the timed loops
        ref, ref_state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        packed, state = nf4.quantize(w)
        identical &= torch.equal(ref.reshape(-1), packed) and torch.equal(ref_state.absmax, state.absmax)
        identical &= torch.equal(ref_state.state2.absmax, state.absmax_state.absmax) and ref_state.offset.item() == state.absmax_offset
    best = {"bitsandbytes": float("inf"), "compressor": float("inf")}
    for _ in range(repeats):
        for who in best:
            start = time.perf_counter()
            for w in weights.values():
                if who == "bitsandbytes":
                    bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
                else:
                    nf4.quantize(w)
            best[who] = min(best[who], time.perf_counter() - start)
    return {
        "float32_mb": mb,
        "bitsandbytes_mb_s": mb / best["bitsandbytes"],
        "compressor_mb_s": mb / best["compressor"],
        "speedup": best["bitsandbytes"] / best["compressor"],
        "bit_identical": bool(identical),
    }


def _settle(out_dir: Path) -> None:
    # Start each timed run with no earlier output being deleted or flushed under it: both are slow
    # on a shared disk and would be charged to whichever run comes next.
    shutil.rmtree(out_dir, ignore_errors=True)
    os.sync()
    time.sleep(2)


def whole_run(model_dir: Path, out_dir: Path, rounds: int = 1) -> dict:
    """Best wall time and its peak memory of ``compressor quantize --method nf4``, against the import baseline."""
    baseline = check(run_measured(python(_BASELINE)), "baseline")
    runs = []
    for _ in range(rounds):
        _settle(out_dir)
        cmd = [sys.executable, "-m", "compressor", "quantize", str(model_dir), str(out_dir), "--method", "nf4", "--quiet"]
        runs.append(check(run_measured(cmd), "quantize"))
    best = min(runs, key=lambda r: r.seconds)
    size = folder_bytes(model_dir)
    extra = max(r.peak_rss for r in runs) - baseline.peak_rss
    return {
        "checkpoint_bytes": size,
        "seconds": best.seconds,
        "all_seconds": [r.seconds for r in runs],
        "peak_rss": max(r.peak_rss for r in runs),
        "baseline_rss": baseline.peak_rss,
        "extra_rss": extra,
        "extra_over_checkpoint": extra / size,
    }


def compare_outputs(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors that differ) between two quantized folders, read one tensor at a time."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                out.update(dict.fromkeys(f.keys(), shard))
        return out

    ia, ib = index(a), index(b)
    differ = len(set(ia) ^ set(ib))
    for key in sorted(set(ia) & set(ib)):
        with safe_open(ia[key], "pt") as fa, safe_open(ib[key], "pt") as fb:
            differ += not torch.equal(fa.get_tensor(key), fb.get_tensor(key))
    return len(set(ia) | set(ib)), differ


def big_model(work: Path, rounds: int) -> dict:
    """Ours against the stock way on a random checkpoint shaped like Llama-3.2-1B, best of ``rounds`` each."""
    from benchmarks.synthetic import llama_3_2_1b_config, write_random_checkpoint

    src = work / "llama-3.2-1b-random-bf16"
    if not (src / "config.json").exists():
        print(f"writing a random Llama-3.2-1B-shaped checkpoint to {src} ...", flush=True)
        write_random_checkpoint(src, llama_3_2_1b_config())
    ours_dir, stock_dir = work / "ours-nf4", work / "stock-nf4"
    stock_runs, ours_runs = [], []
    for _ in range(rounds):  # interleaved, so that a noisy spell hits both sides alike
        ours_runs.append(whole_run(src, ours_dir))
        _settle(stock_dir)
        stock_runs.append(check(run_measured([sys.executable, "-c", _STOCK, str(src), str(stock_dir)]), "stock transformers + bitsandbytes"))
    ours = min(ours_runs, key=lambda r: r["seconds"])
    ours["all_seconds"] = [r["seconds"] for r in ours_runs]
    stock = min(stock_runs, key=lambda r: r.seconds)
    compared, differ = compare_outputs(ours_dir, stock_dir)
    return {
        "params": json.loads((ours_dir / "manifest.json").read_text())["summary"]["params_total"],
        "checkpoint_bytes": ours["checkpoint_bytes"],
        "compressor": ours,
        "stock": {
            "seconds": stock.seconds,
            "all_seconds": [r.seconds for r in stock_runs],
            "peak_rss": stock.peak_rss,
            "extra_rss": stock.peak_rss - ours["baseline_rss"],
        },  # fmt: skip
        "speedup": stock.seconds / ours["seconds"],
        "tensors_compared": compared,
        "tensors_differing": differ,
    }


def report(results: dict) -> str:
    """Markdown tables of the figures."""
    gb = 1e9
    t = results["throughput"]
    lines = [
        "| NF4 + double quant, SmolLM2 linear weights | MB/s of float32 in |",
        "|---|---:|",
        f"| bitsandbytes `quantize_4bit` (CPU) | {t['bitsandbytes_mb_s']:.0f} |",
        f"| compressor `nf4.quantize` | {t['compressor_mb_s']:.0f} |",
        f"| speed-up (bit-identical: {t['bit_identical']}) | {t['speedup']:.1f}x |",
        "",
        "| whole run | checkpoint | seconds | peak RSS | above baseline | / checkpoint |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    runs = [("SmolLM2-135M float32", results["whole_run"])]
    if "big" in results:
        runs.append(("Llama-3.2-1B shape bf16", results["big"]["compressor"]))
    for name, r in runs:
        lines.append(f"| {name} | {r['checkpoint_bytes'] / gb:.2f} GB | {r['seconds']:.1f} | {r['peak_rss'] / gb:.2f} GB | "
                     f"{r['extra_rss'] / gb:.2f} GB | {r['extra_over_checkpoint']:.2f} |")  # fmt: skip
    if "big" in results:
        b = results["big"]
        lines += [
            "",
            "| Llama-3.2-1B shape, bf16, nf4 + double quant | seconds | peak RSS |",
            "|---|---:|---:|",
            f"| transformers + bitsandbytes (`from_pretrained` + `save_pretrained`) | {b['stock']['seconds']:.1f} | {b['stock']['peak_rss'] / gb:.2f} GB |",
            f"| `compressor quantize` | {b['compressor']['seconds']:.1f} | {b['compressor']['peak_rss'] / gb:.2f} GB |",
            f"| speed-up (best of {len(b['stock']['all_seconds'])} interleaved runs each) | {b['speedup']:.2f}x | |",
            f"| tensors compared / differing | {b['tensors_compared']} / {b['tensors_differing']} | |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="float checkpoint (SmolLM2-135M-Instruct)")
    parser.add_argument("--big", action="store_true", help="also the 1.24B-parameter comparison (needs ~5 GB of disk)")
    parser.add_argument("--work", type=Path, default=Path("bench-results"), help="folder for outputs")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of the throughput test")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each whole-run measurement")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"throughput": throughput(linear_weights(args.model), args.repeats)}
    results["whole_run"] = whole_run(args.model, args.work / "smollm2-nf4", args.rounds)
    if args.big:
        results["big"] = big_model(args.work, args.rounds)
    text = report(results)
    print(text)
    (args.work / "quantize_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.work / "quantize_speed.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
