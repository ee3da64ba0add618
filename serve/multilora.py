"""Linear layers that add, row by row, the low-rank term of whichever adapter each row asked for.

The base matmul runs once for the whole batch; then each adapter's rows get
``scaling * (x @ A.T) @ B.T`` added by one small kernel call per adapter, as Punica's and S-LoRA's
gathered kernels do. The kernel works row by row in a fixed order, so a row's result does not
depend on which or how many rows share the batch. Adapters' weights are referenced, never merged,
so a resident adapter costs its file size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
import torch
from torch import nn

from compressor.nn import QuantLinear


@dataclass
class Routing:
    """Which token rows of the coming forward use which adapter; shared by every :class:`MultiLoraLinear`."""

    groups: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (adapter, indices of its token rows)

    def set(self, adapters: list[str | None], tokens_per_row: int = 1) -> None:
        """Route batch row ``i`` (its ``tokens_per_row`` tokens) to ``adapters[i]`` (``None``: the bare base)."""
        by_name: dict[str, list[int]] = {}
        for row, name in enumerate(adapters):
            if name is not None:
                by_name.setdefault(name, []).extend(range(row * tokens_per_row, (row + 1) * tokens_per_row))
        self.groups = [(name, np.array(rows, dtype=np.int64)) for name, rows in by_name.items()]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _add_low_rank(x, a, b_t, scaling, rows, y):
    # y[i] += scaling * (x[i] @ A.T) @ B.T for each listed row i; b_t is B transposed, (r, out).
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


class MultiLoraLinear(nn.Module):
    """A frozen base linear layer plus any number of adapters' ``(A, B, scaling)``, chosen per row by a :class:`Routing`."""

    def __init__(self, base: nn.Module, routing: Routing):
        super().__init__()
        self.base = base
        self.routing = routing
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters: dict[str, tuple[np.ndarray, np.ndarray, np.float32]] = {}

    def attach(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> int:
        """Hold adapter ``name``'s A ``(r, in)`` and B ``(out, r)`` (kept as B transposed); returns the bytes held."""
        a, b_t = a.float().contiguous().numpy(), b.float().T.contiguous().numpy()
        self.adapters[name] = (a, b_t, np.float32(scaling))
        return a.nbytes + b_t.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output for all rows, plus each row's own adapter term (no gradients: serving only)."""
        y = self.base(x)
        if self.routing.groups:
            flat_x = x.reshape(-1, self.in_features).float().contiguous().numpy()
            flat_y = y.view(-1, self.out_features).numpy()
            for name, rows in self.routing.groups:
                entry = self.adapters.get(name)
                if entry is not None:  # else this adapter does not target this layer
                    _add_low_rank(flat_x, entry[0], entry[1], entry[2], rows, flat_y)
        return y


def install(model: nn.Module, routing: Routing) -> dict[str, MultiLoraLinear]:
    """Wrap every linear layer inside the decoder (not the output head) in a :class:`MultiLoraLinear`; returns them by name."""
    decoder = model.get_decoder()
    prefix = next(name for name, m in model.named_modules() if m is decoder)
    names = [n for n, m in decoder.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = decoder.get_submodule(parent_name) if parent_name else decoder
        module = MultiLoraLinear(getattr(parent, child), routing)
        setattr(parent, child, module)
        wrapped[f"{prefix}.{name}" if prefix else name] = module
    return wrapped
