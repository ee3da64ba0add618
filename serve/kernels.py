"""The adapters' low-rank term of the serving path (numba), computing every row of its input on its own in one fixed order.

A row's result therefore does not depend on how many rows share the call (CPU GEMM libraries pick
other kernels, and other summation orders, for one row than for sixteen): a request decodes to the
same tokens alone or in any batch. Sums are reassociated so that each dot product vectorises; the
order is fixed when the kernel is compiled, not chosen per call.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(inline="always", fastmath={"reassoc", "contract"})
def dot(a, b):
    """``sum(a * b)`` of two float32 vectors, in one fixed order (reassociated when compiled, to vectorise)."""
    total = np.float32(0.0)
    for k in range(a.size):
        total += a[k] * b[k]
    return total


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def add_low_rank(x, a, b_t, scaling, rows, y):
    """``y[i] += scaling * (x[i] @ A.T) @ B.T`` for each listed row ``i``; ``b_t`` is B transposed, ``(r, out)``."""
    rank = a.shape[0]
    outputs = b_t.shape[1]
    t = np.empty(rank, dtype=np.float32)
    acc = np.empty(outputs, dtype=np.float32)
    for i in rows:
        for j in range(rank):
            t[j] = dot(x[i], a[j])
        # Written as loops: numba's array expressions would allocate a temporary for every term.
        for n in range(outputs):
            acc[n] = 0
        for j in range(rank):
            tj = t[j]
            bj = b_t[j]
            for n in range(outputs):
                acc[n] += tj * bj[n]
        yi = y[i]
        for n in range(outputs):
            yi[n] += acc[n] * scaling
