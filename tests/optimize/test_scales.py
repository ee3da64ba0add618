"""A searched block scale never decodes worse than the absmax, and the result is an ordinary NF4 state."""

import pytest
import torch

from compressor.formats import config_for
from compressor.formats.nf4 import FourBitState, dequantize, quantize
from compressor.optimize.scales import GRID, quantize_searched, search_absmax


def weighted_error(w, q, importance):
    return float(((w - q).square() * importance).sum())


@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
def test_the_searched_scales_give_no_more_weighted_error_than_the_absmax(codebook):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    importance = torch.rand(256).expand(64, 256) ** 4  # a few inputs matter most, as activations do
    cfg = config_for(codebook, double_quant=False)
    plain = dequantize(*quantize(w, cfg))
    searched = dequantize(*quantize_searched(w, cfg, importance))
    assert weighted_error(w, searched, importance) < 0.95 * weighted_error(w, plain, importance)


def test_scales_come_from_the_grid_of_fractions_of_the_absmax():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    cfg = config_for("nf4", double_quant=False)
    fractions = search_absmax(w, cfg) / w.abs().amax(dim=1)
    assert all(torch.isclose(GRID, f).any() for f in fractions)


def test_the_state_is_the_formats_own_double_quantized_one():
    torch.manual_seed(2)
    w = torch.randn(32, 128, dtype=torch.bfloat16)
    packed, state = quantize_searched(w, config_for("nf4"))
    reference_packed, reference = quantize(w, config_for("nf4"))
    assert isinstance(state, FourBitState) and state.double_quant and state.dtype == torch.bfloat16
    assert packed.shape == reference_packed.shape and state.absmax.shape == reference.absmax.shape
    assert dequantize(packed, state).shape == w.shape


def test_an_all_zero_block_decodes_to_zero():
    w = torch.zeros(2, 64)
    w[1] = torch.randn(64)
    out = dequantize(*quantize_searched(w, config_for("nf4")))
    assert torch.equal(out[0], torch.zeros(64))
