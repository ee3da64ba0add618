"""The adapted product ``base(x) + scaling * dropout(x) @ A.T @ B.T`` for training, as two autograd functions.

Autograd over the plain modules keeps the dropout's output for A's gradient, writes the low-rank
term as a tensor of the output's size and adds it in a pass of its own, and scales the upstream
gradient in another. Here the low-rank term is added into the base product in place (``addmm_``),
the scaling lands on the rank-r tensors, and the dropout's output is regenerated from its seed in
the backward rather than kept.

The split between the two functions is for activation checkpointing. ``_LowRankIn`` saves what the
adapter's backward needs (the input and A); ``_AdaptedProduct`` saves at most the base's decoded
weight. A checkpointed layer's recomputation stops as soon as every tensor its backward needs is
back (torch's early stop), so for a layer's last product, whose output nothing in the layer's
backward reads, ``_LowRankIn`` is the last to save and the base product is not recomputed at all,
provided that product saves nothing: a float base never does, and ``compressor train`` clears
``QuantLinear.reuse_in_backward`` for the last product of each layer. Where something does read
that output (Gemma's norm after the MLP), the recomputation simply goes on through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..native import lowrank
from ..native.ops import DROPOUT_DTYPES
from ..native.ops import dropout as native_dropout
from ..nn import QuantLinear, linear


def fused_applies(x: torch.Tensor, p: float) -> bool:
    """Whether :func:`adapted_product` takes ``x``: gradients on, and a dropout the native kernel can regenerate."""
    return torch.is_grad_enabled() and x.is_contiguous() and (p == 0 or x.dtype in DROPOUT_DTYPES)


def adapted_product(x: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """``base(x) + scaling * dropout_p(x) @ a.T @ b.T`` with ``base`` frozen (an ``nn.Linear`` or a :class:`QuantLinear`)."""
    seed = int(torch.randint(0, 2**63 - 1, ())) if p else 0  # torch's generator: checkpointing replays it
    h = _LowRankIn.apply(x, a, seed, p)
    return _AdaptedProduct.apply(x, h, b, base, scaling, (a, seed, p))


# The rank-r products on 2-d views: the native kernels (lowrank.c) for float32, which apply the
# mask as they read and never write a dropped copy of x; torch's products around the same mask elsewhere.


def _native(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 for t in tensors)


def _low_rank_in(x: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    if _native(x, a):
        return lowrank.low_rank_in(x, a, seed, p)
    return F.linear(_dropped(x, seed, p).to(a.dtype), a)


def _grad_a(grad_h: torch.Tensor, x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    if _native(grad_h, x):
        return lowrank.low_rank_grad_a(grad_h.contiguous(), x, seed, p)
    return grad_h.T @ _dropped(x, seed, p).to(grad_h.dtype)


def _add_grad_x(grad_x: torch.Tensor, grad_h: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> None:
    if _native(grad_x, grad_h, a):
        lowrank.low_rank_add_grad_x(grad_x, grad_h.contiguous(), a, seed, p)
        return
    low = (grad_h @ a.to(grad_h.dtype)).to(grad_x.dtype)
    grad_x += native_dropout(low, seed, p, low) if p else low  # the dropout's backward: the same mask


def _dropped(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    return native_dropout(x, seed, p, torch.empty_like(x)) if p else x


class _LowRankIn(torch.autograd.Function):
    # h = dropout(x) @ A.T, the rank-r tensor. Only x is kept, the mask being a hash of the seed. x
    # gets no gradient here: _AdaptedProduct adds the adapter's share into the base's, which saves
    # autograd a tensor of x's size and a pass to sum the two.

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> torch.Tensor:
        ctx.seed, ctx.p = seed, p
        ctx.save_for_backward(x, a)
        with torch.profiler.record_function("dropout"):
            h = _low_rank_in(x.reshape(-1, x.shape[-1]), a, seed, p)
        return h.view(*x.shape[:-1], a.shape[0])

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        x, a = ctx.saved_tensors
        grad_a = None
        if ctx.needs_input_grad[1]:
            with torch.profiler.record_function("dropout"):
                grad_a = _grad_a(grad_h.reshape(-1, grad_h.shape[-1]), x.reshape(-1, x.shape[-1]), ctx.seed, ctx.p)
        return None, grad_a, None, None


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return base.weight_dequantized(dtype) if isinstance(base, QuantLinear) else base.weight


def _compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    # A QuantLinear multiplies in its compute dtype (else x's); a float linear in its weight's own.
    return (base.compute_dtype or x.dtype) if isinstance(base, QuantLinear) else base.weight.dtype


class _AdaptedProduct(torch.autograd.Function):
    # y = base(x) + scaling * h @ B.T, the low-rank term accumulated into the base product in place;
    # the backward gives x the base's gradient plus the adapter's (see _LowRankIn).

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, base: nn.Module, scaling: float, low: tuple) -> torch.Tensor:
        dtype = _compute_dtype(base, x)
        w = _base_weight(base, dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        y = linear(x.to(dtype), w, bias).to(x.dtype)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]).to(y.dtype), b.T.to(y.dtype), alpha=scaling)
        # A decoded weight is kept only when the module says so (see nn._DequantizedLinear), else
        # decoded again in the backward; a float one is the module's own parameter, at hand there.
        ctx.save_for_backward(w if isinstance(base, QuantLinear) and base.reuse_in_backward else None)
        # h (rank r: small), B and A (parameters) are held, not saved: a saved tensor would make the
        # recomputation run this product again to restore it.
        ctx.h, ctx.b, ctx.low = h.detach(), b, low
        ctx.base, ctx.scaling, ctx.x_dtype, ctx.dtype = base, scaling, x.dtype, dtype
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        h = ctx.h.reshape(-1, ctx.h.shape[-1]).to(grad.dtype)
        # Both rank-r products with the rank as the rows of the GEMM: MKL takes (out x rows) @ (rows x r)
        # over a transposed gradient up to 8x slower than (r x rows) @ (rows x out) (49 against 6 ms
        # for a 1B model's gate), and rows @ (out x r) up to 2.5x slower than its transpose.
        grad_b = (h.T @ flat).T.mul_(ctx.scaling) if ctx.needs_input_grad[2] else None
        grad_h = grad_x = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_h = (ctx.b.T.to(grad.dtype) @ flat.T).T.contiguous().mul_(ctx.scaling)
        if ctx.needs_input_grad[0]:
            if w is None:
                w = _base_weight(ctx.base, ctx.dtype)
            grad_x = linear(grad.to(w.dtype), w.T).to(ctx.x_dtype)
            a, seed, p = ctx.low
            with torch.profiler.record_function("dropout"):
                _add_grad_x(grad_x.view(-1, grad_x.shape[-1]), grad_h, a, seed, p)
        if grad_h is not None:
            grad_h = grad_h.view(*grad.shape[:-1], -1)
        return grad_x, grad_h if ctx.needs_input_grad[1] else None, grad_b, None, None, None
