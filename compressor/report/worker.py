"""Measure one row of the trade-off report, in a process of its own.

Each row runs in a fresh interpreter (``python -m compressor.report.worker JOB.json RESULT.json``)
so that its peak resident memory is its own and not the sum of every model loaded before it. The
order inside matters for the same reason: load, decode, read the peak; only then load the float
reference for perplexity, KL and agreement.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint.reader import folder_bytes
from ..evaluate import evaluate_models
from ..formats import payload_nbytes
from ..nn import QuantLinear
from ..text import text_windows
from .rows import BITSANDBYTES, FLOAT, OURS, Row


@dataclass(frozen=True)
class MeasureJob:
    """What a worker measures: ``row``, loaded from ``model_dir``, against the float ``reference_dir``."""

    row: Row
    model_dir: Path  # our quantized folder for OURS rows, else the float checkpoint
    reference_dir: Path
    text: Path
    windows: int
    seq_len: int
    new_tokens: int
    prompt_tokens: int = 32

    def to_json(self) -> str:
        """The job as JSON text, for the worker's command line."""
        return json.dumps({**asdict(self), **{k: str(v) for k, v in vars(self).items() if isinstance(v, Path)}})

    @classmethod
    def from_json(cls, text: str) -> MeasureJob:
        """Inverse of :meth:`to_json`."""
        raw = json.loads(text)
        paths = {k: Path(raw[k]) for k in ("model_dir", "reference_dir", "text")}
        return cls(**{**raw, **paths, "row": Row(**raw["row"])})


def peak_rss() -> int:
    """Peak resident memory of this process since it started, in bytes (``VmHWM`` on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_row(row: Row, model_dir: Path):
    """The model of ``row``, on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..loading import load

    if row.source == OURS:
        return load(model_dir)
    if row.source == FLOAT:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, row.dtype), device_map="cpu").eval()
    if row.source == BITSANDBYTES:
        # The same options our nf4/fp4/int8-sym folders record, so the two load the same model.
        if row.method == "int8-sym":
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=row.method, bnb_4bit_use_double_quant=row.double_quant,
                bnb_4bit_compute_dtype=torch.float32,
            )  # fmt: skip
        return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu").eval()
    raise ValueError(f"unknown row source {row.source!r}")


def quantized_layers(model) -> tuple[int, int]:
    """(parameters, bytes) of the model's quantized linear layers: codes, scales and nested scales."""
    import bitsandbytes as bnb

    params = nbytes = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            params += math.prod(module.state.shape)
            nbytes += payload_nbytes(module.packed, module.state)
        elif isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            params += math.prod(qs.shape)
            nbytes += module.weight.nbytes + qs.absmax.nbytes
            if qs.nested:
                nbytes += qs.state2.absmax.nbytes + 4  # + the float32 offset
        elif isinstance(module, bnb.nn.Linear8bitLt):
            params += module.weight.numel()
            nbytes += module.weight.nbytes + module.weight.SCB.nbytes
    return params, nbytes


def state_bytes(model) -> int:
    """Bytes of the tensors ``save_pretrained`` would write (tied weights once), without writing them."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.nbytes)
        if key not in seen:
            seen.add(key)
            total += tensor.nbytes
    return total


@torch.inference_mode()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Tokens per second of greedy decoding at batch 1 with the KV cache, ``new_tokens`` of them."""
    options = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **options)  # first-call costs out of the timing
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
    seconds = time.perf_counter() - start
    return (out.shape[1] - prompt.shape[1]) / seconds


def measure(job: MeasureJob) -> dict:
    """Every figure of one row (see the report's columns)."""
    from transformers import AutoTokenizer

    row = job.row
    baseline = peak_rss()
    batches = text_windows(AutoTokenizer.from_pretrained(job.reference_dir), job.text, job.windows, job.seq_len)
    start = time.perf_counter()
    model = load_row(row, job.model_dir)
    load_seconds = time.perf_counter() - start
    q_params, q_bytes = quantized_layers(model)
    # Weighed before the first forward: bitsandbytes' CPU path repacks 4-bit weights in place then.
    checkpoint_bytes = folder_bytes(job.model_dir) if row.source == OURS else state_bytes(model)
    speed = decode_speed(model, batches[:1, : job.prompt_tokens], job.new_tokens)
    peak = peak_rss()
    reference = model if row.source == FLOAT and row.dtype == "float32" else load_row(Row("float32", FLOAT), job.reference_dir)
    params_total = sum(p.numel() for p in reference.parameters())
    quality = evaluate_models(model, batches, reference)
    return {
        **asdict(row),
        "params_total": params_total,
        "params_quantized": q_params,
        "quantized_bits_per_param": 8 * q_bytes / q_params if q_params else None,
        "model_bits_per_param": 8 * checkpoint_bytes / params_total,
        "checkpoint_bytes": checkpoint_bytes,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "load_seconds": load_seconds,
        "tokens_per_second": speed,
        "new_tokens": job.new_tokens,
        "perplexity": quality.perplexity,
        "reference_perplexity": quality.reference_perplexity,
        "ppl_change_pct": 100 * (quality.perplexity / quality.reference_perplexity - 1),
        "kl": quality.kl,
        "agreement": quality.agreement,
        "eval_tokens": quality.tokens,
    }


def main(argv: list[str]) -> int:
    """``python -m compressor.report.worker JOB.json RESULT.json``."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    job = MeasureJob.from_json(Path(argv[0]).read_text())
    result = measure(job)
    Path(argv[1]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
