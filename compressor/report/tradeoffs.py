"""``compressor bench tradeoffs``: quantize one float checkpoint every way that matters and measure each side by side.

For every row (see :mod:`.rows`) the float checkpoint is quantized into ``OUT/checkpoints`` (our
rows), then a worker process (:mod:`.worker`) loads it, times greedy decoding, reads its peak
memory, and scores it against the float32 model on the same text windows. The report is written
as ``report.md``, ``report.json`` (every figure) and ``report.png`` (perplexity change against
bytes, Pareto frontier marked).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ..checkpoint.atomic import atomic_file
from ..checks import float_folder, load_tokenizer, model_folder, window_fits
from ..errors import CompressorError, at_least
from ..formats import config_for
from ..optimize import OptimizeConfig
from ..quantize import QuantizeJob, quantize_checkpoint
from ..text import text_windows
from .render import markdown_table, plot
from .rows import OURS, Row, select
from .worker import MeasureJob


@dataclass(frozen=True)
class TradeoffJob:
    """One trade-off report. ``None`` sizes take the full (8 x 512, 64 tokens) or quick (4 x 256, 32) defaults."""

    model_dir: Path
    text: Path
    out_dir: Path = Path("tradeoffs")
    methods: tuple[str, ...] | None = None
    quick: bool = False
    windows: int | None = None
    seq_len: int | None = None
    new_tokens: int | None = None
    keep_checkpoints: bool = False
    progress: bool = True
    calibration: Path | None = None  # text for the --optimize rows (never the evaluation text); without it they are left out

    def __post_init__(self):
        at_least("windows", self.windows, 1)
        at_least("seq_len", self.seq_len, 2)  # a window of one token predicts nothing
        at_least("new_tokens", self.new_tokens, 1)
        try:
            select(self.methods, self.quick, calibrated=self.calibration is not None)
        except ValueError as e:  # an unknown method
            raise CompressorError(None, str(e)) from None

    def sizes(self) -> tuple[int, int, int]:
        """(windows, tokens per window, new tokens to decode)."""
        defaults = (4, 256, 32) if self.quick else (8, 512, 64)
        return tuple(given or default for given, default in zip((self.windows, self.seq_len, self.new_tokens), defaults))


@dataclass
class TradeoffReport:
    """Every figure of a report, and where its files are."""

    rows: list[dict]
    settings: dict
    markdown: str
    files: dict[str, str]

    @property
    def failed(self) -> list[str]:
        """Names of the rows that could not be measured."""
        return [r["name"] for r in self.rows if "error" in r]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_tradeoffs(job: TradeoffJob) -> TradeoffReport:
    """Measure every selected row and write the report files into ``job.out_dir``."""
    start = time.perf_counter()
    # Clear errors now, before the output folder is made, rather than one per row later.
    model_folder(job.model_dir, tokenizer=False)
    float_folder(job.model_dir, "bench tradeoffs")
    if not job.text.is_file():
        raise CompressorError(job.text, "no such text file")
    rows = select(job.methods, job.quick, calibrated=job.calibration is not None)
    windows, seq_len, new_tokens = job.sizes()
    window_fits(job.model_dir, seq_len, "--seq")
    tokenizer = load_tokenizer(job.model_dir)
    text_windows(tokenizer, job.text, windows, seq_len)
    if job.calibration is not None:
        text_windows(tokenizer, job.calibration, 1, OptimizeConfig().seq_len)  # what the optimized rows read
    out = job.out_dir
    if out.exists() and not out.is_dir():
        raise CompressorError(out, "is a file, not a folder")
    for sub in ("checkpoints", "logs", "scratch"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    results = []
    with tqdm(rows, desc="trade-offs", unit="row", disable=not job.progress) as bar:
        for row in bar:
            bar.set_postfix_str(row.name)
            results.append(_measure_row(row, job, windows, seq_len, new_tokens))
    shutil.rmtree(out / "scratch", ignore_errors=True)
    if not job.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    settings = {
        "model_dir": str(job.model_dir), "text": str(job.text), "calibration": None if job.calibration is None else str(job.calibration),
        "windows": windows, "seq_len": seq_len,
        "new_tokens": new_tokens, "quick": job.quick, "seconds": time.perf_counter() - start,
        "machine": {"cpus": _cpus(), "platform": platform.platform(), "python": platform.python_version(),
                    "packages": _versions()},
    }  # fmt: skip
    return _write(out, results, settings)


def _measure_row(row: Row, job: TradeoffJob, windows: int, seq_len: int, new_tokens: int) -> dict:
    out, slug = job.out_dir, _slug(row.name)
    log = out / "logs" / f"{slug}.log"
    try:
        model_dir = job.model_dir
        if row.source == OURS:
            model_dir = out / "checkpoints" / slug
            cfg = config_for(row.method, row.blocksize, double_quant=row.double_quant, per_tensor=row.per_tensor)
            calibrated = row.optimize != "none" or row.budget_bits is not None
            optimize = OptimizeConfig(row.optimize, job.calibration, budget_bits=row.budget_bits) if calibrated else OptimizeConfig()
            quantize_checkpoint(QuantizeJob(job.model_dir, model_dir, cfg, overwrite=True, progress=False, optimize=optimize))
        measure = MeasureJob(
            row=row, model_dir=model_dir, reference_dir=job.model_dir, text=job.text, windows=windows,
            seq_len=seq_len, new_tokens=new_tokens,
        )  # fmt: skip
        spec, result = out / "scratch" / f"{slug}.job.json", out / "scratch" / f"{slug}.result.json"
        spec.write_text(measure.to_json())
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, "-m", "compressor.report.worker", str(spec), str(result)], stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
            return {**asdict(row), "error": f"{tail[0] if tail else 'exit status ' + str(done.returncode)} (see {log})"}
        return json.loads(result.read_text())
    except (CompressorError, ValueError) as e:  # a bad row is reported; the others still run
        return {**asdict(row), "error": str(e)}
    finally:
        if row.source == OURS and not job.keep_checkpoints:
            shutil.rmtree(out / "checkpoints" / slug, ignore_errors=True)


def _write(out: Path, rows: list[dict], settings: dict) -> TradeoffReport:
    table = markdown_table(rows)
    head = (
        f"Trade-offs of {Path(settings['model_dir']).name} on {Path(settings['text']).name}: "
        f"{settings['windows']} windows of {settings['seq_len']} tokens, decode speed over {settings['new_tokens']} "
        f"new tokens at batch 1, {settings['machine']['cpus']} CPUs.\n\n"
    )
    files = {"markdown": out / "report.md", "json": out / "report.json", "plot": out / "report.png"}
    with atomic_file(files["markdown"]) as tmp:
        tmp.write_text(head + table)
    with atomic_file(files["json"]) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    with atomic_file(files["plot"]) as tmp:
        plot(rows, tmp, f"{Path(settings['model_dir']).name}: perplexity change against size")
    return TradeoffReport(rows=rows, settings=settings, markdown=head + table, files={k: str(v) for k, v in files.items()})


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "bitsandbytes", "compressor"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
