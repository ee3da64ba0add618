import pytest
import torch
from torch import nn

from compressor.formats import FourBitConfig, format_for
from compressor.lora import LoraConfig, LoraLinear
from compressor.lora.product import adapted_product, fused_applies
from compressor.nn import QuantLinear


def packed_base(out=48, inp=64) -> QuantLinear:
    packed, state = format_for(FourBitConfig()).quantize(torch.randn(out, inp, generator=torch.Generator().manual_seed(0)), FourBitConfig())
    return QuantLinear(packed, state)


def float_base(out=48, inp=64) -> nn.Linear:
    return nn.Linear(inp, out).requires_grad_(False)


def plain(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    # The unfused formula over the modules, autograd doing the rest.
    return layer.base(x) + layer.scaling * layer.lora_B(layer.lora_A(layer.dropout(x)))


def outputs_and_gradients(layer: LoraLinear, x: torch.Tensor, fn):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the dropout's seed
    y = fn(layer, x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    grads = (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    layer.zero_grad(set_to_none=True)
    return y.detach(), grads


def assert_fused_matches_plain(layer: LoraLinear, x: torch.Tensor, output_tol: float, grad_rtol: float, grad_atol: float) -> None:
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    fused_y, fused_grads = outputs_and_gradients(layer, x, lambda m, v: m(v))
    plain_y, plain_grads = outputs_and_gradients(layer, x, plain)
    torch.testing.assert_close(fused_y, plain_y, rtol=output_tol, atol=output_tol)
    for fused, expected in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused, expected, rtol=grad_rtol, atol=grad_atol)


@pytest.mark.parametrize("make_base", [packed_base, float_base])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_fused_product_gives_the_outputs_and_gradients_of_the_plain_formula(make_base, dropout):
    layer = LoraLinear(make_base(), LoraConfig(rank=4, alpha=8, dropout=dropout)).train()
    assert_fused_matches_plain(layer, torch.randn(3, 5, 64), output_tol=1e-5, grad_rtol=1e-4, grad_atol=1e-5)


def test_on_bfloat16_activations_torchs_products_serve_and_agree_with_the_plain_formula():
    layer = LoraLinear(float_base(), LoraConfig(rank=4, alpha=8, dropout=0.3)).to(torch.bfloat16).train()
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    assert_fused_matches_plain(layer, x, output_tol=2e-2, grad_rtol=5e-2, grad_atol=5e-2)


def test_with_bfloat16_compute_the_low_rank_term_is_added_in_float32():
    base = packed_base()
    base.compute_dtype = torch.bfloat16
    a, b = torch.randn(4, 64), torch.randn(48, 4) * 1e-3  # a term far under bfloat16's resolution of the output
    x = torch.randn(5, 64, requires_grad=True)
    y = adapted_product(x, base, a, b, 2.0, 0.0)
    assert y.dtype == torch.float32
    torch.testing.assert_close((y - base(x)).detach(), 2.0 * x.detach() @ (b @ a).T, rtol=1e-2, atol=2e-6)


def test_without_gradients_or_with_a_strided_input_the_plain_path_serves():
    x = torch.randn(4, 8).T  # not contiguous
    assert not fused_applies(x, 0.1)
    with torch.no_grad():
        assert not fused_applies(torch.randn(4, 8), 0.0)
    assert fused_applies(torch.randn(4, 8), 0.1)
