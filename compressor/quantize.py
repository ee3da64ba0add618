"""Compress a checkpoint offline: stream its shards, quantize the linear weights, write a loadable folder."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .checkpoint import bnb_layout, native_layout
from .checkpoint.atomic import atomic_folder
from .checkpoint.hashing import ShardHash, sha256_file
from .checkpoint.model_info import load_config, meta_model, plan_linears
from .checkpoint.reader import INDEX, SINGLE, find_checkpoint, open_shard
from .checkpoint.writer import ShardWriter
from .errors import CompressorError
from .formats import FORMATS, NonFiniteError, format_for, payload_nbytes
from .formats.common import FLOAT_DTYPES

MANIFEST = "manifest.json"
# Files of a source folder that are weights or rewritten by us; everything else (tokenizer,
# generation config, chat template, licence) is copied as it is.
_NOT_COPIED = {"config.json", MANIFEST, INDEX, "pytorch_model.bin.index.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass(frozen=True)
class QuantizeJob:
    """One ``compressor quantize`` run."""

    model_dir: Path
    out_dir: Path
    config: object  # a format config, e.g. FourBitConfig()
    skip: tuple[str, ...] = ()
    quantize_head: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    progress: bool = True

    def __post_init__(self):
        if type(self.config) not in FORMATS:
            raise TypeError(f"no format registered for {type(self.config).__name__}")


@dataclass
class QuantizeSummary:
    """What a run did, for the final report and the manifest."""

    method: str
    tensors_quantized: int = 0
    params_quantized: int = 0
    params_total: int = 0
    quantized_payload_bytes: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    worst_tensor: str = ""
    worst_rms_error: float = 0.0

    @property
    def bits_per_param(self) -> float:
        """Bits per parameter of the quantized layers (codes plus scales)."""
        return 8 * self.quantized_payload_bytes / max(self.params_quantized, 1)

    def lines(self) -> list[str]:
        """Human-readable report."""
        mb = 1e6
        return [
            f"method                 {self.method}",
            f"parameters quantized   {self.params_quantized:,} of {self.params_total:,} in {self.tensors_quantized} tensors",
            f"bits/param (quantized) {self.bits_per_param:.3f}",
            f"size                   {self.bytes_before / mb:,.1f} MB -> {self.bytes_after / mb:,.1f} MB "
            f"({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller)",
            f"largest RMS error      {self.worst_rms_error:.3g} ({self.worst_tensor})",
            f"time                   {self.seconds:.1f} s",
        ]


def method_name(cfg) -> str:
    """The command-line name of a format config."""
    return getattr(cfg, "codebook", None) or {"Int8Config": "int8", "Int8SymConfig": "int8-sym", "Int4Config": "int4"}[type(cfg).__name__]


def _prefetched(reader, names: list[str], pool: ThreadPoolExecutor):
    # Yield (name, tensor) in order while the next tensor is being read on ``pool``.
    upcoming = pool.submit(reader.get, names[0]) if names else None
    for i, name in enumerate(names):
        tensor = upcoming.result()
        upcoming = pool.submit(reader.get, names[i + 1]) if i + 1 < len(names) else None
        yield name, tensor


def _add_all(writer: ShardWriter, tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        writer.add(key, value)


def quantize_checkpoint(job: QuantizeJob) -> QuantizeSummary:
    """Run ``job``: write the quantized folder at ``job.out_dir`` and return its summary."""
    start = time.perf_counter()
    ckpt = find_checkpoint(job.model_dir, allow_pickle=job.allow_pickle)
    plan = plan_linears(meta_model(load_config(ckpt.config_path)), job.skip, job.quantize_head)
    with ThreadPoolExecutor(max_workers=1) as hash_pool, atomic_folder(job.out_dir, job.overwrite) as tmp:
        run = _Run(job, plan.quantize, hash_pool)
        total = 0
        for shard in ckpt.shards:
            with open_shard(shard) as reader:
                total += len(reader.keys())
        with tqdm(total=total, desc="quantize", unit="tensor", disable=not job.progress) as bar:
            for shard in ckpt.shards:
                out_name = shard.with_suffix(".safetensors").name if ckpt.sharded else SINGLE
                run.shard(shard, tmp / out_name, bar)
        if run.summary.tensors_quantized == 0:
            raise CompressorError(job.model_dir, "no linear weight of the model matched a tensor in the checkpoint")

        _write_config(ckpt.config_path, tmp, job.config, plan.skip)
        if ckpt.sharded:
            index = {"metadata": {"total_size": sum(p.stat().st_size for p in tmp.glob("*.safetensors"))}, "weight_map": run.weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _copy_side_files(ckpt.root, tmp)
        summary = run.summary
        summary.bytes_before = sum(p.stat().st_size for p in ckpt.shards)
        summary.bytes_after = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        summary.seconds = time.perf_counter() - start
        options = {k: type(v).__name__ if is_dataclass(v) else v for k, v in vars(job.config).items()}
        manifest = {
            "manifest_version": 1,
            "compressor_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": summary.method,
            "options": {**options, "skip": list(job.skip), "quantize_head": job.quantize_head},
            "source": {"path": str(ckpt.root.resolve()),
                       "files": {p.name: {"sha256": run.hashes[p], "bytes": p.stat().st_size} for p in ckpt.shards}},
            "summary": {**asdict(summary), "bits_per_param": summary.bits_per_param},
            "tensors": run.tensor_report,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return summary


class _Run:
    # The state one run accumulates over its shards.
    def __init__(self, job: QuantizeJob, targets: frozenset[str], hash_pool: ThreadPoolExecutor):
        self.job = job
        self.hash_pool = hash_pool
        self.hashes: dict[Path, str] = {}
        self.targets = targets
        self.format = format_for(job.config)
        self.layout = bnb_layout if isinstance(job.config, bnb_layout.CONFIGS) else native_layout
        self.summary = QuantizeSummary(method=method_name(job.config))
        self.tensor_report: dict[str, dict] = {}
        self.weight_map: dict[str, str] = {}

    def shard(self, src: Path, dst: Path, bar: tqdm) -> None:
        header_entries: dict[str, dict] = {}
        with open_shard(src) as reader, ThreadPoolExecutor(max_workers=2) as io:
            names = reader.keys()
            # Room for the output header: a weight becomes up to six entries (and a metadata line).
            writer = ShardWriter(dst, header_reserve=4096 + sum(8 * (len(n) + 120) for n in names))
            # Reading the next tensor and writing the last one's outputs overlap the quantization of
            # this one (all three release the GIL); at most one read and one write are in flight.
            pending_write = None
            # The source's sha256 comes from the tensors as they stream past (see hashing.py).
            source_hash = ShardHash(src, self.hash_pool) if src.suffix == ".safetensors" else None
            try:
                for name, tensor in _prefetched(reader, names, io):
                    if source_hash is not None:
                        source_hash.feed(tensor)
                    self.summary.params_total += tensor.numel()
                    if name.endswith(".weight") and name.removesuffix(".weight") in self.targets:
                        packed, state = self.quantize(src, name, tensor)
                        if self.layout is native_layout:
                            header_entries[name] = native_layout.header_entry(state)
                        outputs = self.layout.tensors_for(name, packed, state)
                    else:
                        outputs = {name: tensor}
                    if pending_write is not None:
                        pending_write.result()
                    pending_write = io.submit(_add_all, writer, outputs)
                    self.weight_map.update(dict.fromkeys(outputs, dst.name))
                    bar.update()
                if pending_write is not None:
                    pending_write.result()
                metadata = {"format": "pt"}
                if header_entries:
                    metadata.update(native_layout.shard_metadata(header_entries))
                writer.finish(metadata)
                self.hashes[src] = source_hash.hexdigest() if source_hash is not None else sha256_file(src)
            except BaseException:
                if pending_write is not None:
                    pending_write.exception()
                writer.abort()
                raise

    def quantize(self, src: Path, name: str, tensor: torch.Tensor):
        if tensor.dtype not in FLOAT_DTYPES or tensor.dim() != 2:
            raise CompressorError(src, f"tensor {name!r}: cannot quantize {tensor.dtype} of shape {tuple(tensor.shape)}")
        try:
            packed, state = self.format.quantize(tensor, self.job.config)
        except NonFiniteError:
            raise CompressorError(src, f"tensor {name!r} contains NaN or Inf") from None
        max_err, rms_err = self.format.measure_error(tensor, packed, state)
        self.tensor_report[name] = {
            "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
            "max_abs_error": max_err, "rms_error": rms_err,
        }  # fmt: skip
        s = self.summary
        if rms_err >= s.worst_rms_error:
            s.worst_rms_error, s.worst_tensor = rms_err, name
        s.tensors_quantized += 1
        s.params_quantized += tensor.numel()
        s.quantized_payload_bytes += payload_nbytes(packed, state)
        return packed, state


def _write_config(src: Path, dst_dir: Path, cfg, skip: tuple[str, ...]) -> None:
    config = json.loads(src.read_text())
    if isinstance(cfg, bnb_layout.CONFIGS):
        # bitsandbytes computes in float32 unless told otherwise, as BitsAndBytesConfig() does.
        config["quantization_config"] = bnb_layout.quantization_config(cfg, list(skip), torch.float32)
    else:
        config["quantization_config"] = native_layout.quantization_config(cfg, list(skip))
    (dst_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED and not path.name.endswith(_WEIGHT_SUFFIXES) and not path.name.startswith("."):
            shutil.copy2(path, dst_dir / path.name)
