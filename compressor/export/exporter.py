"""``compressor export onnx``: write a compressed model (and its tenants' adapters) as an onnxruntime folder.

The folder holds ``model.onnx`` with its weights in ``model.onnx.data``, the tokenizer files,
``export.json`` (what :mod:`.runtime` needs to drive the graph) and ``adapters/<name>.onnx_adapter``.
It is written beside its final place and renamed into it, so it is there whole or not at all.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from ..checkpoint import manifest
from ..checkpoint.atomic import atomic_folder, scratch_folder
from ..checkpoint.reader import folder_bytes
from ..checks import model_folder, output_free
from ..choices import DEFAULT_TARGETS, EXPORT_ACTIVATIONS
from ..errors import CompressorError
from ..loading import load, quant_method
from ..lora.adapters import NAME, NAME_RULE, base_fingerprint, check_fits, read_adapter
from ..lora.merge import MergeJob, merge
from .adapters import adapter_arrays, write_adapter_file
from .decoder import build_decoder
from .names import ADAPTERS, DATA, META, MODEL, SUFFIX

ACCURACY_LEVELS = dict(zip(EXPORT_ACTIVATIONS, (0, 4)))  # MatMulNBits' accuracy_level of each


@dataclass(frozen=True)
class OnnxExportJob:
    """One ``compressor export onnx`` run."""

    base_dir: Path
    out_dir: Path
    adapters: tuple[tuple[str, Path], ...] = ()  # (name, PEFT adapter folder)
    merge_adapter: Path | None = None  # fold this adapter into the base and export the one merged model
    activations: str = "fp32"  # one of EXPORT_ACTIVATIONS
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS  # modules that take adapter inputs; () for none
    overwrite: bool = False
    allow_pickle: bool = False

    def __post_init__(self):
        if self.activations not in EXPORT_ACTIVATIONS:
            raise CompressorError(None, f"activations must be one of {', '.join(EXPORT_ACTIVATIONS)}, got {self.activations!r}")
        if self.merge_adapter is not None and self.adapters:
            raise CompressorError(None, "--merge exports one merged model without adapter inputs; it cannot take --adapter too")
        for name, _ in self.adapters:
            if not NAME.fullmatch(name):
                raise CompressorError(None, f"adapter name {name!r}: {NAME_RULE}")


@dataclass
class ExportSummary:
    """What was written and how big it is against the checkpoint it came from."""

    onnx_bytes: int
    checkpoint_bytes: int
    lora_modules: int
    adapters: list[str]

    def lines(self) -> list[str]:
        """Human-readable report."""
        ratio = self.onnx_bytes / self.checkpoint_bytes
        return [
            f"graph + weights: {self.onnx_bytes / 2**20:.1f} MiB, {ratio:.3f}x the checkpoint's safetensors ({self.checkpoint_bytes / 2**20:.1f} MiB)",
            f"LoRA inputs on {self.lora_modules} modules; adapters: {', '.join(self.adapters) or 'none'}",
        ]


def export_onnx(job: OnnxExportJob) -> ExportSummary:
    """Run ``job``; raises CompressorError (writing nothing) on a model, format or adapter it cannot export faithfully."""
    # Inputs are read (and refused) before the slow part.
    output_free(job.out_dir, job.overwrite)
    model_folder(job.base_dir)
    if not (job.base_dir / "tokenizer.json").is_file():
        raise CompressorError(job.base_dir / "tokenizer.json", "missing file: 'compressor generate' reads the exported tokenizer from it")
    adapters = [(name, path, read_adapter(path, job.allow_pickle)) for name, path in job.adapters]
    if job.merge_adapter is not None:
        read_adapter(job.merge_adapter, job.allow_pickle)
    with atomic_folder(job.out_dir, job.overwrite) as out, scratch_folder(job.out_dir) as scratch:
        base = job.base_dir
        if job.merge_adapter is not None:
            base = scratch / "merged"
            merge(MergeJob(base_dir=job.base_dir, adapter_dir=job.merge_adapter, out_dir=base, allow_pickle=job.allow_pickle, progress=False))
        model = load(base, float32=True)
        fingerprint = base_fingerprint(job.base_dir)
        layers = dict(model.named_modules())
        for name, path, adapter in adapters:
            try:
                check_fits(layers, adapter, fingerprint)
            except CompressorError as e:
                raise CompressorError(path, e.problem) from None
        _targets_exist(model, job.lora_targets)
        try:
            proto, spec = build_decoder(model, () if job.merge_adapter else job.lora_targets, ACCURACY_LEVELS[job.activations])
        except CompressorError as e:
            raise CompressorError(e.path or job.base_dir, e.problem) from None
        onnx.save_model(proto, out / MODEL, save_as_external_data=True, all_tensors_to_one_file=True, location=DATA)
        del proto
        (out / DATA).chmod(0o644)  # onnx writes it private; the folder is meant to be shared like any checkpoint
        onnx.checker.check_model(str(out / MODEL), full_check=True)
        for name, path, adapter in adapters:
            try:
                arrays = adapter_arrays(adapter, spec.lora_modules)
            except CompressorError as e:
                raise CompressorError(path, e.problem) from None
            write_adapter_file(arrays, out / ADAPTERS / f"{name}{SUFFIX}")
        manifest.copy_side_files(job.base_dir, out)
        (out / "config.json").write_text((job.base_dir / "config.json").read_text())
        meta = {
            **asdict(spec), "source": str(job.base_dir), "source_method": quant_method(job.base_dir),
            "merged_adapter": None if job.merge_adapter is None else str(job.merge_adapter), "activations": job.activations,
            "base_fingerprint": fingerprint, "eos_token_ids": _eos_ids(model), "adapters": [name for name, _, _ in adapters], "onnxruntime": ort.__version__,
        }  # fmt: skip
        (out / META).write_text(json.dumps(meta, indent=2) + "\n")
        onnx_bytes = (out / MODEL).stat().st_size + (out / DATA).stat().st_size
    return ExportSummary(onnx_bytes, folder_bytes(job.base_dir), len(spec.lora_modules), [name for name, _, _ in adapters])


def _targets_exist(model, targets: tuple[str, ...]) -> None:
    # A misspelt target would otherwise export a model without the adapter inputs it was asked for.
    # The default names are every family's: a family with fused projections (Phi-3's qkv_proj) lacks some.
    names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in names and t not in DEFAULT_TARGETS]
    if unknown or (targets and not names & set(targets)):
        raise CompressorError("--lora-targets", f"no module named {', '.join(unknown or targets)} in the model")


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
