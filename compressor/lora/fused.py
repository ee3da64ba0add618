"""A decoder's RMSNorms and gated MLP activation, in training, as one native pass each way (``native/backward.c``).

transformers computes an RMSNorm in five tensor operations and ``act(gate) * up`` in two, and
autograd keeps their intermediates and runs as many operations again backwards. At a 1B model's
shapes (1,024 rows) the activation's forward and backward took 88 ms that way against 50 here, and
an RMSNorm's 15.5 against 1.7 ms. :func:`fuse_elementwise` points each such module's ``forward`` at
an autograd function over the native kernels, which keeps only the inputs (and the norm's per-row
scale). Modules, names and parameters stay as they are.

A module is taken only where its own output matches the kernel's on a probe (the same probes as
the inference step's, ``inference/decoder.py``); anything else (a family's other norm, an
activation the kernels lack, an MLP laid out otherwise) keeps transformers' forward. So does any
call on other than float32 rows.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..inference.decoder import UnsupportedModel, layer_parts, probe_act, probe_norm
from ..native import backward


def fuse_elementwise(model: nn.Module) -> int:
    """Point the RMSNorms and gated MLPs of ``model``'s decoder at the fused functions where they compute the same; how many modules were."""
    decoder = model.get_decoder()
    fused = 0
    mlp_ok: dict[type, bool] = {}  # one probe per MLP class
    for i, layer in enumerate(getattr(decoder, "layers", [])):
        try:
            parts = layer_parts(layer)
        except AttributeError:
            continue  # not a layer laid out as the families are
        norms = (parts.attn_norm, parts.q_norm, parts.k_norm, parts.attn_out_norm, parts.mlp_norm, parts.mlp_out_norm)
        fused += sum(_fuse_norm(m, f"layer {i}") for m in norms if m is not None)
        fused += _fuse_mlp(layer.mlp, parts.act, mlp_ok, f"layer {i}")
    if getattr(decoder, "norm", None) is not None:
        fused += _fuse_norm(decoder.norm, "final norm")
    return fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """``x / rms(x) * (weight + offset)`` over the last dimension of contiguous float32 ``x``, the weight frozen."""
    return _RMSNorm.apply(x, weight, eps, offset)


def act_mul(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    """``act(gate) * up`` for float32 tensors of one shape whose last dimension is contiguous."""
    return _ActMul.apply(gate, up, act)


def _takes(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)


def _fuse_norm(module: nn.Module, where: str) -> bool:
    if getattr(module, "weight", None) is None or "forward" in vars(module):
        return False
    try:
        probed = probe_norm(module, where)
    except UnsupportedModel:
        return False

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = module.weight  # the module's own, at each call; a trained one takes transformers' path
        if _takes(x, weight) and x.is_contiguous() and not weight.requires_grad:
            return rms_norm(x, weight, probed.eps, probed.offset)
        return type(module).forward(module, x)

    module.forward = forward
    return True


def _fuse_mlp(mlp: nn.Module, act_module: nn.Module | None, probed: dict[type, bool], where: str) -> bool:
    if act_module is None or "forward" in vars(mlp) or not hasattr(mlp, "down_proj"):
        return False
    try:
        act = probe_act(act_module, where)
    except UnsupportedModel:
        return False
    forward = partial(_gated_forward, mlp, act_module, act)
    if type(mlp) not in probed:
        probed[type(mlp)] = _same_as(mlp, forward)
    if probed[type(mlp)]:
        mlp.forward = forward
    return probed[type(mlp)]


def _gated_forward(mlp: nn.Module, act_module: nn.Module, act: int, x: torch.Tensor) -> torch.Tensor:
    # The children are looked up at each call: add_lora replaces them after this is set.
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: one product, gate then up
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    return mlp.down_proj(act_mul(gate, up, act) if _takes(gate, up) else act_module(gate) * up)


def _same_as(mlp: nn.Module, forward) -> bool:
    # The MLP's own forward against the fused one on a few random rows (so a family whose MLP is not
    # down(act(gate(x)) * up(x)) keeps its own).
    dtype = next((p.dtype for p in mlp.parameters() if p.is_floating_point()), torch.float32)
    x = torch.randn(2, 3, mlp.down_proj.out_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        expected, ours = type(mlp).forward(mlp, x), forward(x)
    return expected.shape == ours.shape and torch.allclose(ours.float(), expected.float(), rtol=1e-4, atol=1e-5)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        out, rstd = backward.rms_norm_forward(_as_rows(x), weight, eps, offset)
        ctx.save_for_backward(x, rstd)
        ctx.weight, ctx.offset = weight, offset  # frozen: held, not saved
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd = ctx.saved_tensors
        dx = backward.rms_norm_backward(_as_rows(grad.contiguous()), _as_rows(x), rstd, ctx.weight, ctx.offset)
        return dx.view(x.shape), None, None, None


class _ActMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return backward.act_mul_forward(_as_rows(gate), _as_rows(up), act).view(gate.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate, d_up = backward.act_mul_backward(_as_rows(grad.contiguous()), _as_rows(gate), _as_rows(up), ctx.act)
        return d_gate.view(gate.shape), d_up.view(up.shape), None
