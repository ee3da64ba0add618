import numpy as np
import torch

from serve.kernels import add_low_rank, matmul_rows


def test_matmul_rows_matches_torch_and_gives_a_row_the_same_bits_in_any_batch():
    x, w = torch.randn(16, 96), torch.randn(200, 96)
    full = torch.empty(16, 200)
    matmul_rows(x.numpy(), w.numpy(), full.numpy())
    torch.testing.assert_close(full, x @ w.T, rtol=1e-5, atol=1e-4)
    for rows in (1, 3, 7):
        part = torch.empty(rows, 200)
        matmul_rows(x[:rows].numpy(), w.numpy(), part.numpy())
        assert torch.equal(part, full[:rows])


def test_add_low_rank_adds_the_scaled_term_to_the_listed_rows_only():
    x, a, b = torch.randn(5, 32), torch.randn(4, 32), torch.randn(24, 4)
    y = torch.zeros(5, 24)
    add_low_rank(x.numpy(), a.numpy(), b.T.contiguous().numpy(), np.float32(0.5), np.array([1, 3]), y.numpy())
    expected = torch.zeros(5, 24)
    expected[[1, 3]] = 0.5 * (x[[1, 3]] @ a.T) @ b.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
