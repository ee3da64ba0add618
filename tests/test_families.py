"""Every decoder family through every path: quantize, load, train, merge, serve (the matrix of the README's family table)."""

import json

import bitsandbytes as bnb
import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

import compressor
from compressor.cli import main
from compressor.export.exporter import OnnxExportJob, export_onnx
from compressor.export.runtime import OnnxDecoder, Sampling
from compressor.formats import config_for
from compressor.lora import DEFAULT_TARGETS
from compressor.lora.adapters import apply_adapter, read_adapter
from compressor.lora.merge import MergeJob, merge
from compressor.lora.train import TrainJob, train
from compressor.nn import QuantLinear
from compressor.quantize import QuantizeJob, quantize_checkpoint
from serve.engine import Engine
from serve.types import EngineConfig, SamplingParams
from tests.helpers import ANSWER_FORMAT, FAMILIES, command_line, random_adapter, tiny_checkpoint, with_tokenizer
from tests.serve.test_engine import generate

IDS = torch.tensor([[5, 17, 42, 8, 9, 10, 61, 7, 2, 30, 11, 12]])  # longer than the test families' windows of 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_quantizes_into_bitsandbytes_files_that_load_as_its_dequantized_model(family, tmp_path):
    src = with_tokenizer(tiny_checkpoint(tmp_path, family))
    for method in ("nf4", "int4"):  # the packed model is the float model with its weights dequantized
        quantize_checkpoint(QuantizeJob(src, tmp_path / method, config_for(method), progress=False))
        packed = compressor.load(tmp_path / method, native_generate=False)
        reference = AutoModelForCausalLM.from_pretrained(src).eval()
        with torch.no_grad():
            for name, module in packed.named_modules():
                if isinstance(module, QuantLinear):
                    reference.get_submodule(name).weight.copy_(module.weight_dequantized())
            torch.testing.assert_close(packed(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-4)
    # Our nf4 files are bitsandbytes' files: stock transformers loads them into the very same weights.
    stock = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "nf4").named_modules())
    ours = [(name, m) for name, m in compressor.load(tmp_path / "nf4", native_generate=False).named_modules() if isinstance(m, QuantLinear)]
    assert ours and all(type(stock[name]).__name__ == "Linear4bit" for name, _ in ours)
    for name, module in ours:
        weight = stock[name].weight
        assert torch.equal(bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float(), module.weight_dequantized().float())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_trains_merges_and_serves_its_adapter_as_transformers_computes_it(family, tmp_path):
    src = with_tokenizer(tiny_checkpoint(tmp_path, family))
    quantize_checkpoint(QuantizeJob(src, tmp_path / "nf4", config_for("nf4"), progress=False))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ANSWER_FORMAT) + "\n")
    summary = train(TrainJob(tmp_path / "nf4", tmp_path / "data.jsonl", tmp_path / "adapter", rank=4, alpha=8, dropout=0.0, lr=1e-2,
                             steps=12, batch_size=4, seq_len=32, eval_split=0.2, eval_every=6, progress=False))  # fmt: skip
    assert summary.train_losses[-1] < summary.train_losses[0]

    adapted = compressor.load(tmp_path / "nf4", float32=True, native_generate=False)
    apply_adapter(adapted, read_adapter(tmp_path / "adapter"), tmp_path / "nf4")
    float_adapted = compressor.load(src, float32=True, native_generate=False)
    apply_adapter(float_adapted, read_adapter(tmp_path / "adapter"))
    merge(MergeJob(src, tmp_path / "adapter", tmp_path / "merged", progress=False))
    with torch.no_grad():  # merged into the float base: what the float base plus the adapter computes
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(IDS).logits
        torch.testing.assert_close(merged, float_adapted.eval()(IDS).logits, rtol=0, atol=1e-4)

    # Prompts in chunks of 3: a sliding layer's cache is a ring of its window (4) and 3, wrapped many times over.
    engine = Engine(EngineConfig(tmp_path / "nf4", max_batch=4, adapter_root=tmp_path, prefill_chunk=3))
    engine.load_adapter("a", tmp_path / "adapter")
    engine.start()
    try:  # alone and in a batch with the base: the same tokens as transformers' generate on base + adapter
        ids = IDS[0].tolist()
        served = [r["text"] for r in generate(engine, [(ids, "a"), (ids, None), (ids, "a")], SamplingParams(max_tokens=8))]
        eos = sorted(engine.eos_ids)
    finally:
        engine.stop()
    with torch.no_grad():
        new = adapted.generate(IDS, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)[0, len(ids) :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]  # the engine sends no eos text
    assert served[0] == served[2] == engine.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_exports_to_onnx_and_generates_its_own_greedy_tokens_with_and_without_its_adapter(family, tmp_path):
    src = with_tokenizer(tiny_checkpoint(tmp_path, family))
    quantize_checkpoint(QuantizeJob(src, tmp_path / "nf4", config_for("nf4"), progress=False))
    targets = (*DEFAULT_TARGETS, "qkv_proj", "gate_up_proj") if family == "phi3" else DEFAULT_TARGETS  # Phi-3's fused projections
    random_adapter(tmp_path / "nf4", tmp_path / "a", targets=targets, seed=1)
    export_onnx(OnnxExportJob(base_dir=tmp_path / "nf4", out_dir=tmp_path / "onnx", adapters=(("a", tmp_path / "a"),), lora_targets=targets))
    decoder = OnnxDecoder(tmp_path / "onnx")
    decoder.meta["eos_token_ids"] = []  # random weights: run the full length
    model = compressor.load(tmp_path / "nf4", float32=True, native_generate=False)
    for adapter in (None, "a"):
        if adapter:
            apply_adapter(model, read_adapter(tmp_path / "a"))
        with torch.no_grad():
            expected = model.generate(IDS, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, IDS.shape[1] :].tolist()
        assert list(decoder.generate(IDS[0].tolist(), Sampling(max_new_tokens=8), adapter)) == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_goes_through_the_command_line_end_to_end(family, tmp_path):
    src = with_tokenizer(tiny_checkpoint(tmp_path, family))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ANSWER_FORMAT) + "\n")
    nf4, adapter, merged, onnx = (str(tmp_path / n) for n in ("nf4", "adapter", "merged", "onnx"))
    assert main(["quantize", str(src), nf4, "--method", "nf4", "--quiet"]) == 0
    assert main(["train", nf4, "--data", str(tmp_path / "data.jsonl"), "--out", adapter, "--rank", "4", "--steps", "4", "--batch-size", "4",
                 "--seq-len", "32", "--quiet"]) == 0  # fmt: skip
    assert main(["merge", nf4, adapter, merged, "--quiet"]) == 0
    assert main(["export", "onnx", nf4, onnx, "--adapter", f"a={adapter}"]) == 0
    assert main(["generate", onnx, "--prompt", "word3 word4", "--adapter", "a", "--max-new-tokens", "4"]) == 0
    with command_line(["--base", nf4, "--adapter", f"a={adapter}", "--max-batch", "2"]) as url:  # python -m serve, over HTTP
        chat = {"model": "a", "messages": [{"role": "user", "content": "word3 word4"}], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4, answer.text


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_serves_the_same_text_from_its_onnx_export_as_from_torch(family, tmp_path):
    src = with_tokenizer(tiny_checkpoint(tmp_path, family))
    quantize_checkpoint(QuantizeJob(src, tmp_path / "nf4", config_for("nf4"), progress=False))
    random_adapter(tmp_path / "nf4", tmp_path / "adapters" / "a", seed=1)
    export_onnx(OnnxExportJob(base_dir=tmp_path / "nf4", out_dir=tmp_path / "onnx"))
    texts = []
    for backend, folder in (("torch", tmp_path / "nf4"), ("onnx", tmp_path / "onnx")):
        engine = Engine(EngineConfig(folder, backend=backend, max_batch=4, adapter_root=tmp_path / "adapters"))
        engine.start()
        try:
            engine.load_adapter("a", tmp_path / "adapters" / "a")
            ids = IDS[0].tolist()
            texts.append([r["text"] for r in generate(engine, [(ids, "a"), (ids, None)], SamplingParams(max_tokens=8))])
        finally:
            engine.stop()
    assert texts[0] == texts[1] and any(texts[0])  # the same words, and some words
