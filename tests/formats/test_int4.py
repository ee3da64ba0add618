import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compressor.formats import Int4Config, NonFiniteError, int4


@settings(max_examples=100, deadline=None)
@given(
    values=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 200)), elements=st.floats(-8192.0, 8192.0, width=32)),
    blocksize=st.sampled_from([16, 32, 64]),
)
def test_every_element_comes_back_within_half_a_step_of_its_block(values, blocksize):
    w = torch.from_numpy(values)
    packed, state = int4.quantize(w, Int4Config(blocksize))
    out = int4.dequantize(packed, state)
    assert out.shape == w.shape
    step = state.scale.repeat_interleave(blocksize, dim=1)[:, : w.shape[1]]
    assert bool(((out - w).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all())


def test_zero_is_exact_and_codes_use_four_bits():
    w = torch.randn(4, 128)
    w[:, 7] = 0
    packed, state = int4.quantize(w)
    assert packed.numel() == w.numel() // 2
    assert int(state.zero_point.max()) <= 15
    assert bool((int4.dequantize(packed, state)[:, 7] == 0).all())


def test_short_last_block_keeps_its_own_range():
    w = torch.cat([torch.randn(2, 64), torch.full((2, 3), 100.0)], dim=1)
    packed, state = int4.quantize(w, Int4Config(64))
    assert state.scale.shape == (2, 2)
    assert torch.allclose(int4.dequantize(packed, state)[:, 64:], w[:, 64:], rtol=1e-5)


def test_nan_is_an_error():
    with pytest.raises(NonFiniteError):
        int4.quantize(torch.tensor([[float("inf"), 1.0]]))
