import torch
import torch.nn.functional as F

from compressor.formats import FourBitConfig, IntNConfig, Int8Config, format_for
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
