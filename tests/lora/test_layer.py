import pytest
import torch
from torch import nn

from compressor.formats import FourBitConfig, format_for
from compressor.lora import LoraConfig, LoraLinear, add_lora, rank_for
from compressor.nn import QuantLinear
from tests.helpers import tiny_model, token_batch


def test_a_fresh_adapter_leaves_the_model_unchanged():
    model = tiny_model()
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
        add_lora(model, LoraConfig(rank=4))
        assert torch.equal(model(ids).logits, before)


def test_only_a_and_b_train_and_they_get_gradients():
    model = tiny_model()
    wrapped = add_lora(model, LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    assert sorted(wrapped) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in wrapped for ab in "AB"}
    model.train()
    model(token_batch()).logits.sum().backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_the_update_is_scaling_times_b_a_on_a_packed_base():
    w = torch.randn(32, 64)
    packed, state = format_for(FourBitConfig()).quantize(w, FourBitConfig())
    layer = LoraLinear(QuantLinear(packed, state), LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 64)
    expected = x @ (layer.base.weight_dequantized() + 2.0 * layer.lora_B.weight @ layer.lora_A.weight).T
    assert torch.allclose(layer(x), expected, atol=1e-4)
    assert torch.allclose(layer.delta(), 2.0 * layer.lora_B.weight @ layer.lora_A.weight)


def test_with_a_bfloat16_base_product_a_small_update_still_reaches_the_float32_output():
    packed, state = format_for(FourBitConfig()).quantize(torch.randn(32, 64), FourBitConfig())
    base = QuantLinear(packed, state)
    base.compute_dtype = torch.bfloat16
    layer = LoraLinear(base, LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=1e-3)  # an update far under bfloat16's resolution of the base output
    x = torch.randn(5, 64)
    out = layer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out - base(x), 2.0 * x @ (layer.lora_B.weight @ layer.lora_A.weight).T, rtol=1e-2, atol=2e-6)


@pytest.mark.parametrize(("params", "rank"), [(135e6, 8), (1.2e9, 16), (7e9, 16), (13e9, 32), (70e9, 64)])
def test_auto_rank_follows_the_usual_guidance(params, rank):
    assert rank_for(int(params)) == rank


def test_a_model_without_the_targets_is_an_error():
    with pytest.raises(ValueError, match="no linear module named nope"):
        add_lora(nn.Sequential(nn.Linear(4, 4)), LoraConfig(targets=("nope",)))
