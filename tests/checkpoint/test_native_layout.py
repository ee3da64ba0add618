import pytest
import torch

from compressor.checkpoint import native_layout
from compressor.formats import Int8Config, IntNConfig, PerTensor, format_for, intn


@pytest.mark.parametrize(
    "cfg", [Int8Config(), Int8Config(PerTensor()), IntNConfig(blocksize=32), IntNConfig(bits=3, blocksize=64), IntNConfig(bits=2, blocksize=16)]
)
def test_state_round_trips_through_tensors_and_header(cfg):
    fmt = format_for(cfg)
    packed, state = fmt.quantize(torch.randn(24, 80, dtype=torch.float16), cfg)
    tensors = native_layout.tensors_for("m.weight", packed, state)
    metadata = native_layout.shard_metadata({"m.weight": native_layout.header_entry(state)})
    entry = native_layout.read_shard_metadata(metadata, "shard")["m.weight"]
    packed2, state2 = native_layout.state_from("m.weight", entry, tensors)
    assert torch.equal(fmt.dequantize(packed2, state2), fmt.dequantize(packed, state))
    assert state2.dtype == torch.float16 and state2.shape == (24, 80)


def test_unknown_layout_version_is_refused():
    with pytest.raises(ValueError, match="layout version 99"):
        native_layout.read_shard_metadata({"compressor": '{"layout_version": 99, "weights": {}}'}, "shard")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_width_is_in_the_method_name_so_int4_entries_read_as_before(bits):
    # Layout version 1 predates int3/int2: an int4 entry must stay exactly what the int4 method wrote.
    _, state = intn.quantize(torch.randn(2, 32), IntNConfig(bits, 32))
    entry = {"method": f"int{bits}", "shape": [2, 32], "dtype": "float32", "blocksize": 32}
    assert native_layout.header_entry(state) == entry
    assert native_layout.quantization_config(IntNConfig(bits, 32), [])["method"] == f"int{bits}"
