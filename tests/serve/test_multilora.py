import torch

from compressor.lora import LoraConfig, LoraLinear
from serve.multilora import MultiLoraLinear, Routing


def lora(base, rank, seed):
    layer = LoraLinear(base, LoraConfig(rank=rank, alpha=2.0 * rank))
    torch.manual_seed(seed)
    torch.nn.init.normal_(layer.lora_B.weight)
    return layer


def test_each_row_gets_its_own_adapters_term_and_bare_rows_the_base():
    base = torch.nn.Linear(16, 12)
    adapters = {"p": lora(base, 2, 1), "q": lora(base, 5, 2)}
    routing = Routing()
    layer = MultiLoraLinear(base, routing)
    for name, ref in adapters.items():
        layer.adapters[name] = (ref.lora_A.weight.detach(), ref.lora_B.weight.detach(), ref.scaling)
    x = torch.randn(5, 3, 16)
    names = ["p", None, "q", "p", "q"]
    routing.set(names, multiple=4)
    with torch.no_grad():
        got = layer(x)
        for row, name in enumerate(names):
            expected = (adapters[name] if name else base)(x[row : row + 1])
            torch.testing.assert_close(got[row : row + 1], expected)


def test_routing_pads_each_group_to_the_row_multiple_with_real_rows():
    routing = Routing()
    routing.set(["a", "b", "a", None, "a"], multiple=4)
    groups = {name: rows.tolist() for name, rows in routing.groups}
    assert groups == {"a": [0, 2, 4, 4], "b": [1, 1, 1, 1]}
    assert routing.counts == [3, 1]
