import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compressor.formats import IntNConfig, NonFiniteError, intn, payload_nbytes
from compressor.formats.packing import unpack_bits


@settings(max_examples=100, deadline=None)
@given(
    values=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 200)), elements=st.floats(-8192.0, 8192.0, width=32)),
    bits=st.sampled_from([2, 3, 4]),
    blocksize=st.sampled_from([16, 32, 64]),
)
def test_every_element_comes_back_within_half_a_step_of_its_block(values, bits, blocksize):
    w = torch.from_numpy(values)
    packed, state = intn.quantize(w, IntNConfig(bits, blocksize))
    out = intn.dequantize(packed, state)
    assert out.shape == w.shape
    step = state.scale.repeat_interleave(blocksize, dim=1)[:, : w.shape[1]]
    assert bool(((out - w).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all())
    assert int(state.zero_point.max()) < 2**bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_zero_is_exact_and_codes_take_their_width(bits):
    w = torch.randn(4, 128)
    w[:, 7] = 0
    packed, state = intn.quantize(w, IntNConfig(bits))
    assert packed.numel() == w.numel() * bits // 8
    codes = unpack_bits(packed, bits, w.numel())
    assert int(codes.min()) == 0 and int(codes.max()) == 2**bits - 1
    assert bool((intn.dequantize(packed, state)[:, 7] == 0).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bits_per_parameter_are_the_width_plus_a_scale_and_zero_point_per_block(bits):
    packed, state = intn.quantize(torch.randn(64, 256), IntNConfig(bits, 64))
    assert 8 * payload_nbytes(packed, state) / (64 * 256) == bits + 40 / 64


def test_short_last_block_keeps_its_own_range():
    w = torch.cat([torch.randn(2, 64), torch.full((2, 3), 100.0)], dim=1)
    packed, state = intn.quantize(w, IntNConfig(blocksize=64))
    assert state.scale.shape == (2, 2)
    assert torch.allclose(intn.dequantize(packed, state)[:, 64:], w[:, 64:], rtol=1e-5)


def test_two_bits_leave_four_levels():
    # The textbook int2 example: [-3, 3] in steps of 2 around an integer zero point of 2 (ties to even).
    w = torch.tensor([[-3.0, -1.0, 0.0, 3.0]])
    packed, state = intn.quantize(w, IntNConfig(2, 16))
    assert state.scale.item() == 2.0 and state.zero_point.item() == 2
    assert intn.dequantize(packed, state).tolist() == [[-4.0, 0.0, 0.0, 2.0]]


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_unsupported_widths_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        IntNConfig(bits)


def test_nan_is_an_error():
    with pytest.raises(NonFiniteError):
        intn.quantize(torch.tensor([[float("inf"), 1.0]]))
