import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compressor.formats import FourBitConfig, NonFiniteError, nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bnb_quantize(w, cfg):
    return bnbf.quantize_4bit(w, blocksize=cfg.blocksize, quant_type=cfg.codebook, compress_statistics=cfg.double_quant)


def _bnb_dequantize(packed, state):
    # bitsandbytes' AVX-512 dequantize kernel indexes the absmax by row, which is wrong when a row's
    # length is not a multiple of the block size; its generic kernel is right everywhere.
    if len(state.shape) and state.shape[-1] % state.blocksize == 0:
        return bnbf.dequantize_4bit(packed, state)
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    code = nf4.codebook(state.quant_type)
    return _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def assert_matches_bitsandbytes(w, cfg):
    ref_packed, ref_state = _bnb_quantize(w, cfg)
    packed, state = nf4.quantize(w, cfg)
    assert torch.equal(packed, ref_packed.reshape(-1))
    assert torch.equal(state.absmax, ref_state.absmax)
    if cfg.double_quant:
        assert state.absmax_offset == ref_state.offset.item()
        assert torch.equal(state.absmax_state.absmax, ref_state.state2.absmax)
    out = nf4.dequantize(packed, state)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(out, _bnb_dequantize(ref_packed, ref_state))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codebook", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bit_identical_to_bitsandbytes_on_weight_shapes(dtype, codebook, blocksize, double_quant):
    w = (torch.randn(192, 320, generator=torch.Generator().manual_seed(blocksize)) * 0.02).to(dtype)
    assert_matches_bitsandbytes(w, FourBitConfig(codebook, blocksize, double_quant))


@pytest.mark.parametrize("shape", [(1,), (7,), (33,), (3, 96), (5, 41), (2, 3, 50), (1, 4097)])
def test_bit_identical_on_sizes_that_are_not_a_multiple_of_the_block(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for codebook in ("nf4", "fp4"):
        assert_matches_bitsandbytes(w, FourBitConfig(codebook, 64, True))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 300),
    exponent=st.integers(-40, 37),
    codebook=st.sampled_from(["nf4", "fp4"]),
    blocksize=st.sampled_from([32, 64, 256]),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_bit_identical_on_any_values(rows, cols, exponent, codebook, blocksize, dtype, data):
    finfo = torch.finfo(dtype)
    bound = min(10.0**exponent, finfo.max)
    values = data.draw(arrays(np.float64, (rows, cols), elements=st.floats(-bound, bound) | st.just(0.0)))
    w = torch.from_numpy(values).to(dtype)
    assert_matches_bitsandbytes(w, FourBitConfig(codebook, blocksize, True))


def test_all_zero_weight_round_trips_to_zero():
    w = torch.zeros(4, 128)
    assert_matches_bitsandbytes(w, FourBitConfig())
    packed, state = nf4.quantize(w)
    assert torch.equal(nf4.dequantize(packed, state), w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_is_an_error(bad):
    w = torch.randn(8, 64)
    w[3, 5] = bad
    with pytest.raises(NonFiniteError):
        nf4.quantize(w)


def test_error_is_within_measured_bound():
    # bitsandbytes' own test records a mean abs error of 0.0728 for NF4, block 64, randn 1024^2.
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    packed, state = nf4.quantize(w, FourBitConfig(double_quant=False))
    err = (nf4.dequantize(packed, state) - w).abs().mean().item()
    assert 0.070 < err < 0.076


def test_double_quant_costs_about_4_127_bits_per_parameter():
    w = torch.randn(1024, 1024)
    packed, state = nf4.quantize(w)
    bits = 8 * (packed.numel() + state.absmax.numel() + 4 * state.absmax_state.absmax.numel() + 4) / w.numel()
    assert bits == pytest.approx(4.127, abs=0.001)


@pytest.mark.parametrize("blocksize", [16, 48, 8192])
def test_unsupported_blocksize_is_rejected(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        FourBitConfig(blocksize=blocksize)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_error_equals_error_of_the_dequantized_weight(dtype):
    from compressor.formats.common import error_stats

    w = (torch.randn(100, 130, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype)
    packed, state = nf4.quantize(w)
    peak, rms = nf4.error(w, packed, state)
    ref_peak, ref_rms = error_stats(w, nf4.dequantize(packed, state))
    assert peak == ref_peak
    assert rms == pytest.approx(ref_rms, rel=1e-9)
