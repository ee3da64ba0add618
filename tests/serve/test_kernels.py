import numpy as np
import torch

from serve.kernels import add_low_rank


def test_add_low_rank_adds_the_scaled_term_to_the_listed_rows_only():
    x, a, b = torch.randn(5, 32), torch.randn(4, 32), torch.randn(24, 4)
    y = torch.zeros(5, 24)
    add_low_rank(x.numpy(), a.numpy(), b.T.contiguous().numpy(), np.float32(0.5), np.array([1, 3]), y.numpy())
    expected = torch.zeros(5, 24)
    expected[[1, 3]] = 0.5 * (x[[1, 3]] @ a.T) @ b.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
