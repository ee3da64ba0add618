"""LoftQ initialization: an adapter that starts from the quantization error it sits beside.

A fresh adapter (B = 0) leaves the quantized base as it is. LoftQ (Li et al., 2023) instead sets
``scaling * B @ A`` to the best rank-r approximation of ``W - dequantize(Q)``, the part of the float
weight the 4-bit codes lost, so base + fresh adapter is already closer to the float model. The
codes stay as they are (one LoftQ step on a fixed base): the base folder is shared by every tenant.

With calibration text, the approximation is weighted by the layer's inputs: it minimises
``||(R - scaling * B @ A) H^(1/2)||`` with ``H = X^T X / n``, the SVD of ``R H^(1/2)``, so the rank
goes where the activations are large (measured: the README's Adapters section, from
``python -m benchmarks.qlora --loftq``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..checkpoint.reader import find_checkpoint, open_shard
from ..errors import CompressorError
from ..nn import QuantLinear
from ..optimize.calibration import float_model_and_windows, input_moments
from .layer import LoraLinear

# Expected row norm of A under PEFT's Kaiming-uniform init (a = sqrt(5)): each of the n entries has
# variance 1 / (3n).
A_ROW_NORM = 3**-0.5


def initialize(modules: dict[str, LoraLinear], float_dir: Path, calibration: Path | None = None, tokens: int = 16384, seq_len: int = 512) -> None:
    """LoftQ for ``modules`` from the float checkpoint at ``float_dir``, weighted by the inputs over ``calibration`` text when given."""
    if calibration is None:
        loftq_init(modules, float_weights(float_dir, modules))
        return
    # The float model that reads the text also holds the float weights: no second read of them.
    model, windows = float_model_and_windows(float_dir, calibration, tokens, seq_len)
    loftq_init(modules, {name: model.get_submodule(name).weight for name in modules}, input_moments(model, windows, set(modules)))


@torch.no_grad()
def loftq_init(
    modules: dict[str, LoraLinear], weights: Mapping[str, torch.Tensor], moments: dict[str, torch.Tensor] | None = None, damp: float = 0.01
) -> None:
    """Set each module's A and B to the rank-r approximation of its float weight (``weights``, by module) minus its dequantized weight.

    ``moments`` (``X^T X / n`` per module, from calibration text) weights the approximation by the
    module's inputs; ``damp`` keeps directions the text never excited from dominating the inverse.
    """
    for name, module in modules.items():
        if not isinstance(module.base, QuantLinear):
            raise CompressorError(None, f"{name} is not quantized: LoftQ starts from a quantized base's error")
        residual = (weights[name].float() - module.base.weight_dequantized().float()).double()
        rank = module.lora_A.out_features
        hessian = None if moments is None else moments.get(name)
        if hessian is None:
            u, s, directions = torch.linalg.svd(residual, full_matrices=False)
        else:
            h = hessian.double() + damp * hessian.diagonal().mean().double() * torch.eye(hessian.shape[0], dtype=torch.float64)
            values, vectors = torch.linalg.eigh(h)
            u, s, vh = torch.linalg.svd(residual @ (vectors * values.sqrt()) @ vectors.T, full_matrices=False)
            directions = vh[:rank] @ ((vectors / values.sqrt()) @ vectors.T)
        directions = directions[:rank]
        norms = directions.norm(dim=1)
        # A's rows get the norm PEFT's initialisation gives them on average, so the gradient reaching
        # B is as large as for a fresh adapter; B carries the singular values.
        module.lora_A.weight.copy_(A_ROW_NORM * directions / norms[:, None])
        module.lora_B.weight.copy_(u[:, :rank] * (s[:rank] * norms / (A_ROW_NORM * module.scaling)))


def float_weights(float_dir: Path, modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """The float weight of each named module, read from the checkpoint at ``float_dir``."""
    wanted = {f"{name}.weight": name for name in modules}
    found: dict[str, torch.Tensor] = {}
    for shard in find_checkpoint(float_dir).shards:
        with open_shard(shard) as reader:
            found.update({wanted[key]: reader.get(key) for key in reader.keys() if key in wanted})
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise CompressorError(float_dir, f"no float weight for {', '.join(missing[:3])}: is this the checkpoint the base came from?")
    return found
