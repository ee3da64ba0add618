"""Calibration gathers each layer's input second moments, shared by layers that read the same tensor."""

import torch

from compressor.optimize.calibration import input_moments
from tests.helpers import tiny_model


def test_moments_are_x_transpose_x_over_the_token_count():
    model = tiny_model()
    windows = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    names = {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n in names]  # fmt: skip
    moments = input_moments(model, windows, names)
    for h in hooks:
        h.remove()
    for name in names:
        x = torch.cat(seen[name])
        torch.testing.assert_close(moments[name], x.T @ x / 48, rtol=1e-5, atol=1e-6)


def test_layers_reading_the_same_input_share_one_matrix():
    model = tiny_model()
    windows = torch.randint(0, 320, (2, 8), generator=torch.Generator().manual_seed(1))
    names = {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj")}
    moments = input_moments(model, windows, names)
    assert moments["model.layers.0.self_attn.q_proj"] is moments["model.layers.0.self_attn.k_proj"]
    assert moments["model.layers.1.mlp.gate_proj"] is moments["model.layers.1.mlp.up_proj"]
    assert moments["model.layers.0.self_attn.q_proj"] is not moments["model.layers.1.self_attn.q_proj"]
