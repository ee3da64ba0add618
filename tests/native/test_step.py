import numpy as np
import torch

from compressor.native import step


def test_lora_add_adds_the_scaled_term_to_the_listed_rows_only():
    x, a, b = torch.randn(5, 32), torch.randn(4, 32), torch.randn(24, 4)
    y = torch.zeros(5, 24)
    b_t = b.T.contiguous().numpy()
    step.lora_add(x.numpy(), step.lora(a.numpy(), b_t, 0.5), np.array([1, 3]), y.numpy())
    expected = torch.zeros(5, 24)
    expected[[1, 3]] = 0.5 * (x[[1, 3]] @ a.T) @ b.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_a_rows_term_does_not_depend_on_the_other_rows_of_the_call():
    x, a, b_t = torch.randn(9, 48), torch.randn(8, 48), torch.randn(8, 40)
    term = step.lora(a.numpy(), b_t.numpy(), 2.0)
    many = torch.zeros(9, 40)
    step.lora_add(x.numpy(), term, np.arange(9), many.numpy(), threads=2)
    for row in range(9):
        one = torch.zeros(1, 40)
        step.lora_add(x[row : row + 1].numpy(), term, np.array([0]), one.numpy(), threads=1)
        assert torch.equal(one[0], many[row])
