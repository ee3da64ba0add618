"""Adapters become the decoder's LoRA inputs: A transposed and scaling * B transposed, in onnxruntime's file format."""

import numpy as np
import onnxruntime as ort
import pytest

from compressor.errors import CompressorError
from compressor.export.adapters import adapter_arrays, write_adapter_file
from compressor.export.names import lora_names
from compressor.lora.adapters import read_adapter


def test_arrays_are_a_transposed_and_scaled_b_transposed(exported):
    adapter = read_adapter(exported["b"])
    modules = tuple(adapter.weights)
    arrays = adapter_arrays(adapter, modules)
    module = modules[0]
    a, b = adapter.weights[module]
    a_name, b_name = lora_names(module)
    np.testing.assert_array_equal(arrays[a_name], a.numpy().T)
    np.testing.assert_array_equal(arrays[b_name], (b * adapter.config.scaling).numpy().T)
    assert len(arrays) == 2 * len(modules)


def test_a_module_the_export_has_no_inputs_for_is_refused(exported):
    adapter = read_adapter(exported["a"])
    with pytest.raises(CompressorError, match="no LoRA inputs for model.layers"):
        adapter_arrays(adapter, ("model.layers.0.self_attn.q_proj",))


def test_the_file_reads_back_as_written(tmp_path):
    arrays = {"m.lora_A": np.random.rand(8, 2).astype(np.float32), "m.lora_B": np.random.rand(2, 4).astype(np.float32)}
    path = write_adapter_file(arrays, tmp_path / "x.onnx_adapter")
    back = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    assert sorted(back) == sorted(arrays)
    for name, value in back.items():
        np.testing.assert_array_equal(value.numpy(), arrays[name])
    assert [p.name for p in tmp_path.iterdir()] == ["x.onnx_adapter"]  # no temporary left behind
