"""``compressor export onnx`` writes a checked, packed, runnable folder, or nothing with a clear error."""

import json

import numpy as np
import onnx
import pytest
import torch

from compressor.checkpoint.reader import folder_bytes
from compressor.errors import CompressorError
from compressor.export.exporter import OnnxExportJob, export_onnx
from compressor.export.names import DATA, MODEL
from compressor.export.runtime import OnnxDecoder, Sampling
from compressor.formats import config_for
from compressor.loading import load
from compressor.lora.adapters import apply_adapter, read_adapter
from compressor.lora.merge import MergeJob, merge
from compressor.quantize import QuantizeJob, quantize_checkpoint
from tests.helpers import random_adapter, tiny_checkpoint, with_tokenizer

PROMPTS = [[5, 17, 42], [100, 3, 3, 250, 7, 1], [64]]


def greedy_torch(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_the_folder_holds_a_checked_graph_no_bigger_than_the_packed_checkpoint(exported):
    out = exported["onnx"]
    onnx.checker.check_model(str(out / MODEL), full_check=True)
    size = (out / MODEL).stat().st_size + (out / DATA).stat().st_size
    assert size <= 1.15 * folder_bytes(exported["nf4"])
    meta = json.loads((out / "export.json").read_text())
    assert meta["adapters"] == ["a", "b"] and meta["source_method"] == "bitsandbytes" and len(meta["lora_modules"]) == 14
    assert (out / "tokenizer.json").is_file() and (out / "adapters" / "a.onnx_adapter").is_file()
    graph = onnx.load(str(out / MODEL), load_external_data=False).graph
    assert sum(n.op_type == "MatMulBnb4" for n in graph.node) == 14  # every projection of both layers stays packed
    assert not [t.name for t in graph.initializer if t.name.endswith("proj.weight_t")]


@pytest.mark.parametrize("adapter", [None, "a", "b"])
def test_greedy_generation_is_token_identical_to_our_pytorch_path(exported, adapter):
    model = load(exported["nf4"], float32=True)
    if adapter:
        apply_adapter(model, read_adapter(exported[adapter]))
    decoder = OnnxDecoder(exported["onnx"])
    decoder.meta["eos_token_ids"] = []  # random weights: run the full length
    for prompt in PROMPTS:
        assert list(decoder.generate(prompt, Sampling(max_new_tokens=12), adapter)) == greedy_torch(model, prompt, 12)


def test_merge_exports_the_merged_model_without_adapter_inputs(exported, tmp_path):
    export_onnx(OnnxExportJob(exported["nf4"], tmp_path / "onnx", merge_adapter=exported["a"]))
    merge(MergeJob(exported["nf4"], exported["a"], tmp_path / "merged", progress=False))
    decoder = OnnxDecoder(tmp_path / "onnx")
    assert decoder.meta["lora_modules"] == []
    ids = list(range(3, 30))
    with torch.no_grad():
        expected = load(tmp_path / "merged", float32=True)(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(decoder.forward(ids, decoder.empty_cache())[0], expected, atol=1e-4)


def test_int4_and_int8_bases_export_and_match(tmp_path):
    base = with_tokenizer(tiny_checkpoint(tmp_path))
    ids = torch.arange(2, 22)[None]
    for method in ("int4", "int8"):
        quantize_checkpoint(QuantizeJob(base, tmp_path / method, config_for(method), progress=False))
        export_onnx(OnnxExportJob(tmp_path / method, tmp_path / f"{method}-onnx"))
        decoder = OnnxDecoder(tmp_path / f"{method}-onnx")
        with torch.no_grad():
            expected = load(tmp_path / method, float32=True)(ids).logits[0].numpy()
        np.testing.assert_allclose(decoder.forward(ids[0].numpy(), decoder.empty_cache())[0], expected, atol=1e-4)


def test_an_adapter_for_another_base_is_refused_and_nothing_is_written(exported, tmp_path):
    other = with_tokenizer(tiny_checkpoint(tmp_path / "other", arch="qwen2"))
    stranger = random_adapter(other, tmp_path / "stranger", rank=4)
    with pytest.raises(CompressorError, match="stranger"):
        export_onnx(OnnxExportJob(exported["nf4"], tmp_path / "out", adapters=(("s", stranger),)))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_format_without_a_kernel_fails_before_writing(tmp_path):
    base = with_tokenizer(tiny_checkpoint(tmp_path))
    quantize_checkpoint(QuantizeJob(base, tmp_path / "int3", config_for("int3"), progress=False))
    with pytest.raises(CompressorError, match="int3 has no onnxruntime kernel"):
        export_onnx(OnnxExportJob(tmp_path / "int3", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_kept_unless_overwrite(exported, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CompressorError, match="already exists"):
        export_onnx(OnnxExportJob(exported["nf4"], tmp_path / "out"))


@pytest.mark.parametrize("job, problem", [
    (dict(adapters=(("../x", "a"),)), "adapter name"),
    (dict(adapters=(("x", "a"),), merge_adapter="a"), "cannot take --adapter too"),
    (dict(activations="int2"), "activations must be"),
])  # fmt: skip
def test_bad_options_are_refused(exported, tmp_path, job, problem):
    for key in ("adapters", "merge_adapter"):
        if key in job:
            job[key] = exported["a"] if key == "merge_adapter" else tuple((n, exported[p]) for n, p in job[key])
    with pytest.raises(CompressorError, match=problem):
        export_onnx(OnnxExportJob(exported["nf4"], tmp_path / "out", **job))
