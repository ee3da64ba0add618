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


def test_a_pool_hands_a_buffer_out_again_only_once_no_tensor_uses_it():
    pool = memory.BufferPool(min_bytes=1024)
    a = pool.empty((64, 32), torch.float32)
    view = a[3:].T  # a view keeps the buffer in use after the tensor itself is gone
    del a
    b = pool.empty((64, 32), torch.float32)
    assert b.data_ptr() != view.data_ptr() - 3 * 32 * 4
    first = b.data_ptr()
    del b
    assert pool.empty((64, 32), torch.float32).data_ptr() == first  # the tensor is gone: its buffer again
    assert pool.held_bytes() == 2 * 64 * 32 * 4


def test_a_pools_tensors_are_aligned_like_torchs_and_small_ones_are_ordinary():
    pool = memory.BufferPool(min_bytes=1024)
    t = pool.empty((8, 100), torch.bfloat16)
    assert t.shape == (8, 100) and t.dtype == torch.bfloat16 and t.data_ptr() % 64 == 0 and t.is_contiguous()
    pool.empty((4, 4), torch.float32)
    assert pool.held_bytes() == 1600  # the 64-byte tensor came from torch


def test_empty_takes_from_the_active_pool_only():
    pool = memory.BufferPool(min_bytes=0)
    with pool:
        inside = memory.empty((8, 8))
    outside = memory.empty((8, 8))
    assert pool.held_bytes() == 256 and inside.shape == outside.shape == (8, 8)
