"""Batch-1 decoding through ``compressor.load`` for every format, beside float32 and bitsandbytes' NF4.

``python -m benchmarks.decode --model ~/.cache/compressor/models/SmolLM2-135M-Instruct --work bench-results/decode``

Each row is the folder ``compressor quantize`` writes (made once into WORK), loaded with
``compressor.load`` and run by transformers' ``generate`` (greedy, KV cache, a 48-token prompt of
licence text, 32 new tokens, timed from the first new token to the last inside one ``generate``, so
the prompt's prefill is left out): the same model code and overhead for every row, so the ratios are
the packed products against float32's. Rows are measured in interleaved rounds, keeping each
row's best; the NF4 folder also loads in stock transformers + bitsandbytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

METHODS = ("nf4", "fp4", "int4", "int3", "int2", "int8", "int8-sym")
ROUNDS = 2


def folders(model: Path, work: Path) -> dict[str, Path]:
    """Each method's output folder, quantized once."""
    from compressor.formats import config_for
    from compressor.quantize import QuantizeJob, quantize_checkpoint

    out = {}
    for method in METHODS:
        folder = work / method
        if not (folder / "manifest.json").exists():
            quantize_checkpoint(QuantizeJob(model, folder, config_for(method), overwrite=True, progress=False))
        out[method] = folder
    return out


def loaders(model: Path, packed: dict[str, Path]) -> dict[str, callable]:
    """Row name -> a function that loads that row's model."""
    import torch
    from transformers import AutoModelForCausalLM

    import compressor

    rows = {"float32": lambda: AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()}
    rows["bitsandbytes nf4 (stock transformers)"] = lambda: AutoModelForCausalLM.from_pretrained(packed["nf4"]).eval()
    for method, folder in packed.items():
        for activations in ("float32", "int8"):
            rows[f"{method}, {activations} activations"] = lambda f=folder, a=activations: compressor.load(f, activations=a)
    return rows


def tokens_per_second(model, prompt, new_tokens: int) -> float:
    """Greedy batch-1 decode speed: tokens after the first over the time between the first and the last, within one ``generate``."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        # Called once per generated token; never stops (min/max_new_tokens do).
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    clock = Clock()
    options = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, stopping_criteria=StoppingCriteriaList([clock]), **options)
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("bench-results/decode"))
    parser.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    rows = loaders(args.model, folders(args.model, args.work))
    prompt = AutoTokenizer.from_pretrained(args.model)(args.text.read_text()[:2000], return_tensors="pt").input_ids[:, :48]
    models = {name: load() for name, load in rows.items()}
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, model in models.items():
            speed = tokens_per_second(model, prompt, args.new_tokens)
            best[name] = max(best.get(name, 0.0), speed)
    base, bnb = best["float32"], best["bitsandbytes nf4 (stock transformers)"]
    lines = ["| row | tokens/s | vs float32 | vs bitsandbytes nf4 |", "|---|---:|---:|---:|"]
    for name, speed in best.items():
        lines.append(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {speed / bnb:.2f}x |")
    text = "\n".join(lines)
    (args.work / "decode.json").write_text(json.dumps({"tokens_per_s": best, "threads": torch.get_num_threads()}, indent=2))
    (args.work / "decode.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
