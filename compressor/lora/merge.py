"""``compressor merge``: fold a LoRA adapter into its base, W' = dequantize(W) + scaling * B @ A.

The merged weights are written as a float checkpoint first; by default that checkpoint is then
quantized again with the base's own method and options, so the result is as small as the base.
Re-quantizing rounds W' onto the format's grid, which loses some of what the adapter learned: the
summary says how much (the quantizer's per-tensor error against W', and, given a text, the merged
model's perplexity against the unmerged base + adapter). There is no way back.

Weights come from our own packed state, never from a loaded bitsandbytes layer: bitsandbytes'
CPU path repacks 4-bit weights in place at the first forward, after which they dequantize wrongly.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import manifest
from ..checkpoint.atomic import atomic_folder, scratch_folder
from ..checkpoint.reader import INDEX, find_checkpoint
from ..checkpoint.writer import ShardWriter
from ..checks import load_tokenizer, model_folder, output_free, window_fits
from ..choices import MERGE_OUTPUTS
from ..errors import CompressorError, at_least
from ..formats import dequantize
from ..loading import LAYOUTS, load, quant_method, read_shard
from ..quantize import QuantizeJob, QuantizeSummary, quantize_checkpoint
from ..text import text_windows
from .adapters import apply_adapter, read_adapter


@dataclass(frozen=True)
class MergeJob:
    """One ``compressor merge`` run: ``to`` is ``same`` (the base's format) or a float dtype."""

    base_dir: Path
    adapter_dir: Path
    out_dir: Path
    to: str = "same"
    text: Path | None = None
    windows: int = 4
    seq_len: int = 512
    overwrite: bool = False
    allow_pickle: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.to not in MERGE_OUTPUTS:
            raise CompressorError(None, f"--to must be one of {', '.join(MERGE_OUTPUTS)}, got {self.to!r}")
        at_least("windows", self.windows, 1)
        at_least("seq_len", self.seq_len, 2)  # a window of one token predicts nothing


@dataclass
class MergeSummary:
    """What a merge did and what it cost."""

    modules_merged: int
    written_as: str
    requantized: QuantizeSummary | None = None
    perplexity_merged: float | None = None
    perplexity_unmerged: float | None = None
    kl: float | None = None
    agreement: float | None = None

    def lines(self) -> list[str]:
        """Human-readable report."""
        out = [f"merged {self.modules_merged} modules, written as {self.written_as}"]
        if self.requantized:
            q = self.requantized
            out.append(f"re-quantization: largest RMS error {q.worst_rms_error:.3g} ({q.worst_tensor}), {q.bits_per_param:.3f} bits/param")
        if self.perplexity_merged is not None:
            change = 100 * (self.perplexity_merged / self.perplexity_unmerged - 1)
            out.append(f"perplexity: merged {self.perplexity_merged:.4f}, base + adapter {self.perplexity_unmerged:.4f} ({change:+.2f}%); "
                       f"KL {self.kl:.5f}, top-1 agreement {100 * self.agreement:.1f}%")  # fmt: skip
        return out


def merge(job: MergeJob) -> MergeSummary:
    """Run ``job``: write the merged model at ``job.out_dir``."""
    output_free(job.out_dir, job.overwrite)
    model_folder(job.base_dir, tokenizer=job.text is not None)
    adapter = read_adapter(job.adapter_dir, job.allow_pickle)
    method = quant_method(job.base_dir)
    # The text is read before anything is written: a merged folder is not left behind by a bad one.
    batches = None
    if job.text is not None:
        window_fits(job.base_dir, job.seq_len, "--seq")
        batches = text_windows(load_tokenizer(job.base_dir), job.text, job.windows, job.seq_len)
    # Checks fingerprint and shapes on a model built from the base, before anything is written.
    base_model = load(job.base_dir, float32=True)
    try:
        modules = apply_adapter(base_model, adapter, job.base_dir)
    except CompressorError as e:
        raise CompressorError(e.path or job.adapter_dir, e.problem) from None
    deltas = {f"{name}.weight": m.delta() for name, m in modules.items()}
    quantized = method != "float"
    requantize = job.to == "same" and quantized
    # How the base was quantized, read before anything is written: a folder without our manifest
    # (transformers + bitsandbytes wrote it) cannot be quantized the same way again.
    made_with = manifest.read(job.base_dir, "merge --to same") if requantize else None
    dtype = None if job.to == "same" else getattr(torch, job.to)
    with scratch_folder(job.out_dir) as tmp:
        merged_float = tmp / "merged"
        merged_float.mkdir()
        _write_merged_float(job.base_dir, merged_float, deltas, method, dtype)
        summary = MergeSummary(modules_merged=len(deltas), written_as=job.to if job.to != "same" else "float, as the base")
        if requantize:
            cfg, skip, quantize_head = manifest.quantize_options(made_with)
            summary.requantized = quantize_checkpoint(QuantizeJob(
                merged_float, job.out_dir, cfg, skip=skip, quantize_head=quantize_head, overwrite=job.overwrite, progress=job.progress,
            ))  # fmt: skip
            summary.written_as = made_with["method"]
        else:
            with atomic_folder(job.out_dir, job.overwrite) as out:
                for path in merged_float.iterdir():
                    shutil.move(str(path), out / path.name)
    if batches is not None:
        _score(job, summary, base_model, batches)
    return summary


def _write_merged_float(base_dir: Path, out: Path, deltas: dict[str, torch.Tensor], method: str, dtype: torch.dtype | None) -> None:
    # Shard by shard: every quantized weight dequantized (plus its delta), float tensors as they are.
    ckpt = find_checkpoint(base_dir)
    layout = LAYOUTS.get(method)  # None for a float base: no packed weights
    weight_map = {}
    for shard in ckpt.shards:
        tensors, weights = read_shard(shard, layout)
        layout_keys = set()
        merged: dict[str, torch.Tensor] = {}
        for name, (packed, state) in weights.items():
            layout_keys |= set(layout.tensors_for(name, packed, state))
            w = dequantize(packed, state).float()
            merged[name] = ((w + deltas[name]) if name in deltas else w).to(dtype or state.dtype)
        for name, t in tensors.items():
            if name in layout_keys:
                continue
            if name in deltas:
                t = t.float() + deltas[name]
            merged[name] = t.to(dtype or tensors[name].dtype) if t.is_floating_point() else t
        writer = ShardWriter(out / shard.with_suffix(".safetensors").name)
        for name in sorted(merged):
            writer.add(name, merged[name].contiguous())
        writer.finish({"format": "pt"})
        weight_map.update(dict.fromkeys(merged, shard.with_suffix(".safetensors").name))
    config = json.loads(ckpt.config_path.read_text())
    config.pop("quantization_config", None)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if ckpt.sharded:
        (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
    manifest.copy_side_files(base_dir, out)


def _score(job: MergeJob, summary: MergeSummary, base_plus_adapter, batches: torch.Tensor) -> None:
    from ..evaluate import evaluate_models

    result = evaluate_models(load(job.out_dir, float32=True).eval(), batches, base_plus_adapter.eval(), job.progress)
    summary.perplexity_merged, summary.perplexity_unmerged = result.perplexity, result.reference_perplexity
    summary.kl, summary.agreement = result.kl, result.agreement
