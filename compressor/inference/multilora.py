"""Linear layers that add, row by row, the low-rank term of whichever adapter each row asked for.

The base matmul runs once for the whole batch; then each adapter's rows get
``scaling * (x @ A.T) @ B.T`` added by one small kernel call per adapter, as Punica's and S-LoRA's
gathered kernels do. Every product here is row by row in a fixed order (``compressor/native``), so
a row's result does not depend on which or how many rows share the batch. Adapters' weights are
referenced, never merged, so a resident adapter costs its file size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..formats import config_for, format_for, kernel_weight
from ..native import step
from ..native.matmul import KernelWeight, matmul, unpack
from ..nn import QuantLinear


@dataclass
class Routing:
    """Which token rows of the coming forward use which adapter; shared by every :class:`MultiLoraLinear`."""

    groups: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (adapter, indices of its token rows)
    version: int = 0  # changes whenever an adapter is attached to or detached from any layer

    def set(self, adapters: list[str | None], tokens_per_row: int = 1) -> None:
        """Route batch row ``i`` (its ``tokens_per_row`` tokens) to ``adapters[i]`` (``None``: the bare base)."""
        self.set_rows(adapters, [tokens_per_row] * len(adapters))

    def set_rows(self, adapters: list[str | None], counts: list[int]) -> None:
        """Route the ``counts[i]`` consecutive token rows of sequence ``i`` to ``adapters[i]`` (``None``: the bare base)."""
        by_name: dict[str, list[int]] = {}
        start = 0
        for name, count in zip(adapters, counts):
            if name is not None:
                by_name.setdefault(name, []).extend(range(start, start + count))
            start += count
        self.groups = [(name, np.array(rows, dtype=np.int64)) for name, rows in by_name.items()]


class MultiLoraLinear(nn.Module):
    """A frozen base linear layer plus any number of adapters' ``(A, B, scaling)``, chosen per row by a :class:`Routing`."""

    def __init__(self, base: nn.Module, routing: Routing):
        super().__init__()
        self.base = base
        self.routing = routing
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters: dict[str, tuple[np.ndarray, np.ndarray, step.Lora]] = {}  # A, B transposed, their description

    def attach(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> int:
        """Hold adapter ``name``'s A ``(r, in)`` and B ``(out, r)`` (kept as B transposed); returns the bytes held."""
        a, b_t = a.detach().float().contiguous().numpy(), b.detach().float().T.contiguous().numpy()
        self.adapters[name] = (a, b_t, step.lora(a, b_t, scaling))
        self.routing.version += 1
        return a.nbytes + b_t.nbytes

    def detach(self, name: str) -> None:
        """Drop adapter ``name``'s weights."""
        del self.adapters[name]
        self.routing.version += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output for all rows, plus each row's own adapter term (no gradients: serving only)."""
        return self.rows(x)

    def rows(self, x: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False, threads: int | None = None,
             gemm: torch.dtype | None = None, unpacked: dict | None = None) -> torch.Tensor:  # fmt: skip
        """:meth:`forward` into ``out`` if given (added to it with ``accumulate``); ``gemm``: the base product by torch's GEMM in that dtype (see :func:`gemm_rows`)."""
        if gemm is None:
            y = base_rows(x, self.base, out=out, accumulate=accumulate, threads=threads)
        else:
            y = gemm_rows(x, self.base, out=out, accumulate=accumulate, threads=threads, dtype=gemm, unpacked=unpacked)
        if self.routing.groups:
            flat_x = x.reshape(-1, self.in_features).float().contiguous()
            flat_y = y.view(-1, self.out_features)
            for name, rows in self.routing.groups:
                entry = self.adapters.get(name)
                if entry is None:  # this adapter does not target this layer
                    continue
                if gemm is None:
                    step.lora_add(flat_x.numpy(), entry[2], rows, flat_y.numpy(), threads)
                else:  # a prompt's chunk, alone: every row is its, and GEMMs compute the term
                    a, b_t, term = entry
                    flat_y.addmm_(flat_x @ torch.from_numpy(a).T, torch.from_numpy(b_t), alpha=term.scaling)
        return y


class RowwiseLinear(nn.Module):
    """A float linear layer (the output head) computed row by row, by its own weight or a packed copy of it."""

    def __init__(self, linear: nn.Linear, weight: KernelWeight | None = None, threads: int | None = None, activations: str = "float32"):
        super().__init__()
        self.linear = linear
        self.weight = KernelWeight.of_float(linear.weight) if weight is None else weight
        self.threads, self.activations = threads, activations
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b``, each row on its own."""
        return matmul(x, self.weight, self.linear.bias, threads=self.threads, activations=self.activations)


def head_weight(weight: torch.Tensor, head: str) -> KernelWeight:
    """The output head's weight as ``head`` (one of :data:`compressor.choices.HEADS`) says to multiply by it."""
    if head == "float":
        return KernelWeight.of_float(weight)
    if head == "bfloat16":
        return KernelWeight.of_float(weight.detach().to(torch.bfloat16))
    cfg = config_for("int8-sym")
    return kernel_weight(*format_for(cfg).quantize(weight.detach(), cfg))


def base_rows(x: torch.Tensor, layer: nn.Module, out: torch.Tensor | None = None, accumulate: bool = False,
              threads: int | None = None) -> torch.Tensor:  # fmt: skip
    """``layer(x)`` for an ``nn.Linear`` or a :class:`QuantLinear`, each row on its own (float32, no gradients), into ``out`` if given.

    Packed weights run the native kernel on their codes; float weights, and the rare packed layout
    it does not take (4-bit blocks straddling rows), run it over the float weight (see :func:`row_weight`).
    """
    weight, bias, int8 = row_weight(layer)
    return matmul(x, weight, bias, out=out, accumulate=accumulate, threads=threads, activations="int8" if int8 else "float32")


def row_weight(layer: nn.Module) -> tuple[KernelWeight, torch.Tensor | None, bool]:
    """What :func:`base_rows` multiplies by: the packed weight where the kernels take it, else the float weight; the bias in float32; whether activations enter as int8 (the layer's mode)."""
    weight = layer.kernel_weight() if isinstance(layer, QuantLinear) else None
    int8 = weight is not None and layer.activations == "int8"
    if weight is None:
        weight = KernelWeight.of_float(layer.weight_dequantized() if isinstance(layer, QuantLinear) else layer.weight)
    bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
    return weight, bias, int8


def gemm_rows(x: torch.Tensor, layer: nn.Module, out: torch.Tensor | None = None, accumulate: bool = False,
              threads: int | None = None, dtype: torch.dtype = torch.float32, unpacked: dict | None = None) -> torch.Tensor:  # fmt: skip
    """:func:`base_rows` for many rows of one sequence (a prompt): the weight unpacked once, then torch's GEMM, in ``dtype``.

    Faster than the row-wise kernels from a few dozen rows on; its sums run in another order,
    so a prompt's rows must take it by their own count alone (see :class:`compressor.inference.decoder.Decoder`).
    In bfloat16 the weight and the rows are rounded to bfloat16 and multiplied by the CPU's
    bfloat16 units (AMX, where it has them), the product coming back as float32: several times
    faster, at an accuracy cost ``benchmarks.precision`` reports. ``unpacked``, if given, keeps the
    unpacked weight by layer for later calls (several prompts' chunks through one layer).
    """
    weight = None if unpacked is None else unpacked.get(id(layer))
    if weight is None:
        weight = _gemm_weight(layer, dtype)
        if unpacked is not None:
            unpacked[id(layer)] = weight
    flat = x.reshape(-1, layer.in_features).to(dtype)
    if out is None:
        out = torch.empty(*x.shape[:-1], layer.out_features)
    flat_out = out.view(-1, layer.out_features)
    if dtype != torch.float32:
        product = torch.mm(flat, weight.T).float()
        if accumulate:
            flat_out += product
        else:
            flat_out.copy_(product)
    elif accumulate:
        flat_out.addmm_(flat, weight.T)
    else:
        torch.mm(flat, weight.T, out=flat_out)
    if layer.bias is not None:
        flat_out += layer.bias
    return out


def _gemm_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    # The weight as gemm_rows multiplies by it.
    if isinstance(layer, QuantLinear):
        kernel = layer.kernel_weight()
        # On the calling thread alone: torch's GEMM threads spin for a while after each product,
        # and the kernels' pool would run its share of the unpacking against them.
        return unpack(kernel, threads=1, dtype=dtype) if kernel is not None else layer.weight_dequantized().to(dtype)
    return layer.weight.detach().to(dtype)


def install(model: nn.Module, routing: Routing) -> dict[str, MultiLoraLinear]:
    """Wrap every linear layer inside the decoder (not the output head) in a :class:`MultiLoraLinear`; returns them by name."""
    decoder = model.get_decoder()
    prefix = next(name for name, m in model.named_modules() if m is decoder)
    names = [f"{prefix}.{n}" if prefix else n for n, m in decoder.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    wrapped = {name: MultiLoraLinear(model.get_submodule(name), routing) for name in names}
    for name, module in wrapped.items():
        model.set_submodule(name, module)
    return wrapped
