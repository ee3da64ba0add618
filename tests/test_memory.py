import torch
from torch import nn

from compressor import memory


def test_trim_returns_a_bool_and_can_run_between_any_two_steps():
    assert memory.trim() in (True, False)


def test_trim_every_hooks_every_nth_layer_and_leaves_outputs_as_they_are(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1) or True)
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(7))
    handles = memory.trim_every(layers, 3)
    x = torch.randn(2, 4)
    expected = x
    for layer in layers:
        expected = layer(expected)
    assert len(handles) == 2 and len(calls) == 2  # after layers 3 and 6
    for h in handles:
        h.remove()
    y = x
    for layer in layers:
        y = layer(y)
    assert torch.equal(expected, y) and len(calls) == 2


def test_trim_every_trims_again_when_the_backward_reaches_a_hooked_layer(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1) or True)
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
    memory.trim_every(layers, 3)
    y = torch.randn(2, 4)
    for layer in layers:
        y = layer(y)
    assert len(calls) == 2
    grads = torch.autograd.grad(y.sum(), list(layers[0].parameters()))
    assert len(calls) == 4 and all(g is not None for g in grads)  # once more per hooked layer, gradients intact
