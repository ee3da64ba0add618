import pytest
import torch
import torch.nn.functional as F

from compressor.native import backward
from compressor.native.ops import GELU_TANH, SILU

ACTIVATIONS = [(SILU, F.silu), (GELU_TANH, lambda g: F.gelu(g, approximate="tanh"))]


def autograd_of(fn, inputs, grad):
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_forward_and_backward_match_autograd_over_the_formula(offset):
    x, w, grad = torch.randn(37, 96) * 3, torch.randn(96), torch.randn(37, 96)
    expected, (expected_dx,) = autograd_of(lambda v: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * (w + offset), [x], grad)
    out, rstd = backward.rms_norm_forward(x, w, 1e-6, offset)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-6), rtol=1e-6, atol=0)
    torch.testing.assert_close(backward.rms_norm_backward(grad, x, rstd, w, offset), expected_dx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act,reference", ACTIVATIONS)
def test_act_mul_forward_and_backward_match_autograd_over_the_activation(act, reference):
    gate, up, grad = torch.randn(33, 70) * 4, torch.randn(33, 70), torch.randn(33, 70)
    expected, (d_gate, d_up) = autograd_of(lambda g, u: reference(g) * u, [gate, up], grad)
    torch.testing.assert_close(backward.act_mul_forward(gate, up, act), expected, rtol=1e-5, atol=1e-5)
    ours = backward.act_mul_backward(grad, gate, up, act)
    torch.testing.assert_close(ours[0], d_gate, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], d_up, rtol=1e-5, atol=1e-5)


def test_act_mul_takes_gate_and_up_as_the_halves_of_one_tensor():
    gate_up, grad = torch.randn(9, 2 * 40), torch.randn(9, 40)
    gate, up = gate_up.chunk(2, dim=-1)  # strided views, rows 80 apart
    torch.testing.assert_close(backward.act_mul_forward(gate, up, SILU), backward.act_mul_forward(gate.contiguous(), up.contiguous(), SILU))
    halves = backward.act_mul_backward(grad, gate, up, SILU)
    dense = backward.act_mul_backward(grad, gate.contiguous(), up.contiguous(), SILU)
    assert all(torch.equal(a, b) for a, b in zip(halves, dense))


def test_saturated_gates_give_finite_gradients():
    gate = torch.tensor([[-200.0, -90.0, 0.0, 90.0, 200.0]] * 2)
    for act, _ in ACTIVATIONS:
        d_gate, d_up = backward.act_mul_backward(torch.ones_like(gate), gate, torch.ones_like(gate), act)
        assert torch.isfinite(d_gate).all() and torch.isfinite(d_up).all()


def test_a_rows_results_do_not_depend_on_the_thread_count(monkeypatch):
    x, w, gate, up = torch.randn(301, 64), torch.randn(64), torch.randn(301, 64), torch.randn(301, 64)
    many = backward.rms_norm_forward(x, w, 1e-6, 0.0)[0], backward.act_mul_backward(x, gate, up, SILU)
    monkeypatch.setattr(backward, "all_cores", lambda: 1)
    one = backward.rms_norm_forward(x, w, 1e-6, 0.0)[0], backward.act_mul_backward(x, gate, up, SILU)
    assert torch.equal(many[0], one[0]) and all(torch.equal(a, b) for a, b in zip(many[1], one[1]))


def test_rows_that_are_not_float32_or_not_contiguous_are_refused():
    with pytest.raises(ValueError, match="float32"):
        backward.rms_norm_forward(torch.randn(4, 8, dtype=torch.float64), torch.randn(8), 1e-6, 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        backward.rms_norm_forward(torch.randn(8, 4).T, torch.randn(8), 1e-6, 0.0)
