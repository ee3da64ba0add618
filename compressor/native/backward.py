"""RMSNorm and the gated activation for training (``backward.c``): forwards that keep what the backward needs, and the backwards.

Tensors are float32 rows: ``(rows, width)`` with the last dimension contiguous; gate and up may be
the two halves of one ``(rows, 2 * width)`` tensor. Outputs are new contiguous tensors, from
:func:`compressor.memory.empty` (a training step's pool, where one is active).
"""

from __future__ import annotations

import torch

from ..memory import empty
from . import library
from .matmul import all_cores
from .ops import float_rows


def _dense(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"expected a contiguous tensor, got {tuple(t.shape)} strides {t.stride()}")
    return float_rows(t)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x / rms(x) * (weight + offset)`` for contiguous rows ``x``, and each row's ``1 / rms(x)``."""
    _dense(x)
    out, rstd = empty(x.shape), torch.empty(x.shape[0])
    library().rms_norm_forward(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), offset, eps, out.data_ptr(), rstd.data_ptr(),
                               all_cores())  # fmt: skip
    return out, rstd


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.Tensor:
    """The gradient with respect to ``x`` of :func:`rms_norm_forward` (the weight frozen)."""
    _dense(grad), _dense(x)
    dx = empty(x.shape)
    library().rms_norm_backward(grad.data_ptr(), x.data_ptr(), rstd.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), offset,
                                dx.data_ptr(), all_cores())  # fmt: skip
    return dx


def act_mul_forward(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    """``act(gate) * up`` (``act`` one of :data:`compressor.native.ops.ACTIVATIONS`' values)."""
    float_rows(gate), float_rows(up)
    out = empty(gate.shape)
    library().act_mul_forward(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), gate.shape[0], gate.shape[1], act,
                              out.data_ptr(), all_cores())  # fmt: skip
    return out


def act_mul_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients with respect to ``gate`` and ``up`` of :func:`act_mul_forward`."""
    float_rows(gate), float_rows(up), _dense(grad)
    d_gate, d_up = empty(gate.shape), empty(gate.shape)
    library().act_mul_backward(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), grad.data_ptr(), gate.shape[0],
                               gate.shape[1], act, d_gate.data_ptr(), d_up.data_ptr(), all_cores())  # fmt: skip
    return d_gate, d_up
