"""The ONNX export against our PyTorch path and stock transformers + bitsandbytes: agreement, decode speed, and why.

``python -m benchmarks.onnx --model ~/.cache/compressor/models/SmolLM2-135M-Instruct --work bench-results/onnx``

One run, side by side:
- agreement: logits of 512 tokens of licence text and greedy answers to chat prompts, exported
  (onnxruntime) against our PyTorch path on the same packed base, bare and with two adapters;
- decode speed at batch 1 (a token after a 32-token prompt, median over the run, the candidates
  interleaved over rounds): the exported NF4 and int4 models (float32 and int8 activations, with and
  without LoRA inputs) against transformers + bitsandbytes NF4 and transformers float32;
- each speed against its memory-bandwidth bound: the bytes of weights one token reads, over the
  bandwidth of a large memory copy measured in the same run;
- onnxruntime's per-operator profile of a decode step, for the NF4 and the fastest int4 export;
- the choice of operator for int4 weights: ``MatMulNBits`` against opset 21's blocked
  ``DequantizeLinear`` + ``MatMul`` (and float32 ``MatMul``) on single products.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.qlora import LICENSES, nf4_base, sentences, with_adapter

PROMPT_TOKENS, TEXT_TOKENS = 32, 512


def prepare(model_dir: Path, work: Path) -> dict:
    """Quantized bases, two rank-8 adapters on the NF4 one, and the exports; made once into ``work``."""
    from compressor.export.exporter import OnnxExportJob, export_onnx
    from compressor.formats import config_for
    from compressor.lora import LoraConfig
    from compressor.lora.adapters import random_adapter
    from compressor.quantize import QuantizeJob, quantize_checkpoint

    nf4 = nf4_base(model_dir, work)
    int4 = work / "int4"
    if not (int4 / "manifest.json").exists():
        quantize_checkpoint(QuantizeJob(model_dir, int4, config_for("int4"), overwrite=True, progress=False))
    adapters = {}
    for i, name in enumerate(("tenant-a", "tenant-b")):
        adapters[name] = work / "adapters" / name
        if not (adapters[name] / "adapter_model.safetensors").exists():
            random_adapter(nf4, adapters[name], LoraConfig(rank=8, alpha=16), seed=i, scale=0.05)
    exports = {
        "nf4": dict(base_dir=nf4, adapters=tuple(adapters.items())),
        "int4": dict(base_dir=int4),
        "int4-int8act": dict(base_dir=int4, activations="int8"),
        "int4-int8act-nolora": dict(base_dir=int4, activations="int8", lora_targets=()),
    }
    for name, options in exports.items():
        if not (work / "onnx" / name / "export.json").exists():
            export_onnx(OnnxExportJob(out_dir=work / "onnx" / name, overwrite=True, **options))
    return {"nf4": nf4, "int4": int4, "adapters": adapters, "onnx": {name: work / "onnx" / name for name in exports}}


def agreement(paths: dict, tokenizer) -> dict:
    """Max abs logit difference over 512 tokens and greedy token identity, onnxruntime against our PyTorch path."""
    import torch

    from compressor.export.runtime import OnnxDecoder, Sampling

    text = tokenizer((LICENSES / "GPL-3").read_text()).input_ids[2000 : 2000 + TEXT_TOKENS]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True, tokenize=True, return_dict=False)
               for s in sentences()[:6]]  # fmt: skip
    cases = [("nf4", None), ("nf4", "tenant-a"), ("nf4", "tenant-b"), ("int4", None), ("int4-int8act", None)]
    out = {}
    for export, adapter in cases:
        base = paths["nf4"] if export == "nf4" else paths["int4"]
        model = with_adapter(base, None if adapter is None else paths["adapters"][adapter])
        decoder = OnnxDecoder(paths["onnx"][export])
        with torch.no_grad():
            ref = model(torch.tensor([text])).logits[0].numpy()
        got, _ = decoder.forward(text, decoder.empty_cache(), adapter)
        identical = 0
        for p in prompts:
            with torch.no_grad():
                expected = model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0, len(p) :].tolist()
            answer = list(decoder.generate(p, Sampling(max_new_tokens=32), adapter))
            identical += answer == expected[: len(answer)]
        key = f"{export}/{adapter or 'base'}"
        out[key] = {"max_abs_logit_diff": float(np.abs(ref - got).max()), "mean_abs_logit": float(np.abs(ref).mean()),
                    "greedy_identical": f"{identical}/{len(prompts)}", "perplexity_torch": perplexity(ref, text),
                    "perplexity_onnx": perplexity(got, text)}  # fmt: skip
        print(f"  {key}: max abs logit diff {out[key]['max_abs_logit_diff']:.2e}, greedy identical {identical}/{len(prompts)}, "
              f"perplexity of the 512 tokens {out[key]['perplexity_torch']:.3f} (PyTorch) / {out[key]['perplexity_onnx']:.3f} (onnxruntime)",
              flush=True)  # fmt: skip
    return out


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean next-token cross-entropy of ``ids`` under ``logits`` (positions, vocab)."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


class OnnxRunner:
    """Batch-1 decoding of an exported folder."""

    def __init__(self, folder: Path):
        from compressor.export.runtime import OnnxDecoder

        self.decoder = OnnxDecoder(folder)

    def decode(self, prompt: list[int], tokens: int) -> list[float]:
        """Seconds of each decode step after ``prompt``."""
        logits, cache = self.decoder.forward(prompt, self.decoder.empty_cache())
        times = []
        for _ in range(tokens):
            token = int(np.argmax(logits[-1]))
            began = time.perf_counter()
            logits, cache = self.decoder.forward([token], cache)
            times.append(time.perf_counter() - began)
        return times


class TorchRunner:
    """Batch-1 decoding with transformers' own cache: stock bitsandbytes NF4, or float32."""

    def __init__(self, folder: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()

    def decode(self, prompt: list[int], tokens: int) -> list[float]:
        """Seconds of each decode step after ``prompt``."""
        import torch

        times = []
        with torch.inference_mode():
            out = self.model(torch.tensor([prompt]), use_cache=True)
            for _ in range(tokens):
                token = out.logits[:, -1:].argmax(-1)
                began = time.perf_counter()
                out = self.model(token, past_key_values=out.past_key_values, use_cache=True)
                times.append(time.perf_counter() - began)
        return times


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second moved by a large memory copy (each byte read once and written once, both counted)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * nbytes / best


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def weight_bytes_per_token_onnx(folder: Path) -> int:
    """Bytes of initializers a decode step reads: all of them, less the rotary tables (one row each) and, unless tied to the head, the embedding."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    tied = any(n.op_type == "Gemm" for n in graph.node)
    total = 0
    for t in graph.initializer:
        size = int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if t.name in ("cos_cache", "sin_cache") or (t.name == "model.embed_tokens.weight" and not tied):
            continue
        total += size
    return total


def weight_bytes_per_token_torch(folder: Path) -> int:
    """Bytes of a checkpoint's tensors a decode step reads: every tensor, counting a tied embedding once (it is the head)."""
    from compressor.checkpoint.reader import folder_bytes

    return folder_bytes(folder)


def profile(folder: Path, prompt: list[int], tokens: int) -> dict:
    """Share of a decode step's operator time by operator type, from onnxruntime's profiler."""
    import onnxruntime as ort

    from compressor.export.runtime import OnnxDecoder

    with tempfile.TemporaryDirectory() as tmp:
        decoder = OnnxDecoder(folder)
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.log_severity_level = 3
        decoder.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        logits, cache = decoder.forward(prompt, decoder.empty_cache())
        for _ in range(tokens):
            logits, cache = decoder.forward([int(np.argmax(logits[-1]))], cache)
        events = json.loads(Path(decoder.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][1:]  # the prompt's run is not a step
    first = runs[0]["ts"] if runs else 0
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    step_us = sum(r["dur"] for r in runs) / max(len(runs), 1)
    total = sum(by_op.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:6]
    return {
        "step_ms": step_us / 1e3,
        "operators_ms": {op: us / len(runs) / 1e3 for op, us in top},
        "operator_share": {op: us / total for op, us in top},
    }


def operator_choice(shapes=((576, 1536), (1536, 576), (4096, 4096)), repeats: int = 300) -> dict:
    """ms of one matrix-vector product ``(1, K) @ (K, N)`` for each way of holding an int4 weight (block 64) in a graph."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def session(nodes, initializers, k, n):
        graph = helper.make_graph(nodes, "product", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], initializer=initializers)  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def ms(s, k):
        x = np.random.randn(1, k).astype(np.float32)
        for _ in range(20):
            s.run(None, {"x": x})
        return min(_timed(lambda: s.run(None, {"x": x})) for _ in range(repeats)) * 1e3

    out = {}
    rng = np.random.default_rng(0)
    for k, n in shapes:
        blocks = k // 64
        q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
        packed = (q[:, 0::2] | q[:, 1::2] << 4).reshape(n, blocks, 32)
        scales = rng.random((n, blocks), dtype=np.float32)
        zero_points = np.full((n, (blocks + 1) // 2), 0x88, np.uint8)
        row = {}
        for level in (0, 4):
            node = helper.make_node(
                "MatMulNBits", ["x", "B", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=64, accuracy_level=level
            )
            inits = [
                numpy_helper.from_array(packed, "B"),
                numpy_helper.from_array(scales.reshape(-1), "s"),
                numpy_helper.from_array(zero_points.reshape(-1), "z"),
            ]
            row[f"MatMulNBits accuracy_level {level}"] = ms(session([node], inits, k, n), k)
        dq = [helper.make_node("DequantizeLinear", ["Wq", "sc", "zp"], ["W"], axis=0, block_size=64), helper.make_node("MatMul", ["x", "W"], ["y"])]
        inits = [helper.make_tensor("Wq", TensorProto.UINT4, [k, n], q.T.reshape(-1).tolist()), numpy_helper.from_array(np.ascontiguousarray(scales.T), "sc"),
                 helper.make_tensor("zp", TensorProto.UINT4, [blocks, n], [8] * (blocks * n))]  # fmt: skip
        row["DequantizeLinear (blocked) + MatMul"] = ms(session(dq, inits, k, n), k)
        w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "W")
        row["float32 MatMul"] = ms(session([helper.make_node("MatMul", ["x", "W"], ["y"])], [w], k, n), k)
        out[f"{k}x{n}"] = row
    return out


def speed(paths: dict, model_dir: Path, prompt: list[int], tokens: int, rounds: int) -> dict:
    """Median ms a token for every candidate, interleaved over ``rounds``, each against its bandwidth bound."""
    candidates = {f"onnx {name}": (OnnxRunner, folder) for name, folder in paths["onnx"].items()}
    candidates["transformers + bitsandbytes nf4"] = (TorchRunner, paths["nf4"])
    candidates["transformers float32"] = (TorchRunner, model_dir)
    runners = {name: make(folder) for name, (make, folder) in candidates.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name] += runner.decode(prompt, tokens)
    bandwidth = copy_bandwidth()
    out = {"copy_bandwidth_gb_s": bandwidth / 1e9}
    for name, (_, folder) in candidates.items():
        nbytes = weight_bytes_per_token_onnx(folder) if name.startswith("onnx") else weight_bytes_per_token_torch(folder)
        ms = statistics.median(times[name]) * 1e3
        out[name] = {"ms_per_token": ms, "weight_mb_per_token": nbytes / 1e6, "bound_ms": nbytes / bandwidth * 1e3}
    return derive(out)


def derive(speed: dict) -> dict:
    """Add each row's tokens/s, speed against bitsandbytes nf4 and share of its bandwidth bound (the table's columns) to ``speed``."""
    bnb = speed["transformers + bitsandbytes nf4"]["ms_per_token"]
    for name, row in speed.items():
        if name != "copy_bandwidth_gb_s":
            ms = row["ms_per_token"]
            row.update(tokens_per_s=1e3 / ms, vs_bitsandbytes_nf4=bnb / ms, of_bound=row["bound_ms"] / ms)
    return speed


def report(results: dict) -> str:
    """The speed table in markdown."""
    s = results["speed"]
    lines = [f"copy bandwidth {s['copy_bandwidth_gb_s']:.1f} GB/s", "",
             "| batch 1, SmolLM2-135M | ms/token | tokens/s | vs bitsandbytes nf4 | weights read/token | bandwidth bound | of bound |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in s.items():
        if name == "copy_bandwidth_gb_s":
            continue
        lines.append(
            f"| {name} | {row['ms_per_token']:.2f} | {row['tokens_per_s']:.1f} | {row['vs_bitsandbytes_nf4']:.2f}x | {row['weight_mb_per_token']:.0f} MB"
            f" | {row['bound_ms']:.2f} ms | {row['of_bound']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every measurement, print the tables, write ``WORK/onnx.json``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="float checkpoint (SmolLM2-135M-Instruct)")
    parser.add_argument("--work", type=Path, default=Path("bench-results/onnx"))
    parser.add_argument("--tokens", type=int, default=48, help="decode steps per candidate and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=("agreement", "profile"))
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    paths = prepare(args.model, args.work)
    tokenizer = AutoTokenizer.from_pretrained(paths["nf4"])
    prompt = tokenizer((LICENSES / "GPL-3").read_text()).input_ids[:PROMPT_TOKENS]
    results = {}
    if "agreement" not in args.skip:
        print("agreement, onnxruntime against our PyTorch path:", flush=True)
        results["agreement"] = agreement(paths, tokenizer)
    results["speed"] = speed(paths, args.model, prompt, args.tokens, args.rounds)
    print(report(results), flush=True)
    if "profile" not in args.skip:
        results["profile"] = {name: profile(paths["onnx"][name], prompt, 16) for name in ("nf4", "int4-int8act")}
        for name, p in results["profile"].items():
            ops = ", ".join(f"{op} {ms:.2f} ms ({p['operator_share'][op]:.0%})" for op, ms in p["operators_ms"].items())
            print(f"profile onnx {name}: step {p['step_ms']:.2f} ms; {ops}")
    results["operator_choice"] = operator_choice()
    for shape, row in results["operator_choice"].items():
        print(f"int4 weight {shape}, one row: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in row.items()))
    (args.work / "onnx.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.work / 'onnx.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
