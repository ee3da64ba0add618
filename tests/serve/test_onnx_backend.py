import json
import shutil

import numpy as np
import pytest
import torch

import compressor
from compressor.errors import CompressorError
from compressor.export.adapters import adapter_arrays
from compressor.inference.kv_cache import CacheShape
from compressor.lora.adapters import base_fingerprint, read_adapter
from serve.onnx_backend import OnnxBackend


@pytest.fixture(scope="module")
def backend(onnx_base):
    return OnnxBackend(onnx_base)


def test_each_lora_input_has_the_shape_of_the_layer_it_adapts(backend, bases):
    layers = dict(compressor.load(bases["nf4"], float32=True).named_modules())
    assert len(backend.layers) == 2 * 7  # two blocks, every projection
    for name, inputs in backend.layers.items():
        assert (inputs.in_features, inputs.out_features) == (layers[name].in_features, layers[name].out_features)


def test_an_attached_adapter_is_held_exactly_as_adapter_arrays_lays_it_out(backend, bases):
    adapter = read_adapter(bases["adapters"] / "nf4-b")
    nbytes = sum(backend.layers[m].attach("k", a, b, adapter.config.scaling) for m, (a, b) in adapter.weights.items())
    try:
        held = {n: array for m in adapter.weights for n, array in backend.layers[m].adapters["k"].items()}
        expected = adapter_arrays(adapter, tuple(backend.layers))
        assert held.keys() == expected.keys()
        assert all(np.array_equal(held[n], expected[n]) and held[n].dtype == np.float32 for n in expected)
        assert nbytes == sum(a.nbytes for a in expected.values())
    finally:
        for m in adapter.weights:
            del backend.layers[m].adapters["k"]


def test_decoding_after_a_prompt_gives_the_logits_of_the_whole_sequence_at_once(backend):
    ids = [5, 17, 42, 8, 99, 3]
    whole = backend.prompt_forward(ids, None, backend.new_cache(len(ids)), logits_to_keep=0)
    cache = backend.new_cache(4)
    last = backend.prompt_forward(ids[:4], None, cache, logits_to_keep=1)
    steps = [backend.decode([t], [None], [cache])[0] for t in ids[4:]]
    assert whole.dtype == torch.float32 and last.shape == (1, whole.shape[1]) and cache.length == len(ids)
    torch.testing.assert_close(torch.stack([last[0], *steps]), whole[3:], rtol=0, atol=1e-4)


def test_the_backend_reads_its_limits_from_export_json(backend, onnx_base):
    meta = json.loads((onnx_base / "export.json").read_text())
    assert backend.kv_shape == CacheShape(2, 2, 16) and backend.context_length == 128
    assert backend.fingerprint == meta["base_fingerprint"] == base_fingerprint(meta["source"])
    assert backend.eos_ids == {*meta["eos_token_ids"], backend.tokenizer.eos_token_id}


def test_an_export_without_a_base_fingerprint_is_refused_naming_export_json(onnx_base, tmp_path):
    old = shutil.copytree(onnx_base, tmp_path / "old")
    meta = json.loads((old / "export.json").read_text())
    del meta["base_fingerprint"]
    (old / "export.json").write_text(json.dumps(meta))
    with pytest.raises(CompressorError, match="base_fingerprint") as refused:
        OnnxBackend(old)
    assert refused.value.path == str(old / "export.json")


def test_a_graph_onnxruntime_cannot_load_is_refused_in_one_line(onnx_base, tmp_path):
    broken = shutil.copytree(onnx_base, tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(CompressorError, match="onnxruntime cannot load model.onnx") as refused:
        OnnxBackend(broken)
    assert "\n" not in str(refused.value) and refused.value.path == str(broken)
