import torch
import torch.nn.functional as F

from serve.invariance import padded, row_multiple


def test_the_measured_multiple_makes_each_rows_result_independent_of_the_others():
    shapes = {(96, 64), (8, 64), (64, 8)}
    g = row_multiple(shapes, max_rows=16)
    for out_features, in_features in shapes:
        w, x = torch.randn(out_features, in_features), torch.randn(16, in_features)
        full = F.linear(x, w)
        for rows in range(g, 17, g):
            assert torch.equal(F.linear(x[:rows], w), full[:rows])


def test_padding_rounds_up_to_the_multiple():
    assert [padded(n, 4) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
