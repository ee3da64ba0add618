import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compressor.formats import NonFiniteError, int8_sym


@settings(max_examples=100, deadline=None)
@given(
    values=arrays(np.float32, st.tuples(st.integers(1, 10), st.integers(1, 80)), elements=st.floats(-60000.0, 60000.0, width=32)),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_bit_identical_to_bitsandbytes_load_in_8bit(values, dtype):
    w = torch.from_numpy(values).to(dtype)
    w[0] = 0  # an all-zero row
    ref_q, ref_stats, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
    q, state = int8_sym.quantize(w)
    assert torch.equal(q, ref_q)
    assert torch.equal(state.row_absmax, ref_stats)
    assert torch.equal(int8_sym.dequantize(q, state).float(), bnbf.int8_vectorwise_dequant(ref_q, ref_stats).to(dtype).float())


def test_each_row_reaches_127():
    q, _ = int8_sym.quantize(torch.randn(8, 64))
    assert torch.equal(q.abs().amax(dim=1), torch.full((8,), 127, dtype=torch.int8))


def test_values_beyond_float16_are_an_error():
    with pytest.raises(NonFiniteError):
        int8_sym.quantize(torch.tensor([[1.0, 1e6]]))
