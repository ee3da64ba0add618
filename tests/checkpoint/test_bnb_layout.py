import json

import bitsandbytes.functional as bnbf
import torch

from compressor.checkpoint import bnb_layout
from compressor.formats import FourBitConfig, Int8SymConfig, format_for


def round_trip(cfg, w):
    fmt = format_for(cfg)
    packed, state = fmt.quantize(w, cfg)
    tensors = bnb_layout.tensors_for("m.weight", packed, state)
    packed2, state2 = bnb_layout.state_from("m.weight", tensors)
    return fmt, packed, state, tensors, packed2, state2


def test_four_bit_state_round_trips_through_the_checkpoint_tensors():
    for cfg in (FourBitConfig("nf4", 64, True), FourBitConfig("fp4", 128, False)):
        fmt, packed, state, _, packed2, state2 = round_trip(cfg, torch.randn(40, 96, dtype=torch.bfloat16))
        assert torch.equal(packed, packed2)
        assert torch.equal(fmt.dequantize(packed, state), fmt.dequantize(packed2, state2))
        assert (state2.codebook, state2.blocksize, state2.shape, state2.dtype) == (cfg.codebook, cfg.blocksize, (40, 96), torch.bfloat16)


def test_quant_state_blob_is_what_bitsandbytes_packs():
    w = torch.randn(64, 128)
    _, _, _, tensors, _, _ = round_trip(FourBitConfig(), w)
    _, ref_state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    ref = ref_state.as_dict(packed=True)
    assert bytes(tensors["m.weight.quant_state.bitsandbytes__nf4"].tolist()) == bytes(ref["quant_state.bitsandbytes__nf4"].tolist())
    assert torch.equal(tensors["m.weight.quant_map"], ref["quant_map"])
    assert torch.equal(tensors["m.weight.nested_quant_map"], ref["nested_quant_map"])


def test_int8_sym_keys_are_weight_scb_and_format():
    _, packed, state, tensors, packed2, state2 = round_trip(Int8SymConfig(), torch.randn(8, 16))
    assert set(tensors) == {"m.weight", "m.SCB", "m.weight_format"}
    assert torch.equal(packed2, packed) and torch.equal(state2.row_absmax, state.row_absmax)


def test_config_entry_matches_transformers_for_nf4():
    entry = bnb_layout.quantization_config(FourBitConfig(), ["lm_head"], torch.float32)
    assert entry["quant_method"] == "bitsandbytes" and entry["load_in_4bit"] and entry["bnb_4bit_use_double_quant"]
    assert entry["llm_int8_skip_modules"] == ["lm_head"]
    json.dumps(entry)
