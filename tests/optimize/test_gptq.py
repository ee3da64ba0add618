"""GPTQ codes cut a layer's output error on the inputs it was calibrated for, in the unchanged format."""

import pytest
import torch

from compressor.formats import config_for
from compressor.formats.nf4 import dequantize, quantize
from compressor.optimize.gptq import quantize_gptq


def correlated_inputs(n: int, width: int, sample: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)  # one distribution; ``sample`` draws other rows from it
    mixing = torch.randn(width, width, generator=g) / width**0.5
    scale = torch.rand(width, generator=g) ** 3 * 4  # a few large channels, as in real activations
    rows = torch.randn(n, width, generator=torch.Generator().manual_seed(1000 + sample))
    return (rows @ mixing) * scale


def output_error(w, q, x):
    return float((x @ (w - q).T).square().mean())


@pytest.mark.parametrize("act_order", [True, False])
def test_output_error_is_well_below_round_to_nearest(act_order):
    torch.manual_seed(0)
    w, x = torch.randn(48, 128), correlated_inputs(2048, 128)
    hessian = x.T @ x / x.shape[0]
    cfg = config_for("nf4")
    rtn = dequantize(*quantize(w, cfg))
    gptq = dequantize(*quantize_gptq(w, cfg, hessian, act_order=act_order))
    assert output_error(w, gptq, x) < 0.6 * output_error(w, rtn, x)
    held_out = correlated_inputs(512, 128, sample=1)
    assert output_error(w, gptq, held_out) < 0.7 * output_error(w, rtn, held_out)


def test_rows_whose_blocks_straddle_rows_still_decode_within_the_format():
    torch.manual_seed(1)
    w, x = torch.randn(6, 96), correlated_inputs(512, 96)  # 576 weights: blocks of 64 cross row ends
    packed, state = quantize_gptq(w, config_for("nf4"), x.T @ x / 512)
    assert packed.numel() == w.numel() // 2
    assert dequantize(packed, state).abs().max() <= state.scales().max() * 1.0001


def test_an_input_that_is_always_zero_does_not_break_the_factorisation():
    torch.manual_seed(2)
    w, x = torch.randn(16, 64), correlated_inputs(256, 64)
    x[:, 5] = 0
    packed, state = quantize_gptq(w, config_for("nf4"), x.T @ x / 256)
    assert torch.isfinite(dequantize(packed, state)).all()
