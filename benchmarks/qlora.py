"""QLoRA on SmolLM2-135M: two tenants with two tasks on one NF4 base, PEFT interoperability, and cost against float32.

``python -m benchmarks.qlora --model ~/.cache/compressor/models/SmolLM2-135M-Instruct --work bench-results/qlora``

The tasks are built from real English text (Debian's licence texts). Every prompt is a bare sentence
as the user's chat message; each tenant's adapter alone decides the answer's form:

* ``ledger`` answers with JSON: ``{"first_word": <the sentence's first word>, "words": <its word count>}``;
* ``herald`` answers with a tagline: ``SUMMARY: <its first three words> ... [<count> words]``.

The task metric is the share of held-out sentences whose answer has the tenant's form with the right
first word. ``--demo`` trains a small adapter per tenant for a couple of minutes each and prints answers before and after.
``--vs-peft`` compares training cost and loss with PEFT + bitsandbytes (``benchmarks/qlora_vs_peft.py``, its own flags).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

LICENSES = Path("/usr/share/common-licenses")
TENANTS = ("ledger", "herald")


def sentences(folder: Path = LICENSES, seed: int = 0) -> list[str]:
    """Distinct plain sentences and clauses of 5 to 24 words from the licence texts, shuffled."""
    found = set()
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.is_symlink():
            text = " ".join(path.read_text(errors="replace").split())
            for s in re.split(r"(?<=[.;:])\s+|(?<=,)\s+(?=and |or |but |which |that )", text):
                words = s.split()
                if 5 <= len(words) <= 24 and re.fullmatch(r"[A-Za-z][\w ,'\"()/-]*[.;:,]", s):
                    found.add(s)
    out = sorted(found)
    random.Random(seed).shuffle(out)
    return out


def answer(tenant: str, sentence: str) -> str:
    """The tenant's answer to a sentence."""
    words = sentence.split()
    if tenant == "ledger":
        return json.dumps({"first_word": words[0], "words": len(words)})
    return f"SUMMARY: {' '.join(words[:3])} ... [{len(words)} words]"


def follows(tenant: str, sentence: str, reply: str) -> bool:
    """Whether ``reply`` has the tenant's form with the right first word."""
    first = sentence.split()[0]
    reply = reply.strip()
    if tenant == "ledger":
        try:
            parsed = json.loads(reply)
        except ValueError:
            return False
        return isinstance(parsed, dict) and set(parsed) == {"first_word", "words"} and parsed["first_word"] == first
    match = re.fullmatch(r"SUMMARY: (\S+) \S+ \S+ \.\.\. \[\d+ words\]", reply)
    return bool(match) and match.group(1) == first


def write_data(path: Path, tenant: str, items: list[str]) -> Path:
    """A chat-format JSONL file of the tenant's answers to ``items``."""
    lines = [json.dumps({"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": answer(tenant, s)}]}) for s in items]
    path.write_text("\n".join(lines) + "\n")
    return path


@torch.no_grad()
def replies(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, batch: int = 16) -> list[str]:
    """Greedy answers to each prompt as a user message, batched with left padding."""
    tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch):
        chats = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts[i : i + batch]
        ]
        enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
        out += tokenizer.batch_decode(ids[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return out


def held_out_loss(model, tokenizer, tenant: str, items: list[str]) -> float:
    """Mean loss per trained token of the tenant's answers to ``items``."""
    from compressor.lora.data import encode
    from compressor.lora.train import loss_and_tokens

    examples = [
        encode({"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": answer(tenant, s)}]}, tokenizer, 128) for s in items
    ]
    loss, tokens = loss_and_tokens(model, examples, tokenizer.pad_token_id or tokenizer.eos_token_id)
    return loss / tokens


def with_adapter(base_dir: Path, adapter_dir: Path | None):
    """Our base (packed weights through QuantLinear) with an adapter applied, or bare."""
    import compressor
    from compressor.lora.adapters import apply_adapter, read_adapter

    model = compressor.load(base_dir, float32=True)
    if adapter_dir is not None:
        apply_adapter(model, read_adapter(adapter_dir), base_dir)
    return model.eval()


def nf4_base(model_dir: Path, work: Path) -> Path:
    """The NF4 base both tenants share, quantized once into ``work``."""
    from compressor.formats import config_for
    from compressor.quantize import QuantizeJob, quantize_checkpoint

    nf4 = work / "nf4"
    if not (nf4 / "manifest.json").exists():
        quantize_checkpoint(QuantizeJob(model_dir, nf4, config_for("nf4"), overwrite=True, progress=False))
    return nf4


def tenants(model_dir: Path, work: Path, steps: int, train_items: int, held: int) -> dict:
    """Train both tenants on the NF4 base and score every adapter on every task."""
    from transformers import AutoTokenizer

    from compressor.lora.train import TrainJob, train

    nf4 = nf4_base(model_dir, work)
    pool = sentences()
    test, train_pool = pool[:held], pool[held : held + train_items]
    tokenizer = AutoTokenizer.from_pretrained(nf4)
    results: dict = {"held_out_sentences": len(test), "train_sentences": len(train_pool), "tenants": {}}
    for tenant in TENANTS:
        data = write_data(work / f"{tenant}.jsonl", tenant, train_pool)
        job = TrainJob(nf4, data, work / f"adapter-{tenant}", rank=8, alpha=16, dropout=0.05, lr=1e-3, steps=steps, batch_size=8,
                       seq_len=128, eval_split=0.1, eval_every=max(steps // 4, 1), overwrite=True)  # fmt: skip
        summary = train(job)
        print("\n".join([f"[{tenant}]", *summary.lines()]), flush=True)
        results["tenants"][tenant] = {"train_seconds": summary.seconds, "steps": steps, "s_per_step": sum(summary.step_seconds) / steps,
                                      "eval_losses": summary.eval_losses}  # fmt: skip
    scores = {}
    for name, adapter in (("base", None), *((t, work / f"adapter-{t}") for t in TENANTS)):
        model = with_adapter(nf4, adapter)
        answers = replies(model, tokenizer, test)
        scores[name] = {
            "task": {t: sum(follows(t, s, a) for s, a in zip(test, answers)) / len(test) for t in TENANTS},
            "held_out_loss": {t: held_out_loss(model, tokenizer, t, test) for t in TENANTS},
            "examples": [{"prompt": s, "reply": a} for s, a in list(zip(test, answers))[:3]],
        }
        print(f"[{name}] task {scores[name]['task']} held-out loss {scores[name]['held_out_loss']}", flush=True)
    results["scores"] = scores
    results["peft"] = peft_checks(model_dir, nf4, work / "adapter-ledger", tokenizer, test)
    return results


@torch.no_grad()
def peft_checks(float_dir: Path, nf4: Path, adapter_dir: Path, tokenizer, test: list[str]) -> dict:
    """Our adapter through PEFT: onto the stock bitsandbytes NF4 base (logits against ours), and onto the float base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": s}, {"role": "assistant", "content": answer("ledger", s)}], tokenize=False)
        for s in test[:4]
    ]
    tokenizer.padding_side = "right"
    enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    ours = with_adapter(nf4, adapter_dir)(**enc).logits
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(nf4, device_map="cpu"), adapter_dir).eval()
    theirs = stock(**enc).logits
    mask = enc.attention_mask.bool()
    diff = (ours - theirs).abs()[mask]
    # The bare bases, to tell the kernels' difference from the adapter's.
    with stock.disable_adapter():
        bare = (with_adapter(nf4, None)(**enc).logits - stock(**enc).logits).abs()[mask]
    float_base = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    before = held_out_loss(float_base, tokenizer, "ledger", test)
    after = held_out_loss(PeftModel.from_pretrained(float_base, adapter_dir).eval(), tokenizer, "ledger", test)
    return {"stock_nf4_max_abs_logit_diff": diff.max().item(), "stock_nf4_mean_abs_logit_diff": diff.mean().item(),
            "bare_base_max_abs_logit_diff": bare.max().item(), "bare_base_mean_abs_logit_diff": bare.mean().item(),
            "logit_scale": ours.abs()[mask].mean().item(), "float_base_held_out_loss": before, "float_base_plus_adapter_held_out_loss": after}  # fmt: skip


def step_cost(base_dir: Path, data: Path, steps: int) -> dict:
    """Seconds per step and peak memory above the import baseline of LoRA training with gradient checkpointing, in this process."""
    from compressor.lora.train import TrainJob, train
    from compressor.report.worker import peak_rss

    baseline = peak_rss()
    summary = train(TrainJob(base_dir, data, Path(data).with_name(f"step-cost-{base_dir.name}"), rank=8, steps=steps, batch_size=8,
                             seq_len=128, eval_split=0, gradient_checkpointing=True, overwrite=True, progress=False))  # fmt: skip
    timed = sorted(summary.step_seconds[1:])  # the first step pays one-off costs
    return {"s_per_step": timed[len(timed) // 2], "peak_rss": peak_rss(), "baseline_rss": baseline, "extra_rss": peak_rss() - baseline}


# glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, where the interleaving
# of long-lived and short-lived activations fragments it: most of a step's peak RSS is freed memory.
# A fixed 1 MiB threshold hands large blocks back at free, so RSS follows the live tensors; steps get
# slower (fresh pages fault in), so step time is measured with the default allocator only.
RETURNING_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def costs(model_dir: Path, work: Path, steps: int) -> dict:
    """nf4 against float32 base, each in a fresh process (so memory is its own), interleaved twice, under both allocator settings."""
    runs: dict[str, list] = {f"{base}{suffix}": [] for base in ("nf4", "float32") for suffix in ("", "/returning")}
    for _ in range(2):
        for suffix, env in (("", {}), ("/returning", RETURNING_ALLOCATOR)):
            for name, base in (("nf4", work / "nf4"), ("float32", model_dir)):
                out = subprocess.run([sys.executable, "-m", "benchmarks.qlora", "--step-cost", str(base), str(work / "ledger.jsonl"), str(steps)],
                                     capture_output=True, text=True, check=True, env={**os.environ, **env})  # fmt: skip
                runs[name + suffix].append(json.loads(out.stdout.strip().splitlines()[-1]))
    least = {k: min(r["extra_rss"] for r in v) for k, v in runs.items()}
    fastest = {k: min(r["s_per_step"] for r in v) for k, v in runs.items()}
    return {"runs": runs, "time_ratio": fastest["nf4"] / fastest["float32"], "memory_ratio": least["nf4"] / least["float32"],
            "memory_ratio_returning_allocator": least["nf4/returning"] / least["float32/returning"]}  # fmt: skip


def demo(model_dir: Path, work: Path, steps: int) -> None:
    """Train each tenant for a couple of minutes on the NF4 base and show answers before and after."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from compressor.lora.train import TrainJob, train

    hf_logging.disable_progress_bar()
    nf4 = nf4_base(model_dir, work)
    pool = sentences()
    test, train_pool = pool[:3], pool[3:323]
    tokenizer = AutoTokenizer.from_pretrained(nf4)
    before = replies(with_adapter(nf4, None), tokenizer, test)
    for tenant in TENANTS:
        data = write_data(work / f"{tenant}.jsonl", tenant, train_pool)
        adapter = work / f"adapter-{tenant}"
        summary = train(TrainJob(nf4, data, adapter, rank=8, lr=1e-3, steps=steps, batch_size=8, seq_len=128, overwrite=True))
        print(f"\n{tenant}:\n" + "\n".join(summary.lines()))
        after = replies(with_adapter(nf4, adapter), tokenizer, test)
        for s, b, a in zip(test, before, after):
            print(f"\nprompt: {s}\n  base:          {b.strip()[:120]!r}\n  base + {tenant}: {a.strip()[:120]!r}")


def loftq_curves(model_dir: Path, work: Path, steps: int, every: int) -> dict:
    """Held-out loss curves of zero-initialized and LoftQ-initialized adapters (plain, and weighted by activations) on the NF4 base.

    The task is language modelling of licence sentences; the weighted LoftQ calibrates on other
    sentences than the ones trained and held out.
    """
    from compressor.lora.train import TrainJob, train

    nf4 = nf4_base(model_dir, work)
    pool = sentences()
    data, calibration = work / "sentences.jsonl", work / "sentences-calibration.txt"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in pool[:480]))
    calibration.write_text("\n".join(pool[480:]) + "\n")
    curves = {}
    for name, init, text in (("B = 0", "default", None), ("LoftQ", "loftq", None), ("LoftQ, activation-weighted", "loftq", calibration)):
        job = TrainJob(nf4, data, work / f"adapter-sentences-{len(curves)}", rank=8, alpha=16, dropout=0.05, lr=5e-4, steps=steps, batch_size=8,
                       seq_len=128, eval_split=1 / 6, eval_every=every, overwrite=True, init=init, float_dir=model_dir, calibration=text)  # fmt: skip
        curves[name] = train(job).eval_losses
        print(f"{name}: held-out loss by step: " + ", ".join(f"{step}: {loss:.4f}" for step, loss in curves[name]), flush=True)
    target = curves["B = 0"][-1][1]
    reached = {name: next((step for step, loss in curve if loss <= target), None) for name, curve in curves.items()}
    print(f"steps to reach B = 0's final held-out loss {target:.4f}: {reached}")
    return {"curves": curves, "target": target, "steps_to_target": reached}


def main(argv: list[str] | None = None) -> int:
    """Command line of the benchmark."""
    if argv is None:
        argv = sys.argv[1:]
    if "--vs-peft" in argv:  # the comparison with PEFT + bitsandbytes has its own module and flags
        from benchmarks import qlora_vs_peft

        return qlora_vs_peft.main([a for a in argv if a != "--vs-peft"])
    if argv and argv[0] == "--step-cost":  # the child of costs()
        print(json.dumps(step_cost(Path(argv[1]), Path(argv[2]), int(argv[3]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.qlora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="float checkpoint (SmolLM2-135M-Instruct)")
    parser.add_argument("--work", type=Path, default=Path("bench-results/qlora"))
    parser.add_argument("--steps", type=int, default=110, help="optimizer steps per tenant (batch 8)")
    parser.add_argument("--train-sentences", type=int, default=600)
    parser.add_argument("--held-out", type=int, default=40)
    parser.add_argument("--cost-steps", type=int, default=6)
    parser.add_argument("--demo", action="store_true", help="train each tenant briefly and show answers before and after")
    parser.add_argument("--costs-only", action="store_true", help="only the step time and memory comparison (WORK from an earlier full run)")
    parser.add_argument("--loftq", action="store_true", help="only the held-out loss curves of zero and LoftQ initialization (--steps, eval every 5)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.demo:
        demo(args.model, args.work, args.steps)
        return 0
    if args.loftq:
        results = loftq_curves(args.model, args.work, args.steps, every=5)
        (args.work / "loftq.json").write_text(json.dumps(results, indent=2) + "\n")
        return 0
    if args.costs_only:
        print(json.dumps(costs(args.model, args.work, args.cost_steps), indent=2))
        return 0
    start = time.perf_counter()
    results = tenants(args.model, args.work, args.steps, args.train_sentences, args.held_out)
    results["costs"] = costs(args.model, args.work, args.cost_steps)
    results["seconds"] = time.perf_counter() - start
    (args.work / "qlora.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "scores"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
