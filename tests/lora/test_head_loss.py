import pytest
import torch
import torch.nn.functional as F

from compressor import memory
from compressor.lora import head_loss
from compressor.lora.data import IGNORE
from compressor.lora.head_loss import frozen_head_loss


def problem(positions=75, vocabulary=320, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(positions, width, generator=g, requires_grad=True)
    weight, bias = torch.randn(vocabulary, width, generator=g), torch.randn(vocabulary, generator=g)
    targets = torch.randint(0, vocabulary, (positions,), generator=g)
    targets[::7] = IGNORE
    return hidden, weight, bias, targets


def reference(hidden, weight, bias, targets):
    return F.cross_entropy(hidden.float() @ weight.float().T + bias.float(), targets, ignore_index=IGNORE, reduction="sum")


@pytest.fixture(autouse=True)
def several_slices(monkeypatch):
    monkeypatch.setattr(head_loss, "LOGIT_ELEMENTS", 75 * 50)  # 320 rows: six slices of 50 and a ragged one of 20


def test_the_sliced_loss_and_its_gradient_equal_those_over_the_full_logits():
    hidden, weight, bias, targets = problem()
    loss = frozen_head_loss(hidden, weight, bias, targets)
    (grad,) = torch.autograd.grad(loss, hidden)
    full = reference(hidden, weight, bias, targets)
    (expected,) = torch.autograd.grad(full, hidden)
    assert loss.item() == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_slices_whose_logits_come_from_one_reused_buffer_give_the_same_loss_and_gradient():
    hidden, weight, bias, targets = problem()
    plain = frozen_head_loss(hidden, weight, bias, targets)
    with memory.BufferPool(min_bytes=0) as pool:
        pooled = frozen_head_loss(hidden, weight, bias, targets)
    assert pooled.item() == plain.item()
    assert torch.equal(torch.autograd.grad(pooled, hidden)[0], torch.autograd.grad(plain, hidden)[0])
    assert pool.held_bytes() == (50 + 20) * 75 * 4  # a slice's logits and the ragged last one's, each in one buffer


def test_ignored_positions_get_no_gradient_and_no_loss():
    hidden, weight, bias, targets = problem()
    targets[:] = IGNORE
    loss = frozen_head_loss(hidden, weight, None, targets)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert loss.item() == 0 and not grad.any()


def test_without_gradients_the_loss_is_the_same():
    hidden, weight, bias, targets = problem()
    with torch.no_grad():
        plain = frozen_head_loss(hidden, weight, bias, targets)
    assert plain.item() == pytest.approx(frozen_head_loss(hidden, weight, bias, targets).item(), rel=1e-7)


def test_a_bfloat16_head_multiplies_in_float32_on_its_exact_values():
    hidden, weight, bias, targets = problem()
    stored = weight.to(torch.bfloat16)
    loss = frozen_head_loss(hidden, stored, bias, targets)
    (grad,) = torch.autograd.grad(loss, hidden)
    exact = reference(hidden, stored.float(), bias, targets)
    (expected,) = torch.autograd.grad(exact, hidden)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_products_stay_close_to_float32_ones():
    hidden, weight, bias, targets = problem()
    stored = weight.to(torch.bfloat16)
    loss = frozen_head_loss(hidden, stored, bias, targets, torch.bfloat16)
    (grad,) = torch.autograd.grad(loss, hidden)
    exact = reference(hidden, stored.float(), bias, targets)
    (expected,) = torch.autograd.grad(exact, hidden)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-2)
    assert (grad - expected).norm() < 0.02 * expected.norm()  # bfloat16 inputs: about 3 significant digits
