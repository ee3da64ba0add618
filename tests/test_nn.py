import torch
import torch.nn.functional as F

from compressor.formats import FourBitConfig, Int8Config, IntNConfig, format_for
from compressor.nn import QuantLinear


def test_forward_is_linear_on_the_dequantized_weight():
    w, b = torch.randn(48, 64), torch.randn(48)
    x = torch.randn(3, 5, 64)
    for cfg in (FourBitConfig(), Int8Config(), IntNConfig()):
        fmt = format_for(cfg)
        packed, state = fmt.quantize(w, cfg)
        layer = QuantLinear(packed, state, b)
        assert torch.equal(layer(x), F.linear(x, fmt.dequantize(packed, state), b))


def test_forward_follows_the_input_dtype():
    packed, state = format_for(FourBitConfig()).quantize(torch.randn(16, 64), FourBitConfig())
    assert QuantLinear(packed, state)(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_backward_reaches_the_input_through_the_dequantized_weight_and_saves_no_float_weight():
    w = torch.randn(48, 64)
    packed, state = format_for(FourBitConfig()).quantize(w, FourBitConfig())
    layer = QuantLinear(packed, state, torch.randn(48))
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    reference = x.detach().clone().requires_grad_()
    F.linear(reference, layer.weight_dequantized(), layer.bias).square().sum().backward()
    assert torch.allclose(x.grad, reference.grad, atol=1e-5)
    assert not any(t.shape == (48, 64) for t in saved)


def test_without_gradients_a_few_rows_take_the_fused_kernel_whose_rows_ignore_their_neighbours():
    w, b = torch.randn(48, 128), torch.randn(48)
    packed, state = format_for(FourBitConfig()).quantize(w, FourBitConfig())
    layer = QuantLinear(packed, state, b)
    x = torch.randn(16, 128)
    with torch.no_grad():
        crowd = layer(x)
        torch.testing.assert_close(crowd, F.linear(x, format_for(FourBitConfig()).dequantize(packed, state), b), rtol=1e-5, atol=1e-4)
        for rows in (1, 5, 9):
            assert torch.equal(layer(x[:rows]), crowd[:rows])


def test_weights_whose_rows_split_a_block_fall_back_to_dequantizing():
    cfg = FourBitConfig(blocksize=64)
    packed, state = format_for(cfg).quantize(torch.randn(8, 96), cfg)  # 96 = 1.5 blocks per row
    x = torch.randn(2, 96)
    with torch.no_grad():
        assert torch.equal(QuantLinear(packed, state)(x), F.linear(x, format_for(cfg).dequantize(packed, state)))
