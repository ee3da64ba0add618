import pytest
import torch
from transformers import AutoModelForCausalLM

import compressor
from compressor.errors import CompressorError
from compressor.formats import config_for
from compressor.nn import QuantLinear
from compressor.quantize import QuantizeJob, quantize_checkpoint
from tests.helpers import tiny_checkpoint, token_batch


def test_float_checkpoint_loads_as_is(tmp_path):
    src = tiny_checkpoint(tmp_path)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(compressor.load(src)(ids).logits, AutoModelForCausalLM.from_pretrained(src)(ids).logits)


@pytest.mark.parametrize("method", ["int8", "int4", "int3"])
def test_native_output_gets_quant_linears_that_match_the_dequantized_weights(tmp_path, method):
    src = tiny_checkpoint(tmp_path, "gemma")
    quantize_checkpoint(QuantizeJob(src, tmp_path / "out", config_for(method), progress=False))
    model = compressor.load(tmp_path / "out")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear)
    assert_matches_dequantized_float_model(model, src)


def assert_matches_dequantized_float_model(model, src):
    """A float model carrying the dequantized weights computes the same logits."""
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                ref.get_submodule(name).weight.copy_(module.weight_dequantized())
        ids = token_batch()
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_stock_transformers_cannot_mistake_native_output_for_float_weights(tmp_path):
    src = tiny_checkpoint(tmp_path)
    quantize_checkpoint(QuantizeJob(src, tmp_path / "out", config_for("int4"), progress=False))
    with pytest.raises(Exception, match="mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_unknown_quant_method_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "mystery"}}')
    with pytest.raises(CompressorError, match="unknown quant_method 'mystery'"):
        compressor.load(tmp_path)


def test_4bit_blocks_that_straddle_rows_still_load_as_quant_linears(tmp_path):
    # bitsandbytes' CPU matmul cannot run block 128 over rows of 64 (it reshapes the absmax by row).
    from compressor.formats import FourBitConfig, nf4

    src = tiny_checkpoint(tmp_path)
    quantize_checkpoint(QuantizeJob(src, tmp_path / "out", config_for("nf4", 128), progress=False))
    model = compressor.load(tmp_path / "out")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.state.blocksize == 128
    weight = AutoModelForCausalLM.from_pretrained(src).model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(layer.weight_dequantized(), nf4.dequantize(*nf4.quantize(weight, FourBitConfig(blocksize=128))))
    assert_matches_dequantized_float_model(model, src)
