"""QLoRA training cost against PEFT + bitsandbytes, the stack users would otherwise run, on the same batches.

    python -m benchmarks.qlora --vs-peft [--models smollm2 llama-1b] [--rounds 2] [--steps 12] [--big-steps 4]
                                         [--compute float32 bfloat16] [--json FILE]
    python -m benchmarks.qlora --vs-peft --loss-steps 30 --seeds 0 1 2 [--compute ...] [--json FILE]

Both sides train LoRA rank 8 (alpha 16, dropout 0.05) on every projection of an NF4 base with double
quantization, batch 8 of 128-token windows of licence text, gradient checkpointing, AdamW at 2e-4
with compressor train's warm-up and linear decay:

* ours: ``compressor train NF4_BASE --gradient-checkpointing --compute C ...`` (the CLI's own code
  path), where NF4_BASE is ``compressor quantize FLOAT NF4_BASE --method nf4``;
* PEFT: ``from_pretrained(FLOAT, quantization_config=BitsAndBytesConfig(nf4, double quant,
  bnb_4bit_compute_dtype=C))``, ``prepare_model_for_kbit_training`` (upcasts what is not 4-bit to
  float32 and turns on transformers' gradient checkpointing), ``get_peft_model`` and a plain loop, the
  loss from the model's own ``labels`` path (the mean over trained tokens, as ours).

C, the dtype of the base's products, is each of ``--compute`` on both sides. bfloat16 compute is
where bitsandbytes' CPU path and AVX512-BF16 machines are fast; on both sides only the frozen base's
products are bfloat16 (ours also keeps the frozen embedding in bfloat16). Ratios are taken at
equal compute, and ours in bfloat16 against PEFT in float32 (the configuration of issue 18's table).

Both read one JSONL file through ``compressor.lora.data`` (the same token ids and labels) and take the
same batches in the same order (``compressor.lora.train._batches`` at the seed). Every run is a fresh
process whose peak RSS comes from ``wait4`` (``benchmarks.measure``); in each round ours and PEFT
alternate which goes first. Step time is the median over the steps after the first.

Models: ``smollm2`` (``--model``, SmolLM2-135M-Instruct) and ``llama-1b``, a random checkpoint shaped
like Llama-3.2-1B (``benchmarks.synthetic``, written once into ``--work``). It has no tokenizer, so it
gets SmolLM2's: its ids (below 49,152) are all rows of the 128,256-row embedding, every window is cut
at 128 tokens, so the tensors have Llama-3.2-1B's shapes (the head computes all 128,256 logits); only
the text behind the ids differs. Its losses are those of random weights (about ln 128256 = 11.8), still
comparable between the sides.

``--loss-steps N --seeds ...`` trains SmolLM2 N steps per seed on both sides and prints the loss at
step N (on the same batch for both), the mean of the last five steps, and the spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.measure import check, run_measured
from compressor.checkpoint.atomic import atomic_file
from compressor.native import cpu_features

SMOLLM2 = Path.home() / ".cache/compressor/models/SmolLM2-135M-Instruct"
SIDES = ("ours", "peft")
SEQ_LEN = 128
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Run:
    """One training run of one side, as its worker process gets it (JSON on the command line)."""

    side: str  # "ours" or "peft"
    base: str  # ours: the NF4 folder; peft: the float folder bitsandbytes quantizes at load
    data: str
    steps: int
    seed: int = 0
    batch_size: int = 8
    seq_len: int = SEQ_LEN
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 2e-4
    compute: str = "float32"  # the dtype of the base's products: ours --compute, PEFT bnb_4bit_compute_dtype
    keep_layers: int = 0  # ours: --keep-layers (the last N layers not recomputed)

    @property
    def key(self) -> str:
        """The configuration's name in the tables: side and compute dtype."""
        return f"{self.side} {self.compute}"


# -- data and models, prepared once in the parent ----------------------------------------------------


def write_windows(path: Path, tokenizer_dir: Path, seq_len: int) -> Path:
    """Licence sentences packed in order into ``{"text"}`` records of at least ``seq_len`` tokens (cut to it on encoding)."""
    from transformers import AutoTokenizer

    from benchmarks.qlora import sentences

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    records, current = [], []
    for s in sentences():
        current.append(s)
        text = " ".join(current)
        if len(tokenizer(text, add_special_tokens=False).input_ids) >= seq_len:
            records.append(json.dumps({"text": text}))
            current = []
    path.write_text("\n".join(records) + "\n")
    return path


def random_1b(work: Path, tokenizer_dir: Path) -> Path:
    """The Llama-3.2-1B-shaped random bf16 checkpoint, with SmolLM2's tokenizer files (see the module docstring)."""
    from benchmarks.synthetic import llama_3_2_1b_config, write_random_checkpoint

    folder = work / "llama-3.2-1b-random-bf16"
    if not (folder / "config.json").exists():
        print(f"writing a random Llama-3.2-1B-shaped checkpoint to {folder} ...", flush=True)
        write_random_checkpoint(folder, llama_3_2_1b_config())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


def nf4_of(float_dir: Path, work: Path) -> Path:
    """``compressor quantize FLOAT --method nf4`` (double quantization by default), once."""
    out = work / f"{float_dir.name}-nf4"
    if not (out / "manifest.json").exists():
        cmd = [sys.executable, "-m", "compressor", "quantize", str(float_dir), str(out), "--method", "nf4", "--overwrite", "--quiet"]
        subprocess.run(cmd, check=True)
    return out


# -- the two workers, each in its own process --------------------------------------------------------


def ours_worker(run: Run) -> dict:
    """``compressor train`` through the CLI's entry point, reading the run's TrainSummary on the way out."""
    import compressor.lora.train as lora_train
    from compressor.cli import main

    # The CLI prints only a summary (mean s/step including the model's load, first and last loss), so
    # its call to ``train`` is wrapped to keep the per-step figures; the CLI imports it at call time.
    summaries, real = [], lora_train.train

    def recording(job):
        summaries.append(real(job))
        return summaries[-1]

    lora_train.train = recording
    with tempfile.TemporaryDirectory() as out:
        argv = ["train", run.base, "--data", run.data, "--out", out, "--overwrite", "--quiet", "--steps", str(run.steps),
                "--batch-size", str(run.batch_size), "--seq-len", str(run.seq_len), "--gradient-checkpointing",
                "--rank", str(run.rank), "--alpha", str(run.alpha), "--dropout", str(run.dropout), "--lr", str(run.lr),
                "--seed", str(run.seed), "--eval-split", "0", "--compute", run.compute, "--keep-layers", str(run.keep_layers)]  # fmt: skip
        if main(argv) != 0:
            raise SystemExit(1)
    return {"step_seconds": summaries[0].step_seconds, "losses": summaries[0].train_losses}


def peft_worker(run: Run) -> dict:
    """PEFT on a bitsandbytes NF4 model, trained on the batches ``compressor train`` would take."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from compressor.lora.data import collate, encode, read_jsonl
    from compressor.lora.train import _batches, _split

    torch.manual_seed(run.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    examples, _ = _split([encode(r, tokenizer, run.seq_len) for r in read_jsonl(Path(run.data))], 0.0, run.seed, Path(run.data))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=getattr(torch, run.compute))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(run.base, quantization_config=quant, device_map="cpu")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=run.rank, lora_alpha=run.alpha, lora_dropout=run.dropout, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0)
    steps = run.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * (1 - s / steps))
    model.train()
    step_seconds, losses = [], []
    for batch in _batches(len(examples), run.batch_size, steps, run.seed):
        began = time.perf_counter()
        loss = model(**collate([examples[i] for i in batch], pad_id)).loss  # mean over the trained (shifted) tokens
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - began)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    return {"step_seconds": step_seconds, "losses": losses, "trainable_params": sum(p.numel() for p in params), "param_dtypes": dtypes}


def measured(run: Run) -> dict:
    """Run ``run`` in a fresh process; its figures with its peak RSS and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.qlora_vs_peft", "--worker", json.dumps(asdict(run)), str(result)]
        proc = check(run_measured(cmd), f"{run.side} on {Path(run.base).name}")
        out = json.loads(result.read_text())
    timed = out["step_seconds"][1:] or out["step_seconds"]  # the first step pays one-off costs
    return {**out, "median_step_s": statistics.median(timed), "peak_rss": proc.peak_rss, "wall_s": proc.seconds}


# -- the comparisons ---------------------------------------------------------------------------------


def configs(computes: list[str]) -> list[tuple[str, str]]:
    """(side, compute) of every run, each compute dtype on both sides."""
    return [(side, compute) for compute in computes for side in SIDES]


def cost_rounds(bases: dict[str, dict[str, Path]], data: Path, steps: dict[str, int], rounds: int, computes: list[str],
                keep_layers: dict[str, int] | None = None) -> dict:  # fmt: skip
    """Every configuration on every model, ``rounds`` times, interleaved; the runs and their medians over rounds."""
    keep_layers = keep_layers or {}
    runs: dict[str, dict[str, list]] = {m: {} for m in bases}
    for r in range(rounds):
        for model, base in bases.items():
            for side, compute in configs(computes) if r % 2 == 0 else configs(computes)[::-1]:
                run = Run(
                    side, str(base[side]), str(data), steps[model], compute=compute, keep_layers=keep_layers.get(model, 0) if side == "ours" else 0
                )
                result = measured(run)
                runs[model].setdefault(run.key, []).append(result)
                print(f"round {r + 1} {model:9} {run.key:14} median step {result['median_step_s']:.2f} s, peak RSS {result['peak_rss'] / 1e9:.2f} GB, "
                      f"final loss {result['losses'][-1]:.4f}, {result['wall_s']:.0f} s in all", flush=True)  # fmt: skip
    return {model: {"steps": steps[model], "rounds": rounds, "keep_layers": keep_layers.get(model, 0), "cpu": cpu(), **medians(keyed), "runs": keyed}
            for model, keyed in runs.items()}  # fmt: skip


def cpu() -> str:
    """This machine's processor as the figures depend on it: its name, cores, and whether it has AVX-512 and bfloat16 products."""
    name, flags = platform.processor() or platform.machine(), set(cpu_features().split())
    if Path("/proc/cpuinfo").exists():
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), name)
    vector = "AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {os.cpu_count()} cores, {vector}"


def ratio_pairs(keys) -> list[tuple[str, str]]:
    """(ours, peft) pairs to divide: each compute dtype against itself, and ours in bfloat16 against PEFT in float32 (the issue's PEFT)."""
    pairs = [(f"ours {c}", f"peft {c}") for c in ("float32", "bfloat16")]
    pairs.append(("ours bfloat16", "peft float32"))
    return [(a, b) for a, b in pairs if a in keys and b in keys]


def medians(keyed: dict[str, list[dict]]) -> dict:
    """Each configuration's medians over rounds of median step, peak RSS and final loss, and the ratios of :func:`ratio_pairs`."""
    out: dict = {k: {"median_step_s": statistics.median(r["median_step_s"] for r in runs), "peak_rss": statistics.median(r["peak_rss"] for r in runs),
                     "final_loss": statistics.median(r["losses"][-1] for r in runs)} for k, runs in keyed.items()}  # fmt: skip
    out["ratio"] = {f"{a} / {b}": {k: out[a][k] / out[b][k] for k in ("median_step_s", "peak_rss")} for a, b in ratio_pairs(keyed)}
    return out


def cost_table(summary: dict) -> str:
    """The cost comparison as a markdown table."""
    lines = ["| model | configuration | median step | peak RSS | final loss |", "|---|---|---:|---:|---:|"]
    for model, m in summary.items():
        for key in m["runs"]:
            f = m[key]
            lines.append(
                f"| {model} ({m['steps']} steps) | {key} | {f['median_step_s']:.2f} s | {f['peak_rss'] / 1e9:.2f} GB | {f['final_loss']:.4f} |"
            )
        for pair, r in m["ratio"].items():
            lines.append(f"| {model} | {pair} | {r['median_step_s']:.2f}x | {r['peak_rss']:.2f}x | |")
    return "\n".join(lines)


def loss_seeds(base: dict[str, Path], data: Path, steps: int, seeds: list[int], computes: list[str]) -> dict:
    """The loss at step ``steps`` of every configuration at each seed (SmolLM2), and the spread over seeds."""
    per_seed: dict = {}
    for i, seed in enumerate(seeds):
        per_seed[seed] = {}
        for side, compute in configs(computes) if i % 2 == 0 else configs(computes)[::-1]:
            run = Run(side, str(base[side]), str(data), steps, seed=seed, compute=compute)
            losses = measured(run)["losses"]
            per_seed[seed][run.key] = {"final": losses[-1], "last5": statistics.mean(losses[-5:]), "losses": losses}
        print(f"seed {seed}: " + ", ".join(f"{k} {v['final']:.4f} (last 5 {v['last5']:.4f})" for k, v in per_seed[seed].items()), flush=True)
    keys = list(per_seed[seeds[0]])
    spread = {}
    for key in keys:
        finals = [v[key]["final"] for v in per_seed.values()]
        spread[key] = {"mean": statistics.mean(finals), "stdev": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                       "range": max(finals) - min(finals)}  # fmt: skip
    diffs = {f"{a} - {b}": [v[a]["final"] - v[b]["final"] for v in per_seed.values()] for a, b in ratio_pairs(keys)}
    return {"steps": steps, "seeds": per_seed, "spread": spread, "differences": diffs}


def loss_table(result: dict) -> str:
    """The loss comparison as a markdown table: the loss at the last step per seed and configuration, then the differences."""
    keys = list(result["spread"])
    lines = [f"| seed | {' | '.join(keys)} |", "|---:|" + "---:|" * len(keys)]
    for seed, v in result["seeds"].items():
        lines.append(f"| {seed} | " + " | ".join(f"{v[k]['final']:.4f}" for k in keys) + " |")
    s = result["spread"]
    lines.append("| mean ± stdev (range) | " + " | ".join(f"{s[k]['mean']:.4f} ± {s[k]['stdev']:.4f} ({s[k]['range']:.4f})" for k in keys) + " |")
    lines += ["", f"loss at step {result['steps']}, differences per seed:"]
    lines += [f"- {pair}: " + ", ".join(f"{d:+.4f}" for d in diffs) for pair, diffs in result["differences"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line of the comparison (``python -m benchmarks.qlora --vs-peft`` forwards here)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":  # the child of measured()
        run = Run(**json.loads(argv[1]))
        Path(argv[2]).write_text(json.dumps((ours_worker if run.side == "ours" else peft_worker)(run)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.qlora --vs-peft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SMOLLM2, help="SmolLM2-135M-Instruct's float folder")
    parser.add_argument("--work", type=Path, default=Path("bench-results/qlora-vs-peft"), help="NF4 bases, the 1B checkpoint, the data")
    parser.add_argument("--models", nargs="+", choices=("smollm2", "llama-1b"), default=["smollm2", "llama-1b"])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each side on each model")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run on SmolLM2")
    parser.add_argument("--big-steps", type=int, default=4, help="optimizer steps per run on the 1B shape")
    parser.add_argument("--loss-steps", type=int, help="instead: the loss after this many steps on SmolLM2, per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--compute", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"],
                        help="compute dtypes of the base's products, each run on both sides")  # fmt: skip
    parser.add_argument("--keep-layers", nargs=2, action="append", metavar=("MODEL", "N"), default=[],
                        help="ours: --keep-layers N on MODEL (smollm2 or llama-1b); may be given for each")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures here (merged into the file's earlier ones: see merged)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = write_windows(args.work / "windows.jsonl", args.model, SEQ_LEN)
    floats = {"smollm2": args.model}
    if "llama-1b" in args.models and args.loss_steps is None:
        floats["llama-1b"] = random_1b(args.work, args.model)
    bases = {m: {"ours": nf4_of(f, args.work), "peft": f} for m, f in floats.items() if m in args.models or args.loss_steps}
    if args.loss_steps is not None:
        results = {"loss": loss_seeds(bases["smollm2"], data, args.loss_steps, args.seeds, args.compute)}
        print(loss_table(results["loss"]))
    else:
        keep = {model: int(n) for model, n in args.keep_layers}
        results = {"cost": cost_rounds(bases, data, {"smollm2": args.steps, "llama-1b": args.big_steps}, args.rounds, args.compute, keep)}
        print(cost_table(results["cost"]))
    results["seconds"] = time.perf_counter() - start
    print(f"{results['seconds']:.0f} s in all")
    if args.json:
        earlier = json.loads(args.json.read_text()) if args.json.exists() else {}
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(merged(earlier, results), indent=2) + "\n")
    return 0


def merged(earlier: dict, new: dict) -> dict:
    """``new``'s figures over ``earlier``'s: a cost run replaces the models it measured, a loss run the loss (each with its seconds)."""
    out = {k: v for k, v in earlier.items() if k in ("cost", "loss")}
    if "cost" in new:
        out["cost"] = {**out.get("cost", {}), **{m: {**v, "seconds": new["seconds"]} for m, v in new["cost"].items()}}
    if "loss" in new:
        out["loss"] = {**new["loss"], "seconds": new["seconds"]}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
