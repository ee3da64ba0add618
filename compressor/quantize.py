"""Compress a checkpoint offline: stream its shards, quantize the linear weights, write a loadable folder."""

from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import bnb_layout, manifest, native_layout
from .checkpoint.atomic import atomic_folder
from .checkpoint.readahead import ReadAhead
from .checkpoint.reader import INDEX, SINGLE, find_checkpoint, folder_bytes, open_shard
from .checkpoint.writer import ShardWriter
from .checks import float_folder
from .errors import CompressorError
from .formats import FORMATS, NonFiniteError, format_for, method_of, payload_nbytes
from .formats.common import FLOAT_DTYPES
from .optimize import OptimizeConfig

_READAHEAD_BYTES = 512 << 20
_WRITES_IN_FLIGHT = 2


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
    optimize: OptimizeConfig = OptimizeConfig()  # how scales and codes are chosen (nf4/fp4); default: round to nearest

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
    # Where the time went (seconds on the main thread), for whoever makes it faster next.
    seconds_quantizing: float = 0.0
    seconds_measuring_error: float = 0.0
    seconds_waiting_on_reads: float = 0.0
    seconds_waiting_on_writes: float = 0.0
    worst_tensor: str = ""
    worst_rms_error: float = 0.0
    params_kept: int = 0  # in layers a size budget kept in float
    kept_bytes: int = 0
    layers_kept: list[str] = field(default_factory=list)

    @property
    def bits_per_param(self) -> float:
        """Bits per parameter of the quantized layers (codes plus scales)."""
        return 8 * self.quantized_payload_bytes / max(self.params_quantized, 1)

    @property
    def linear_bits_per_param(self) -> float:
        """Bits per parameter over the quantized and the budget-kept layers: what ``--budget-bits`` bounds."""
        return 8 * (self.quantized_payload_bytes + self.kept_bytes) / max(self.params_quantized + self.params_kept, 1)

    def lines(self) -> list[str]:
        """Human-readable report."""
        mb = 1e6
        return [
            f"method                 {self.method}",
            f"parameters quantized   {self.params_quantized:,} of {self.params_total:,} in {self.tensors_quantized} tensors",
            f"bits/param (quantized) {self.bits_per_param:.3f}",
            *(
                [
                    f"kept in float         {len(self.layers_kept)} layers ({self.params_kept:,} parameters); all linear layers "
                    f"{self.linear_bits_per_param:.3f} bits/param: {', '.join(self.layers_kept[:6])}{' ...' if len(self.layers_kept) > 6 else ''}"
                ]
                if self.layers_kept
                else []
            ),
            f"size                   {self.bytes_before / mb:,.1f} MB -> {self.bytes_after / mb:,.1f} MB "
            f"({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller)",
            f"largest RMS error      {self.worst_rms_error:.3g} ({self.worst_tensor})",
            f"time                   {self.seconds:.1f} s (quantizing {self.seconds_quantizing:.1f}, measuring error "
            f"{self.seconds_measuring_error:.1f}, waiting on reads {self.seconds_waiting_on_reads:.1f} "
            f"and writes {self.seconds_waiting_on_writes:.1f})",
        ]


def _write(writer: ShardWriter, tensors: dict[str, torch.Tensor], reads: ReadAhead, source: torch.Tensor | None) -> None:
    for key, value in tensors.items():
        writer.add(key, value)
    if source is not None:  # a tensor copied through: its buffer is free once written
        reads.release(source)


def quantize_checkpoint(job: QuantizeJob) -> QuantizeSummary:
    """Run ``job``: write the quantized folder at ``job.out_dir`` and return its summary."""
    start = time.perf_counter()
    ckpt = find_checkpoint(job.model_dir, allow_pickle=job.allow_pickle)
    float_folder(ckpt.root, "quantize")
    names: dict[Path, list[str]] = {}
    for shard in ckpt.shards:
        with open_shard(shard) as reader:
            names[shard] = reader.keys()
    source_bytes = sum(p.stat().st_size for p in ckpt.shards)
    with atomic_folder(job.out_dir, job.overwrite) as tmp:
        # Reading and hashing start now, on another core, while transformers is imported to plan
        # the modules (see readahead.py); the import is local to this function for that reason.
        reads = ReadAhead(ckpt.shards, budget=min(_READAHEAD_BYTES, source_bytes // 8))
        try:
            from .checkpoint.model_info import load_config, meta_model, plan_linears

            plan = plan_linears(meta_model(load_config(ckpt.config_path)), job.skip, job.quantize_head)
            from .optimize.quantizer import prepare

            prepared = prepare(job.model_dir, job.config, job.optimize, plan.quantize)
            kept = frozenset(c.name for c in prepared.kept)
            run = _Run(job, plan.quantize - kept, prepared.quantize, kept)
            destinations = {s: tmp / (s.with_suffix(".safetensors").name if ckpt.sharded else SINGLE) for s in ckpt.shards}
            with tqdm(total=sum(map(len, names.values())), desc="quantize", unit="tensor", disable=not job.progress) as bar:
                run.all_shards(reads, destinations, names, bar)
        finally:
            reads.close()
        if run.summary.tensors_quantized == 0:
            raise CompressorError(job.model_dir, "no linear weight of the model matched a tensor in the checkpoint")
        summary = run.summary
        summary.bytes_before = source_bytes
        summary.bytes_after = folder_bytes(tmp)  # the shards are complete; what follows is not weights
        _write_config(ckpt.config_path, tmp, job.config, plan.skip + tuple(sorted(kept)))
        if ckpt.sharded:
            index = {"metadata": {"total_size": summary.bytes_after}, "weight_map": run.weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        manifest.copy_side_files(ckpt.root, tmp)
        summary.seconds = time.perf_counter() - start
        _write_manifest(tmp, job, ckpt, reads.hashes, summary, run.tensor_report, prepared)
    return summary


def _write_manifest(folder: Path, job: QuantizeJob, ckpt, hashes: dict[Path, str], summary: QuantizeSummary, tensors: dict, prepared) -> None:
    options = {k: type(v).__name__ if is_dataclass(v) else v for k, v in vars(job.config).items()}
    options |= {"skip": list(job.skip), "quantize_head": job.quantize_head,
                "optimize": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(job.optimize).items()}}  # fmt: skip
    budget = None
    if job.optimize.budget_bits is not None:
        # Which layers the budget kept in float, and why: each layer's measured damage and size.
        kept = {c.name for c in prepared.kept}
        budget = {"bits": job.optimize.budget_bits, "kept": sorted(kept),
                  "layers": [{**asdict(c), "kept": c.name in kept} for c in sorted(prepared.measured, key=lambda c: -c.kl)]}  # fmt: skip
    manifest.write(folder, summary.method, options, ckpt.root, {p.name: {"sha256": hashes[p], "bytes": p.stat().st_size} for p in ckpt.shards},
                   {**asdict(summary), "bits_per_param": summary.bits_per_param, "linear_bits_per_param": summary.linear_bits_per_param},
                   tensors, budget)  # fmt: skip


class _Run:
    # The state one run accumulates over its shards.
    def __init__(self, job: QuantizeJob, targets: frozenset[str], quantizer=None, kept: frozenset[str] = frozenset()):
        self.job = job
        self.targets = targets
        self.kept = kept
        self.format = format_for(job.config)
        self.quantizer = quantizer or (lambda name, tensor: self.format.quantize(tensor, job.config))
        self.layout = bnb_layout if isinstance(job.config, bnb_layout.CONFIGS) else native_layout
        self.summary = QuantizeSummary(method=method_of(job.config))
        self.tensor_report: dict[str, dict] = {}
        self.weight_map: dict[str, str] = {}

    def all_shards(self, reads: ReadAhead, destinations: dict[Path, Path], names: dict[Path, list[str]], bar: tqdm) -> None:
        # One writer per shard; writing earlier tensors' outputs overlaps quantizing this one.
        writers: dict[Path, ShardWriter] = {}
        header_entries: dict[Path, dict[str, dict]] = {}
        pending: deque = deque()
        with ThreadPoolExecutor(max_workers=1) as io:
            try:
                for src, name, tensor in self._timed(reads):
                    if src not in writers:
                        # Room for the output header: a weight becomes up to six entries.
                        reserve = 4096 + sum(8 * (len(n) + 120) for n in names[src])
                        writers[src], header_entries[src] = ShardWriter(destinations[src], header_reserve=reserve), {}
                    self.summary.params_total += tensor.numel()
                    if name.endswith(".weight") and name.removesuffix(".weight") in self.targets:
                        packed, state = self.quantize(src, name, tensor)
                        if self.layout is native_layout:
                            header_entries[src][name] = native_layout.header_entry(state)
                        outputs = self.layout.tensors_for(name, packed, state)
                        reads.release(tensor)
                        tensor = None
                    elif name.endswith(".weight") and name.removesuffix(".weight") in self.kept:
                        outputs = {name: self.keep(name, tensor)}
                        reads.release(tensor)
                        tensor = None
                    else:
                        outputs = {name: tensor}
                    if len(pending) >= _WRITES_IN_FLIGHT:
                        waited = time.perf_counter()
                        pending.popleft().result()
                        self.summary.seconds_waiting_on_writes += time.perf_counter() - waited
                    pending.append(io.submit(_write, writers[src], outputs, reads, tensor))
                    self.weight_map.update(dict.fromkeys(outputs, destinations[src].name))
                    bar.update()
                for write in pending:
                    write.result()
                for src, writer in writers.items():
                    metadata = {"format": "pt"}
                    if header_entries[src]:
                        metadata.update(native_layout.shard_metadata(header_entries[src]))
                    writer.finish(metadata)
            except BaseException:
                for write in pending:
                    write.exception()
                for writer in writers.values():
                    writer.abort()
                raise

    def _timed(self, reads: ReadAhead):
        # The reads, counting the time spent waiting for the next tensor.
        items = iter(reads)
        while True:
            waited = time.perf_counter()
            item = next(items, None)
            self.summary.seconds_waiting_on_reads += time.perf_counter() - waited
            if item is None:
                return
            yield item

    def keep(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # A layer the size budget keeps, as stored; a copy, since the read buffer is recycled.
        kept = tensor.clone()
        s = self.summary
        s.params_kept += kept.numel()
        s.kept_bytes += kept.nbytes
        s.layers_kept.append(name.removesuffix(".weight"))
        return kept

    def quantize(self, src: Path, name: str, tensor: torch.Tensor):
        if tensor.dtype not in FLOAT_DTYPES or tensor.dim() != 2:
            raise CompressorError(src, f"tensor {name!r}: cannot quantize {tensor.dtype} of shape {tuple(tensor.shape)}")
        try:
            started = time.perf_counter()
            packed, state = self.quantizer(name, tensor)
        except NonFiniteError:
            raise CompressorError(src, f"tensor {name!r} contains NaN or Inf") from None
        measured = time.perf_counter()
        max_err, rms_err = self.format.measure_error(tensor, packed, state)
        self.summary.seconds_quantizing += measured - started
        self.summary.seconds_measuring_error += time.perf_counter() - measured
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
