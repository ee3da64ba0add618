"""The ``compressor`` command line: parses arguments into job dataclasses and runs them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .arguments import named_path, rank
from .choices import ABSMAX_ROUNDINGS, COMPUTE_DTYPES, DEFAULT_TARGETS, EXPORT_ACTIVATIONS, MERGE_OUTPUTS, METHODS, OPTIMIZERS, TRAIN_INITS
from .errors import CompressorError, FieldError
from .gc_pause import paused_gc


def _job(cls, flags: dict[str, str] | None = None, **fields):
    """``cls(**fields)``, a field out of range reported as the flag that set it (``--`` + its name, unless ``flags`` says)."""
    try:
        return cls(**fields)
    except FieldError as e:
        raise CompressorError((flags or {}).get(e.field, "--" + e.field.replace("_", "-")), e.problem) from None
    except ValueError as e:
        raise CompressorError(None, str(e)) from None


_SEQ = {"seq_len": "--seq"}


def _quantize(args) -> int:
    # After each parallel torch op (the double quantization of the scales is one) OpenMP's idle
    # workers spin for a while by default. On two cores that takes a core from the threads that
    # read, hash and write: about 1 core-second of 8 on the 1B-parameter benchmark. The setting is
    # read when torch loads, which is why the parser imports nothing heavy. A value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with paused_gc():
        from .formats import config_for
        from .optimize import OptimizeConfig
        from .quantize import QuantizeJob, quantize_checkpoint

    try:
        cfg = config_for(
            args.method, args.blocksize, double_quant=not args.no_double_quant, per_tensor=args.per_tensor,
            absmax_rounding=args.absmax_rounding,
        )  # fmt: skip
    except ValueError as e:
        raise CompressorError(None, str(e)) from None
    optimize = _job(
        OptimizeConfig, method=args.optimize, calibration=Path(args.calibration) if args.calibration else None,
        calibration_tokens=args.calibration_tokens, budget_bits=args.budget_bits,
    )  # fmt: skip
    job = QuantizeJob(
        model_dir=Path(args.model_dir), out_dir=Path(args.out_dir), config=cfg, skip=tuple(args.skip),
        quantize_head=args.quantize_head, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
        progress=not args.quiet, optimize=optimize,
    )  # fmt: skip
    # The collector stays off for the whole run (see gc_pause.py): importing transformers and
    # planning the model allocate hundreds of thousands of long-lived objects, which collections
    # would walk again and again while the weights stream. A process-wide choice, so made here.
    with paused_gc():
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
    job = _job(
        EvalJob, _SEQ, model_dir=Path(args.model_dir), text=Path(args.text), windows=args.windows, seq_len=args.seq,
        reference_dir=Path(args.reference) if args.reference else None, progress=not args.quiet,
    )  # fmt: skip
    result = evaluate(job)
    print("\n".join(result.lines()))
    return 0


def _bench_tradeoffs(args) -> int:
    with paused_gc():
        from .report.tradeoffs import TradeoffJob, run_tradeoffs

    _quiet_transformers()
    job = _job(
        TradeoffJob, _SEQ, model_dir=Path(args.model_dir), text=Path(args.text), out_dir=Path(args.out), methods=tuple(args.methods) or None,
        quick=args.quick, windows=args.windows, seq_len=args.seq, new_tokens=args.new_tokens,
        keep_checkpoints=args.keep_checkpoints, progress=not args.quiet, calibration=Path(args.calibration) if args.calibration else None,
    )  # fmt: skip
    report = run_tradeoffs(job)
    print(report.markdown, end="")
    print(f"wrote {', '.join(report.files.values())}")
    if report.failed:
        print(f"compressor: error: rows failed: {', '.join(report.failed)}", file=sys.stderr)
        return 1
    return 0


def _train(args) -> int:
    with paused_gc():
        from .lora.train import TrainJob, train

    _quiet_transformers()
    job = _job(
        TrainJob, base_dir=Path(args.base_dir), data=Path(args.data), out_dir=Path(args.out), rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, targets=tuple(t for t in args.targets.split(",") if t), lr=args.lr,
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        eval_split=args.eval_split, eval_every=args.eval_every, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, keep_layers=args.keep_layers, overwrite=args.overwrite, progress=not args.quiet,
        init=args.init, float_dir=Path(args.float_dir) if args.float_dir else None,
        calibration=Path(args.calibration) if args.calibration else None, compute=args.compute, frozen_bf16=args.frozen_bf16,
        profile=args.profile,
    )  # fmt: skip
    summary = train(job)
    print(f"wrote {args.out}")
    print("\n".join(summary.lines()))
    if args.metrics_json:
        from .checkpoint.atomic import atomic_file

        with atomic_file(args.metrics_json) as tmp:
            tmp.write_text(json.dumps(summary.to_json(), indent=1) + "\n")
    return 0


def _merge(args) -> int:
    with paused_gc():
        from .lora.merge import MergeJob, merge

    _quiet_transformers()
    job = _job(
        MergeJob, _SEQ, base_dir=Path(args.base_dir), adapter_dir=Path(args.adapter_dir), out_dir=Path(args.out_dir), to=args.to,
        text=Path(args.text) if args.text else None, windows=args.windows, seq_len=args.seq, overwrite=args.overwrite,
        allow_pickle=args.allow_pickle, progress=not args.quiet,
    )  # fmt: skip
    summary = merge(job)
    print(f"wrote {args.out_dir}")
    print("\n".join(summary.lines()))
    return 0


def _export_onnx(args) -> int:
    with paused_gc():
        from .export.exporter import OnnxExportJob, export_onnx

    _quiet_transformers()
    job = OnnxExportJob(
        base_dir=Path(args.base_dir), out_dir=Path(args.out_dir), adapters=tuple(args.adapter),
        merge_adapter=Path(args.merge) if args.merge else None, activations=args.activations,
        lora_targets=tuple(t for t in args.lora_targets.split(",") if t), overwrite=args.overwrite, allow_pickle=args.allow_pickle,
    )  # fmt: skip
    summary = export_onnx(job)
    print(f"wrote {args.out_dir}")
    print("\n".join(summary.lines()))
    return 0


def _generate(args) -> int:
    # onnxruntime only: this path never imports torch.
    from .export.runtime import Sampling, generate_text

    sampling = _job(Sampling, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(generate_text(Path(args.model_dir), args.prompt, sampling, args.adapter, chat=args.chat))
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
    q.add_argument(
        "--absmax-rounding",
        choices=ABSMAX_ROUNDINGS,
        default="lut",
        help="nf4/fp4 double quantization: bitsandbytes' CPU lookup table (default, bit-identical) or exact nearest",
    )
    q.add_argument("--per-tensor", action="store_true", help="int8: one scale for the whole tensor instead of per row")
    q.add_argument("--skip", nargs="*", default=[], metavar="PATTERN", help="module names or patterns to keep in float")
    q.add_argument("--quantize-head", action="store_true", help="also quantize the output head (kept in float by default)")
    q.add_argument(
        "--optimize",
        choices=OPTIMIZERS,
        default="none",
        help="nf4/fp4: round to nearest (default, bitsandbytes' result), search each block's scale, or GPTQ codes (both need --calibration)",
    )
    q.add_argument("--calibration", metavar="FILE", help="text whose activations weigh the error (never the evaluation text)")
    q.add_argument("--calibration-tokens", type=int, default=32768, help="tokens of the calibration text to use (default 32768)")
    q.add_argument(
        "--budget-bits",
        type=float,
        metavar="B",
        help="keep the layers whose quantization hurts most (measured on the calibration text) unquantized, "
        "all linear layers averaging at most B bits per parameter",
    )
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

    r = sub.add_parser("train", help="train a LoRA adapter on a frozen (quantized or float) base")
    r.add_argument("base_dir")
    r.add_argument("--data", required=True, help='JSON lines: {"text"}, {"prompt", "completion"} or {"messages"}')
    r.add_argument("--out", required=True, help="adapter folder to write (PEFT's layout)")
    r.add_argument("--rank", type=rank, default="8", help="LoRA rank, or 'auto' from the model's size (default 8)")
    r.add_argument("--alpha", type=float, default=16.0)
    r.add_argument("--dropout", type=float, default=0.05)
    r.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated module names to adapt")
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    r.add_argument("--epochs", type=float, default=1.0)
    r.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step, over all processes")
    r.add_argument("--grad-accum", type=int, default=1)
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--eval-split", type=float, default=0.1, help="fraction held out for the held-out loss")
    r.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--gradient-checkpointing", action="store_true")
    r.add_argument("--keep-layers", type=int, default=0, metavar="N",
                   help="with --gradient-checkpointing, the last N layers keep their activations rather than recompute them (faster; more memory)")  # fmt: skip
    r.add_argument(
        "--init",
        choices=TRAIN_INITS,
        default="default",
        help="default: B = 0 (PEFT's); loftq: start from the base's quantization error (needs the float weights)",
    )
    r.add_argument("--float", dest="float_dir", metavar="DIR", help="loftq: the float checkpoint of the base (default: the one its manifest names)")
    r.add_argument("--calibration", metavar="FILE", help="loftq: text whose activations weigh the approximation (recommended)")
    r.add_argument("--compute", choices=COMPUTE_DTYPES, default="float32",
                   help="float32 (default), or bfloat16: the frozen base's products in bfloat16 on the CPU's bfloat16 units "
                   "(attention, the adapter, optimizer and loss stay float32; costs in the README)")  # fmt: skip
    r.add_argument("--frozen-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the frozen embedding (and head) in bfloat16 (default: with --compute bfloat16, and where "
                   "the checkpoint holds them in bfloat16, which then loses nothing; the head still multiplies in float32)")  # fmt: skip
    r.add_argument("--profile", action="store_true", help="print where the second step's time goes (forward, recomputation, backward, optimizer)")
    r.add_argument("--metrics-json", metavar="FILE", help="also write the run's figures (loss and seconds per step) as JSON")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(run=_train)

    m = sub.add_parser("merge", help="fold an adapter into its base: W + scaling * B @ A, re-quantized or float")
    m.add_argument("base_dir")
    m.add_argument("adapter_dir")
    m.add_argument("out_dir")
    m.add_argument("--to", choices=MERGE_OUTPUTS, default="same", help="same: re-quantize with the base's method (default); or a float dtype")
    m.add_argument("--text", help="score the merged model against base + adapter on this text")
    m.add_argument("--windows", type=int, default=4)
    m.add_argument("--seq", type=int, default=512)
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--allow-pickle", action="store_true", help="accept a pickled adapter_model.bin (only if you trust it)")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(run=_merge)

    x = sub.add_parser("export", help="export for other runtimes").add_subparsers(dest="export", required=True)
    o = x.add_parser("onnx", help="an onnxruntime folder whose weights stay packed, with run-time swappable adapters")
    o.add_argument("base_dir", help="a compressor output folder (nf4, fp4, int4, int8, int8-sym) or a float checkpoint")
    o.add_argument("out_dir")
    o.add_argument(
        "--adapter",
        action="append",
        type=named_path,
        default=[],
        metavar="NAME=DIR",
        help="write this PEFT adapter as adapters/NAME.onnx_adapter (repeatable)",
    )
    o.add_argument("--merge", metavar="ADAPTER_DIR", help="fold this adapter into the base and export one merged model")
    o.add_argument(
        "--activations",
        choices=EXPORT_ACTIVATIONS,
        default="fp32",
        help="int4/int8 layers: float32 activations (default, matches PyTorch) or int8 (faster, approximate)",
    )
    o.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS), help="comma-separated modules that take adapter inputs ('' for none)")
    o.add_argument("--overwrite", action="store_true")
    o.add_argument("--allow-pickle", action="store_true", help="accept a pickled adapter_model.bin (only if you trust it)")
    o.set_defaults(run=_export_onnx)

    n = sub.add_parser("generate", help="generate text with an exported ONNX folder (onnxruntime, no torch)")
    n.add_argument("model_dir", help="a folder written by 'compressor export onnx'")
    n.add_argument("--prompt", required=True)
    n.add_argument("--adapter", help="an adapter of the export, by name")
    n.add_argument("--chat", action="store_true", help="send the prompt as a user message through the model's chat template")
    n.add_argument("--max-new-tokens", type=int, default=64)
    n.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    n.add_argument("--top-p", type=float, default=1.0)
    n.add_argument("--seed", type=int)
    n.set_defaults(run=_generate)

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
    t.add_argument("--calibration", metavar="FILE", help="text for the --optimize rows (not the --text); without it they are left out")
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
