import pytest
import torch

from compressor.native import lowrank, ops

# 1,100 rows of 1,000: the tensor crosses the mask's 2**20-element block inside a row.
SHAPES = [(37, 64, 4), (1100, 1000, 8)]


def dropped(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    return ops.dropout(x, seed, p, torch.empty_like(x)) if p else x


@pytest.mark.parametrize("rows,width,rank", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_the_rank_r_input_is_dropout_then_a_product_with_the_whole_tensors_mask(rows, width, rank, p):
    x, a = torch.randn(rows, width), torch.randn(rank, width)
    torch.testing.assert_close(lowrank.low_rank_in(x, a, 12345, p), dropped(x, 12345, p) @ a.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,width,rank", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_the_gradient_of_a_is_grad_h_transposed_times_the_dropped_input(rows, width, rank, p):
    x, grad_h = torch.randn(rows, width), torch.randn(rows, rank)
    torch.testing.assert_close(lowrank.low_rank_grad_a(grad_h, x, 99, p), grad_h.T @ dropped(x, 99, p), rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("rows,width,rank", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_the_gradient_of_x_gains_the_dropped_low_rank_term_in_place(rows, width, rank, p):
    grad_x, grad_h, a = torch.randn(rows, width), torch.randn(rows, rank), torch.randn(rank, width)
    expected = grad_x + dropped(grad_h @ a, 7, p)
    out = lowrank.low_rank_add_grad_x(grad_x, grad_h, a, 7, p)
    assert out is grad_x
    torch.testing.assert_close(grad_x, expected, rtol=1e-4, atol=1e-4)


def test_the_gradient_of_a_sums_its_rows_in_an_order_fixed_whatever_the_cores(monkeypatch):
    x, grad_h = torch.randn(300, 96), torch.randn(300, 8)
    many = lowrank.low_rank_grad_a(grad_h, x, 5, 0.2)
    monkeypatch.setattr(lowrank, "all_cores", lambda: 1)
    assert torch.equal(lowrank.low_rank_grad_a(grad_h, x, 5, 0.2), many)


def test_a_strided_or_half_precision_input_is_refused_with_its_shape():
    with pytest.raises(ValueError, match=r"x: expected a contiguous float32 matrix, got \(8, 4\)"):
        lowrank.low_rank_in(torch.randn(4, 8).T, torch.randn(2, 4), 0, 0.1)
    with pytest.raises(ValueError, match="bfloat16"):
        lowrank.low_rank_in(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8), 0, 0.1)
