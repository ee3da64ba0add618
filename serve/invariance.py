"""How many rows a matmul must be padded to so that each row's result does not depend on the others.

CPU GEMM libraries pick kernels and blockings by the number of rows: here a 1-row product and a
16-row product of the same row differ in the last bits, and a greedy decode can flip a token on
that. Padding every product to a multiple of some row count fixes the kernel, so a request's output
is the same alone or in any batch. The right multiple depends on the CPU and the library, so it is
measured at start-up for the shapes the model uses, not assumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CANDIDATES = (1, 2, 4, 8, 16, 32)


def row_multiple(shapes: set[tuple[int, int]], max_rows: int, seed: int = 0) -> int:
    """Smallest ``g`` such that, for every ``(out, in)`` shape, any multiple of ``g`` rows up to ``max_rows`` gives each row the same bits.

    If no candidate below ``max_rows`` works, ``max_rows`` itself: every product then has one size.
    """
    candidates = sorted({g for g in CANDIDATES if g < max_rows} | {max_rows})
    need = 1
    gen = torch.Generator().manual_seed(seed)
    for out_features, in_features in sorted(shapes):
        weight = torch.randn(out_features, in_features, generator=gen)
        x = torch.randn(max_rows, in_features, generator=gen)
        full = F.linear(x, weight)
        need = next(g for g in candidates if g >= need and (g == max_rows or _consistent(x, weight, full, g)))
    return need


def _consistent(x: torch.Tensor, weight: torch.Tensor, full: torch.Tensor, g: int) -> bool:
    return all(torch.equal(F.linear(x[:m], weight), full[:m]) for m in range(g, x.shape[0] + 1, g))


def padded(rows: int, multiple: int) -> int:
    """``rows`` rounded up to a multiple of ``multiple``."""
    return -(-rows // multiple) * multiple
