import dataclasses

import pytest
import torch

from compressor.formats import METHODS, config_for, dequantize, format_for, method_of


@pytest.mark.parametrize("method", METHODS)
def test_method_names_round_trip_through_configs(method):
    assert method_of(config_for(method)) == method


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'int5'"):
        config_for("int5")


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8", "int8-sym", "int4", "int3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_a_buffer_writes_what_it_returns(method, dtype):
    cfg = config_for(method)
    packed, state = format_for(cfg).quantize(torch.randn(48, 64, generator=torch.Generator().manual_seed(0)), cfg)
    state = dataclasses.replace(state, dtype=dtype)
    out = torch.full(state.shape, float("nan"), dtype=dtype)
    assert dequantize(packed, state, out=out) is out
    assert torch.equal(out, dequantize(packed, state))
