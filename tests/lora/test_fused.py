import copy

import pytest
import torch

from compressor.lora import LoraConfig
from compressor.lora.fused import fuse_elementwise
from compressor.lora.layer import add_lora
from tests.helpers import FAMILIES, tiny_model

IDS = torch.tensor([[5, 17, 42, 8, 9, 10, 61, 7, 2, 30, 11, 12]] * 2)


def loss_and_gradients(model, fused: bool):
    modules = add_lora(model, LoraConfig(rank=4, alpha=8))
    for m in modules.values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)  # so that gradients reach every adapter
    count = fuse_elementwise(model) if fused else 0
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = {name: (m.lora_A.weight.grad, m.lora_B.weight.grad) for name, m in modules.items()}
    return loss.detach(), grads, count


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_fused_family_trains_with_the_loss_and_gradients_of_its_own_modules(family):
    ours, ours_grads, count = loss_and_gradients(tiny_model(family), fused=True)
    theirs, their_grads, _ = loss_and_gradients(tiny_model(family), fused=False)
    layers = tiny_model(family).config.num_hidden_layers
    assert count >= 3 * layers + 1  # every layer's two norms and MLP, and the final norm
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for name, grads in their_grads.items():
        for mine, expected in zip(ours_grads[name], grads):
            torch.testing.assert_close(mine, expected, rtol=1e-3, atol=1e-5)


def test_norms_and_mlps_keep_their_own_forward_off_float32():
    plain = tiny_model("llama", dtype=torch.bfloat16)
    fused = copy.deepcopy(plain)
    assert fuse_elementwise(fused) > 0
    with torch.no_grad():
        assert torch.equal(fused(IDS).logits, plain(IDS).logits)


def test_a_norm_whose_weight_trains_keeps_transformers_path():
    model = tiny_model("llama")
    fuse_elementwise(model)
    norm = model.model.norm
    x = torch.randn(2, 3, 64)
    y = norm(x)
    y.sum().backward()
    assert norm.weight.grad is not None  # the fused path would have given it none


def test_fusing_twice_changes_nothing():
    model = tiny_model("llama")
    assert fuse_elementwise(model) > 0
    assert fuse_elementwise(model) == 0
