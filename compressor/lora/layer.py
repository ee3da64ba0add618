"""LoRA: a frozen base linear layer plus a trainable low-rank update.

``y = base(x) + dropout(x) @ A.T @ B.T * alpha / r``, with ``A`` (r x in) drawn as PEFT draws it
and ``B`` (out x r) zero, so a fresh adapter leaves the model unchanged. The base may be an
``nn.Linear`` or a :class:`~compressor.nn.QuantLinear` whose weight stays packed. Module and
parameter names follow PEFT's (``lora_A.weight``, ``lora_B.weight``) so adapters move between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..choices import DEFAULT_TARGETS
from ..nn import QuantLinear
from .dropout import Dropout
from .product import adapted_product, fused_applies


@dataclass(frozen=True)
class LoraConfig:
    """Shape of an adapter: rank, scaling numerator, dropout, and the module names it adapts."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: alpha / rank."""
        return self.alpha / self.rank


def rank_for(params: int) -> int:
    """The usual rank for a model of ``params`` parameters: 8 under 1B, 16 to 7B, 32 from 13B, 64 from 70B."""
    if params >= 70e9:
        return 64
    if params >= 13e9:
        return 32
    if params >= 1e9:
        return 16
    return 8


class LoraLinear(nn.Module):
    """A frozen ``base`` linear layer with a trainable rank-``r`` update beside it."""

    def __init__(self, base: nn.Module, cfg: LoraConfig):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scaling = cfg.scaling
        self.dropout = Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, cfg.rank, bias=False)
        self.lora_B = nn.Linear(cfg.rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        """The update this adapter adds to the base weight: ``scaling * B @ A``, (out, in) float32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the low-rank term."""
        p = self.dropout.p if self.training and isinstance(self.dropout, Dropout) else 0.0
        if fused_applies(x, p):  # training: one fused product (see product.py)
            return adapted_product(x, self.base, self.lora_A.weight, self.lora_B.weight, self.scaling, p)
        low_rank = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        y = self.base(x)
        return y.add(low_rank.to(y.dtype), alpha=self.scaling)  # one pass: base + scaling * low_rank


def add_lora(model: nn.Module, cfg: LoraConfig) -> dict[str, LoraLinear]:
    """Freeze ``model`` and wrap every linear module whose last name is in ``cfg.targets``; returns them by name."""
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = [name for name, m in model.named_modules() if name.rpartition(".")[2] in cfg.targets and isinstance(m, (nn.Linear, QuantLinear))]
    if not wanted:
        raise ValueError(f"no linear module named {', '.join(cfg.targets)} in the model")
    wrapped = {}
    for name in wanted:
        wrapped[name] = LoraLinear(model.get_submodule(name), cfg)
        model.set_submodule(name, wrapped[name])
    return wrapped
