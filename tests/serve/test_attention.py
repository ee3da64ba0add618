import pytest
import torch
import torch.nn.functional as F

from serve.attention import SequenceKV, StepKV, check_supported, ragged_attention
from tests.helpers import CONFIGS


class Layer:
    layer_idx = 0


def causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_each_row_attends_over_exactly_its_own_history():
    heads, kv_heads, dim = 4, 2, 8
    lengths = [5, 2, 9]
    full = {n: (torch.randn(1, heads, n + 1, dim), torch.randn(1, kv_heads, n + 1, dim), torch.randn(1, kv_heads, n + 1, dim)) for n in lengths}
    caches = [SequenceKV(1, kv_heads, dim, torch.float32, capacity=2) for _ in lengths]
    for cache, n in zip(caches, lengths):  # prefill each alone: capacity 2 forces growth
        q, k, v = (t[:, :, :n] for t in full[n])
        out, _ = ragged_attention(Layer(), q, k, v, None, kv=StepKV([cache]))
        StepKV([cache]).advance(n)
        torch.testing.assert_close(out[0].transpose(0, 1), causal(q, k, v)[0])
    # One decode step for all three.
    q, k, v = (torch.cat([full[n][i][:, :, n:] for n in lengths]) for i in range(3))
    out, _ = ragged_attention(Layer(), q, k, v, None, kv=StepKV(caches))
    for row, n in enumerate(lengths):
        torch.testing.assert_close(out[row, 0], causal(*full[n])[0, :, -1])


def test_sliding_window_and_softcapping_models_are_refused():
    check_supported(CONFIGS["llama"]())
    with pytest.raises(ValueError, match="sliding-window"):
        check_supported(CONFIGS["mistral"]())
