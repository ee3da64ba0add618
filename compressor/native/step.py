"""A decoder step in one native call (``step.c``), and the adapter term it adds, described for C.

``step.c`` runs every layer of a step on the kernels of ``matmul.c`` and ``ops.c``, calling them
exactly as a Python loop over layers would: same kernels, same rows, same bits, without the
interpreter between them. The structures here mirror its ``lora_t``, ``norm_t``, ``linear_t``,
``layer_t``, ``model_t`` and ``step_t`` field for field; callers (``compressor.inference.decoder``) fill them once
per model, per adapter and per step, and keep alive every tensor they point into.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from . import library
from .matmul import KernelWeight, all_cores

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float

# step.c's module slots in a layer, and its timed phases (in step_t.timings order).
SLOTS = 7
Q, O, GATE, DOWN = 0, 3, 4, 6
PHASES = ("norms", "q, k, v projections", "rotary", "attention", "o projection", "gate, up projections", "activation", "down projection")


class Lora(ctypes.Structure):
    """One adapter's term at one module: A ``(rank, in)``, B transposed ``(rank, out)``, scaling; ``a`` NULL: no term."""

    _fields_ = [("a", _P), ("b_t", _P), ("rank", _I64), ("scaling", _F32)]


class Norm(ctypes.Structure):
    """An RMSNorm: ``x / rms(x) * (weight + offset)``; ``weight`` NULL: absent."""

    _fields_ = [("weight", _P), ("eps", _F32), ("offset", _F32)]


class Linear(ctypes.Structure):
    """A module's product: its kernel weight, bias, first output column in its group's buffer, and activation mode."""

    _fields_ = [("w", _P), ("bias", _P), ("offset", _I64), ("int8", _I32)]


class Layer(ctypes.Structure):
    """One decoder layer (see ``step.c``)."""

    _fields_ = [
        ("n_qkv", _I32), ("n_gate_up", _I32), ("linear", Linear * SLOTS),
        ("attn_norm", Norm), ("q_norm", Norm), ("k_norm", Norm), ("attn_out_norm", Norm), ("mlp_norm", Norm), ("mlp_out_norm", Norm),
        ("inter", _I64), ("act", _I32), ("window", _I32), ("scale", _F32), ("softcap", _F32), ("rotary", _I32),
    ]  # fmt: skip


class Model(ctypes.Structure):
    """The model's shape and its layers."""

    _fields_ = [("n_layers", _I64), ("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64), ("rotary_dim", _I64),
                ("layers", ctypes.POINTER(Layer))]  # fmt: skip


class Step(ctypes.Structure):
    """One step's rows, adapters and caches (see ``step.c``)."""

    _fields_ = [
        ("rows", _I64), ("nseq", _I64), ("h", _P), ("group", _P), ("tables", _P), ("cos", _P), ("sin", _P),
        ("seq_start", _P), ("past", _P), ("keys", _P), ("values", _P), ("capacity", _P), ("threads", _I32), ("timings", _P),
    ]  # fmt: skip


def _address(t) -> int | None:
    if t is None:
        return None
    return t.data_ptr() if isinstance(t, torch.Tensor) else t.ctypes.data


def lora(a: np.ndarray, b_t: np.ndarray, scaling: float) -> Lora:
    """The description of an adapter term (the arrays must outlive it)."""
    return Lora(a.ctypes.data, b_t.ctypes.data, a.shape[0], scaling)


def norm(weight: torch.Tensor | None, eps: float = 0.0, offset: float = 0.0) -> Norm:
    """The description of an RMSNorm (None: absent)."""
    return Norm(_address(weight), eps, offset)


def linear(weight: KernelWeight, bias: torch.Tensor | None, offset: int, int8: bool) -> Linear:
    """The description of a product into its group's buffer from column ``offset``."""
    return Linear(ctypes.addressof(weight.described), _address(bias), offset, int(int8))


def lora_add(x: np.ndarray, term: Lora, rows: np.ndarray, y: np.ndarray, threads: int | None = None) -> None:
    """``y[i] += scaling * (x[i] @ A.T) @ B.T`` for each listed row ``i``, computed as the step computes it."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    library().lora_add(x.ctypes.data, x.strides[0] // 4, rows.ctypes.data, rows.size, ctypes.byref(term), x.shape[1], y.shape[1],
                       y.ctypes.data, y.strides[0] // 4, threads or all_cores())  # fmt: skip


def run(model: Model, step: Step) -> None:
    """Every layer of ``model`` over ``step``'s rows (``step.h`` updated in place, the caches written)."""
    library().decoder_step(ctypes.byref(model), ctypes.byref(step))
