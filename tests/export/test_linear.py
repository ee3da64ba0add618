"""Each packed format becomes an onnxruntime node that computes x @ W.T + b with the weight our dequantize gives."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.export.graph import FLOAT, Graph
from compressor.export.linear import emit_linear
from compressor.formats import config_for, dequantize, format_for
from compressor.nn import QuantLinear


def run_layer(module: nn.Module, x: np.ndarray, accuracy_level: int = 0) -> np.ndarray:
    g = Graph("layer")
    g.input("x", FLOAT, ["rows", module.in_features])
    y = emit_linear(g, "x", module, "layer", accuracy_level)
    g.op("Identity", [y], outputs=["y"])
    g.output("y", FLOAT, ["rows", module.out_features])
    session = ort.InferenceSession(g.model("test").SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def packed_layer(method: str, w: torch.Tensor, bias: torch.Tensor | None = None, **options) -> QuantLinear:
    cfg = config_for(method, **options)
    packed, state = format_for(cfg).quantize(w, cfg)
    return QuantLinear(packed, state, bias)


@pytest.mark.parametrize(
    "method, options",
    [("nf4", {}), ("fp4", {}), ("nf4", {"double_quant": False}), ("int4", {}), ("int4", {"blocksize": 32}), ("int8", {}),
     ("int8", {"per_tensor": True}), ("int8-sym", {})],
)  # fmt: skip
@pytest.mark.parametrize("in_features", [128, 100])  # 100: a short last block (int4) and a padded row (int8)
def test_packed_layer_computes_with_the_weight_dequantize_gives(method, options, in_features):
    torch.manual_seed(0)
    w, bias = torch.randn(48, in_features), torch.randn(48)
    layer = packed_layer(method, w, bias, **options)
    x = torch.randn(5, in_features)
    expected = x @ dequantize(layer.packed, layer.state).T + bias
    got = run_layer(layer, x.numpy())
    assert np.abs(got - expected.numpy()).max() < 1e-4 * expected.abs().max().item()


def test_float_layer_is_a_plain_matmul():
    layer = nn.Linear(32, 16)
    x = torch.randn(3, 32)
    np.testing.assert_allclose(run_layer(layer, x.numpy()), layer(x).detach().numpy(), atol=1e-5)


def test_int8_activations_stay_close_to_float_ones():
    torch.manual_seed(0)
    layer = packed_layer("int4", torch.randn(64, 256))
    x = torch.randn(4, 256).numpy()
    exact, fast = run_layer(layer, x, 0), run_layer(layer, x, 4)
    assert not np.array_equal(exact, fast)
    assert np.abs(exact - fast).max() < 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("method", ["int3", "int2"])
def test_formats_without_an_onnxruntime_kernel_are_refused(method):
    layer = packed_layer(method, torch.randn(16, 64))
    with pytest.raises(CompressorError, match=f"layer: {method} has no onnxruntime kernel"):
        run_layer(layer, np.zeros((1, 64), np.float32))


def test_int8_zero_point_outside_the_signed_range_is_refused():
    layer = packed_layer("int8", 10 + torch.rand(16, 64))  # every row far above zero: zero point below -128
    with pytest.raises(CompressorError, match="zero point lies outside"):
        run_layer(layer, np.zeros((1, 64), np.float32))
