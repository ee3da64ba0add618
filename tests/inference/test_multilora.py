import torch

from compressor.inference.multilora import MultiLoraLinear, Routing
from compressor.lora import LoraConfig, LoraLinear


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
        held = layer.attach(name, ref.lora_A.weight.detach(), ref.lora_B.weight.detach(), ref.scaling)
        assert held == ref.lora_A.weight.nbytes + ref.lora_B.weight.nbytes
    x = torch.randn(5, 3, 16)
    names = ["p", None, "q", "p", "q"]
    routing.set(names, tokens_per_row=3)
    with torch.no_grad():
        got = layer(x)
        for row, name in enumerate(names):
            expected = (adapters[name] if name else base)(x[row : row + 1])
            torch.testing.assert_close(got[row : row + 1], expected)


def test_a_rows_result_does_not_depend_on_its_neighbours():
    base = torch.nn.Linear(64, 48)
    torch.nn.init.zeros_(base.weight)  # a zero base: what remains is the adapter's term alone
    torch.nn.init.zeros_(base.bias)
    ref = lora(base, 8, 3)
    routing = Routing()
    layer = MultiLoraLinear(base, routing)
    layer.attach("p", ref.lora_A.weight.detach(), ref.lora_B.weight.detach(), ref.scaling)
    x = torch.randn(16, 1, 64)
    with torch.no_grad():
        routing.set(["p"] * 16)
        crowd = layer(x)
        for row in range(16):
            routing.set(["p"])
            assert torch.equal(layer(x[row : row + 1]), crowd[row : row + 1])


def test_routing_lists_each_adapters_token_rows():
    routing = Routing()
    routing.set(["a", "b", "a", None], tokens_per_row=2)
    assert {name: rows.tolist() for name, rows in routing.groups} == {"a": [0, 1, 4, 5], "b": [2, 3]}
