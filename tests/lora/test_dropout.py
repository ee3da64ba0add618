import torch
from torch.utils.checkpoint import checkpoint

from compressor.lora.dropout import Dropout


def test_it_drops_about_p_of_the_elements_and_scales_the_rest():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    out = Dropout(0.1).train()(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.9))


def test_its_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 48, requires_grad=True)
    out = Dropout(0.3).train()(x)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, (out != 0).float() / 0.7)


def test_torch_manual_seed_fixes_the_mask_and_masks_differ_between_calls():
    drop, x = Dropout(0.5).train(), torch.ones(32, 32)
    torch.manual_seed(2)
    first, second = drop(x), drop(x)
    torch.manual_seed(2)
    assert torch.equal(drop(x), first) and not torch.equal(first, second)


def test_a_checkpointed_recomputation_drops_the_same_elements():
    drop, w = Dropout(0.2).train(), torch.randn(16, 16)
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(3)
    (drop(x) @ w).sum().backward()
    plain, x.grad = x.grad, None
    torch.manual_seed(3)
    checkpoint(lambda t: drop(t) @ w, x, use_reentrant=False).sum().backward()
    assert torch.equal(x.grad, plain)


def test_in_eval_or_at_zero_it_is_the_identity():
    x = torch.randn(4, 4)
    assert Dropout(0.5).eval()(x) is x and Dropout(0.0).train()(x) is x


def test_bfloat16_input_gets_the_float32_mask_and_is_rounded_as_torch_rounds():
    x = torch.randn(3, 1 << 19, dtype=torch.float32)  # past one hash block (2**20 elements)
    drop = Dropout(0.2).train()
    torch.manual_seed(4)
    wide = drop(x)
    torch.manual_seed(4)
    narrow = drop(x.bfloat16())
    assert narrow.dtype == torch.bfloat16
    assert torch.equal(narrow != 0, wide != 0)
    assert torch.equal(narrow, (x.bfloat16().float() * (wide != 0) / 0.8).bfloat16())


def test_bfloat16_nan_and_infinity_come_out_as_in_float32():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0] * 256)
    drop = Dropout(0.5).train()
    torch.manual_seed(5)
    wide = drop(x)
    torch.manual_seed(5)
    narrow = drop(x.bfloat16())
    torch.testing.assert_close(narrow, wide.bfloat16(), rtol=0, atol=0, equal_nan=True)
