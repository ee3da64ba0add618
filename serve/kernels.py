"""numba kernels of the serving path, each computing every row of its input on its own in one fixed order.

A row's result therefore does not depend on how many rows share the call (CPU GEMM libraries pick
other kernels, and other summation orders, for one row than for sixteen): a request decodes to the
same tokens alone or in any batch. Sums are reassociated so that each dot product vectorises; the
order is fixed when the kernel is compiled, not chosen per call.
"""

from __future__ import annotations

import numba
import numpy as np

_ROWS_PER_TASK = 64  # weight rows one thread takes at a time


@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
def matmul_rows(x, w, out):
    """``out = x @ w.T`` for float32 ``x (m, k)`` and ``w (n, k)``."""
    rows, width = x.shape
    outputs = w.shape[0]
    for t in numba.prange((outputs + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        for n in range(t * _ROWS_PER_TASK, min((t + 1) * _ROWS_PER_TASK, outputs)):
            wn = w[n]
            for m in range(rows):
                xm = x[m]
                total = np.float32(0.0)
                for k in range(width):
                    total += xm[k] * wn[k]
                out[m, n] = total


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def add_low_rank(x, a, b_t, scaling, rows, y):
    """``y[i] += scaling * (x[i] @ A.T) @ B.T`` for each listed row ``i``; ``b_t`` is B transposed, ``(r, out)``."""
    rank, width = a.shape
    t = np.empty(rank, dtype=np.float32)
    acc = np.empty(b_t.shape[1], dtype=np.float32)
    for i in rows:
        xi = x[i]
        for j in range(rank):
            total = np.float32(0.0)
            for k in range(width):
                total += xi[k] * a[j, k]
            t[j] = total
        acc[:] = 0
        for j in range(rank):
            acc += t[j] * b_t[j]
        y[i] += acc * scaling
