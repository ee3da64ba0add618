import bitsandbytes.functional as bnbf
import pytest
import torch

from compressor.choices import ABSMAX_ROUNDINGS
from compressor.formats import dynamic8


def test_code_is_bitsandbytes_signed_dynamic_map():
    assert torch.equal(dynamic8.dynamic_code(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("magnitude", [1e-6, 0.05, 3.0, 1e30])
def test_lut_rounding_is_bit_identical_to_bitsandbytes_cpu(seed, magnitude):
    x = torch.randn(256 * 40 + 17, generator=torch.Generator().manual_seed(seed)) * magnitude
    x[:256] = 0  # an all-zero block
    ref_codes, ref_state = bnbf.quantize_blockwise(x, blocksize=256)
    codes, state = dynamic8.quantize(x, blocksize=256)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(dynamic8.dequantize(codes, state), bnbf.dequantize_blockwise(ref_codes, ref_state))


def test_nearest_rounding_never_does_worse_than_the_lut():
    x = torch.randn(256 * 400, generator=torch.Generator().manual_seed(0))
    errors = {}
    for rounding in ABSMAX_ROUNDINGS:
        codes, state = dynamic8.quantize(x, rounding=rounding)
        errors[rounding] = (dynamic8.dequantize(codes, state) - x).abs()
    assert bool((errors["nearest"] <= errors["lut"] + 1e-7).all())
    # The two differ on a small fraction of codes only.
    assert 0 < int((errors["nearest"] < errors["lut"]).sum()) < x.numel() // 100


def test_the_decode_kernel_computes_the_torch_formula_bit_for_bit():
    x = torch.randn(256 * 9 + 5, generator=torch.Generator().manual_seed(3)) * 0.02
    codes, state = dynamic8.quantize(x, blocksize=256)
    reference = dynamic8.dynamic_code()[codes.long()] * state.absmax.repeat_interleave(256)[: x.numel()] + torch.tensor(0.125)
    assert torch.equal(dynamic8.dequantize(codes, state, offset=0.125), reference)
