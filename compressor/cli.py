"""The ``compressor`` command line: parses arguments into job dataclasses and runs them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import CompressorError
from .gc_pause import paused_gc
from .methods import METHODS


def _quantize(args) -> int:
    # After each parallel torch op (the double quantization of the scales is one) OpenMP's idle
    # workers spin for a while by default. On two cores that takes a core from the threads that
    # read, hash and write: about 1 core-second of 8 on the 1B-parameter benchmark. The setting is
    # read when torch loads, which is why the parser imports nothing heavy. A value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with paused_gc():
        from .formats import config_for
        from .quantize import QuantizeJob, quantize_checkpoint

    try:
        cfg = config_for(
            args.method, args.blocksize, double_quant=not args.no_double_quant, per_tensor=args.per_tensor,
            absmax_rounding=args.absmax_rounding,
        )  # fmt: skip
    except ValueError as e:
        raise CompressorError(None, str(e)) from None
    job = QuantizeJob(
        model_dir=Path(args.model_dir), out_dir=Path(args.out_dir), config=cfg, skip=tuple(args.skip),
        quantize_head=args.quantize_head, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )  # fmt: skip
    summary = quantize_checkpoint(job)
    print(f"wrote {args.out_dir}")
    print("\n".join(summary.lines()))
    return 0


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _import_gguf(args) -> int:
    with paused_gc():
        from .gguf import ImportJob, import_gguf

    if args.quiet:
        _quiet_transformers()
    summary = import_gguf(ImportJob(gguf_file=Path(args.gguf_file), out_dir=Path(args.out_dir), overwrite=args.overwrite))
    print(f"wrote {args.out_dir}: {summary}")
    return 0


def _eval(args) -> int:
    with paused_gc():
        from .evaluate import EvalJob, evaluate

    if args.quiet:
        _quiet_transformers()
    job = EvalJob(
        model_dir=Path(args.model_dir), text=Path(args.text), windows=args.windows, seq_len=args.seq,
        reference_dir=Path(args.reference) if args.reference else None, progress=not args.quiet,
    )  # fmt: skip
    result = evaluate(job)
    print("\n".join(result.lines()))
    return 0


def _bench_tradeoffs(args) -> int:
    with paused_gc():
        from .report.tradeoffs import TradeoffJob, run_tradeoffs

    _quiet_transformers()
    job = TradeoffJob(
        model_dir=Path(args.model_dir), text=Path(args.text), out_dir=Path(args.out), methods=tuple(args.methods) or None,
        quick=args.quick, windows=args.windows, seq_len=args.seq, new_tokens=args.new_tokens,
        keep_checkpoints=args.keep_checkpoints, progress=not args.quiet,
    )  # fmt: skip
    report = run_tradeoffs(job)
    print(report.markdown, end="")
    print(f"wrote {', '.join(report.files.values())}")
    if report.failed:
        print(f"compressor: error: rows failed: {', '.join(report.failed)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="compressor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="compress a safetensors checkpoint")
    q.add_argument("model_dir")
    q.add_argument("out_dir")
    q.add_argument("--method", required=True, choices=METHODS)
    q.add_argument("--blocksize", type=int, help="block size of nf4/fp4/int4/int3/int2 (default 64)")
    q.add_argument("--no-double-quant", action="store_true", help="nf4/fp4: keep the per-block absmax in float32")
    q.add_argument("--absmax-rounding", choices=("lut", "nearest"), default="lut",
                   help="nf4/fp4 double quantization: bitsandbytes' CPU lookup table (default, bit-identical) or exact nearest")
    q.add_argument("--per-tensor", action="store_true", help="int8: one scale for the whole tensor instead of per row")
    q.add_argument("--skip", nargs="*", default=[], metavar="PATTERN", help="module names or patterns to keep in float")
    q.add_argument("--quantize-head", action="store_true", help="also quantize the output head (kept in float by default)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    q.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (only if you trust it)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(run=_quantize)

    g = sub.add_parser("import-gguf", help="dequantize a GGUF file to a float safetensors checkpoint")
    g.add_argument("gguf_file")
    g.add_argument("out_dir")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(run=_import_gguf)

    e = sub.add_parser("eval", help="perplexity (and KL / agreement against a reference) on a text file")
    e.add_argument("model_dir")
    e.add_argument("--text", required=True)
    e.add_argument("--windows", type=int, default=8, help="number of non-overlapping windows (default 8)")
    e.add_argument("--seq", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--reference", help="float checkpoint to compare against")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(run=_eval)

    b = sub.add_parser("bench", help="measurements").add_subparsers(dest="bench", required=True)
    t = b.add_parser("tradeoffs", help="memory against accuracy and speed of every method, side by side")
    t.add_argument("model_dir", help="float checkpoint")
    t.add_argument("--text", required=True, help="text for perplexity, KL and agreement")
    t.add_argument("--methods", nargs="*", default=[], help="only the rows of these methods (float32 is always measured)")
    t.add_argument("--out", default="tradeoffs", help="folder for report.md, report.json and report.png")
    t.add_argument("--quick", action="store_true", help="fewer rows and tokens (under 5 minutes for SmolLM2-135M)")
    t.add_argument("--windows", type=int, help="text windows (default 8, quick 4)")
    t.add_argument("--seq", type=int, help="tokens per window (default 512, quick 256)")
    t.add_argument("--new-tokens", type=int, help="tokens decoded for the speed figure (default 64, quick 32)")
    t.add_argument("--keep-checkpoints", action="store_true", help="keep the quantized folders in OUT/checkpoints")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(run=_bench_tradeoffs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    # bitsandbytes warns on import about an optional GPU-kernel package; on the command line that is
    # noise, and a library user keeps their own logging configuration.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        return args.run(args)
    except CompressorError as e:
        print(f"compressor: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compressor: interrupted; nothing was written", file=sys.stderr)
        return 130
