import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compressor.formats import Int8Config, NonFiniteError, PerRow, PerTensor, int8


def _ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.finfo(torch.float32).eps * x.abs() + torch.finfo(torch.float32).tiny


@settings(max_examples=200, deadline=None)
@given(
    values=arrays(
        np.float32,
        st.tuples(st.integers(1, 8), st.integers(1, 64)),
        elements=st.floats(-(2.0**100), 2.0**100, width=32) | st.floats(-(2.0**-100), 2.0**-100, width=32),
    ),
    granularity=st.sampled_from([PerRow(), PerTensor()]),
)
def test_every_element_comes_back_within_half_a_step(values, granularity):
    w = torch.from_numpy(values)
    q, state = int8.quantize(w, Int8Config(granularity))
    out = int8.dequantize(q, state)
    scale = state.scale if isinstance(granularity, PerRow) else state.scale.expand(w.shape[0], 1)
    assert bool(((out - w).abs() <= scale / 2 + _ulp(w)).all())


def test_per_row_uses_the_full_code_range_of_each_row():
    w = torch.randn(16, 100)
    q, state = int8.quantize(w)
    assert q.dtype == torch.int8 and state.scale.shape == (16, 1)
    assert torch.equal(q.amin(dim=1), torch.full((16,), -128, dtype=torch.int8))
    assert torch.equal(q.amax(dim=1), torch.full((16,), 127, dtype=torch.int8))


def test_scale_is_range_over_255():
    w = torch.tensor([[-1.0, 0.5, 2.0]])
    _, state = int8.quantize(w)
    assert state.scale.item() == pytest.approx(3.0 / 255)


def test_constant_rows_round_trip_exactly():
    w = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-3.0, -3.0]])
    q, state = int8.quantize(w)
    assert torch.allclose(int8.dequantize(q, state), w, rtol=1e-6, atol=0)


def test_dtype_and_shape_are_restored():
    w = torch.randn(3, 4, 5, dtype=torch.bfloat16)
    q, state = int8.quantize(w)
    out = int8.dequantize(q, state)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape


def test_nan_is_an_error():
    with pytest.raises(NonFiniteError):
        int8.quantize(torch.tensor([[1.0, float("nan")]]))
