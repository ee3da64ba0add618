"""Linear layers that add, row by row, the low-rank term of whichever adapter each row asked for.

The base matmul runs once for the whole batch; then the rows are grouped by adapter and each group
gets ``scaling * (x @ A.T) @ B.T`` added, as Punica's and S-LoRA's grouped kernels do. Adapters'
weights are referenced, never copied or merged, so a resident adapter costs its file size. Each
group's rows are padded to the engine's row multiple (see :mod:`serve.invariance`) so a row's
result does not depend on how many others share its adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.nn import QuantLinear

from .invariance import padded


@dataclass
class Routing:
    """Which rows of the coming forward use which adapter; shared by every :class:`MultiLoraLinear`."""

    groups: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (adapter, padded row indices, rows that count)
    counts: list[int] = field(default_factory=list)

    def set(self, adapters: list[str | None], multiple: int) -> None:
        """Route row ``i`` to ``adapters[i]`` (``None``: the bare base)."""
        self.groups, self.counts = [], []
        by_name: dict[str, list[int]] = {}
        for row, name in enumerate(adapters):
            if name is not None:
                by_name.setdefault(name, []).append(row)
        for name, rows in by_name.items():
            # Padding repeats the last row: its extra results are computed and dropped.
            filled = rows + [rows[-1]] * (padded(len(rows), multiple) - len(rows))
            self.groups.append((name, torch.tensor(filled)))
            self.counts.append(len(rows))


class MultiLoraLinear(nn.Module):
    """A frozen base linear layer plus any number of adapters' ``(A, B, scaling)``, chosen per row by a :class:`Routing`."""

    def __init__(self, base: nn.Module, routing: Routing):
        super().__init__()
        self.base = base
        self.routing = routing
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output for all rows, plus each row's own adapter term."""
        y = self.base(x)
        for (name, rows), count in zip(self.routing.groups, self.routing.counts):
            entry = self.adapters.get(name)
            if entry is None:  # this adapter does not target this layer
                continue
            a, b, scaling = entry
            low = (x.index_select(0, rows) @ a.T) @ b.T
            y.index_add_(0, rows[:count], (low[:count] * scaling).to(y.dtype))
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
