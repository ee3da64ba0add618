import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from compressor.native import ops


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_matches_the_torch_formula_with_either_weight_form(offset):
    x, w = torch.randn(7, 96), torch.randn(96)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (w + offset)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, torch.empty_like(x), offset), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act,reference", [(ops.SILU, F.silu), (ops.GELU_TANH, lambda g: F.gelu(g, approximate="tanh"))])
def test_act_mul_gates_up_by_the_activation_of_gate(act, reference):
    gate_up = torch.randn(5, 2 * 70) * 5
    out = ops.act_mul(gate_up, 70, act, torch.empty(5, 70))
    torch.testing.assert_close(out, reference(gate_up[:, :70]) * gate_up[:, 70:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary_dim", [64, 32])  # 32 of 64: partial rotary (Phi-4 mini's form)
def test_rope_is_transformers_rotate_half_on_the_leading_dims(rotary_dim):
    q, cos, sin = torch.randn(3, 2, 64), torch.randn(3, rotary_dim), torch.randn(3, rotary_dim)
    ours = q.reshape(3, -1).clone()
    ops.rope(ours, 2, 64, cos, sin)
    rotated, passed = q[..., :rotary_dim], q[..., rotary_dim:]
    expected, _ = apply_rotary_pos_emb(rotated.transpose(0, 1)[None], rotated.transpose(0, 1)[None], cos[None], sin[None])
    expected = torch.cat([expected[0].transpose(0, 1), passed], dim=-1)
    torch.testing.assert_close(ours.view(3, 2, 64), expected, rtol=1e-6, atol=1e-6)


def _reference(q, keys, values, past, scale, softcap=0.0, window=0):
    # q (new, heads, dim); keys/values (kv_heads, past + new, dim): causal attention by the textbook.
    new, heads, dim = q.shape
    group = heads // keys.shape[0]
    k, v = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = torch.einsum("thd,hsd->hts", q, k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    pos = torch.arange(past, past + new)[:, None]
    seen = torch.arange(past + new)[None]
    allowed = (seen <= pos) & ((seen > pos - window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hts,hsd->thd", scores.softmax(-1), v)


@pytest.mark.parametrize("softcap,window", [(0.0, 0), (30.0, 0), (0.0, 5)])
def test_attention_writes_the_cache_and_matches_causal_softmax_attention_per_sequence(softcap, window):
    heads, kv_heads, dim = 4, 2, 16
    g = torch.Generator().manual_seed(0)
    plans = [(0, 6), (9, 1), (3, 4)]  # (cached positions, new tokens) per sequence
    caches = [(torch.randn(kv_heads, 16, dim, generator=g), torch.randn(kv_heads, 16, dim, generator=g)) for _ in plans]
    rows = sum(n for _, n in plans)
    q, k, v = (torch.randn(rows, h * dim, generator=g) for h in (heads, kv_heads, kv_heads))
    starts = np.cumsum([0] + [n for _, n in plans])
    out = torch.empty(rows, heads * dim)
    ops.attention(q, k, v, starts, np.array([p for p, _ in plans]), [c[0] for c in caches], [c[1] for c in caches], heads, 0.25, out,
                  softcap=softcap, window=window)  # fmt: skip
    for b, (past, n) in enumerate(plans):
        rows_b = slice(starts[b], starts[b + 1])
        keys, values = caches[b][0][:, : past + n], caches[b][1][:, : past + n]
        assert torch.equal(keys[:, past:], k[rows_b].view(n, kv_heads, dim).transpose(0, 1))
        expected = _reference(q[rows_b].view(n, heads, dim), keys, values, past, 0.25, softcap, window)
        torch.testing.assert_close(out[rows_b].view(n, heads, dim), expected, rtol=1e-5, atol=1e-5)


def test_a_sequences_attention_does_not_depend_on_the_others_in_the_call():
    heads, dim = 2, 16
    g = torch.Generator().manual_seed(1)
    caches = [(torch.randn(1, 8, dim, generator=g), torch.randn(1, 8, dim, generator=g)) for _ in range(3)]
    q, k, v = torch.randn(3, heads * dim, generator=g), torch.randn(3, dim, generator=g), torch.randn(3, dim, generator=g)
    together = torch.empty(3, heads * dim)
    ops.attention(q, k, v, np.arange(4), np.array([5, 2, 7]), [c[0] for c in caches], [c[1] for c in caches], heads, 0.25, together)
    alone = torch.empty(1, heads * dim)
    ops.attention(q[1:2], k[1:2], v[1:2], np.arange(2), np.array([2]), [caches[1][0]], [caches[1][1]], heads, 0.25, alone)
    assert torch.equal(alone, together[1:2])


@pytest.mark.parametrize("window", [0, 21])
def test_attention_over_long_caches_gives_the_portable_builds_bits(window):
    # Past 16 positions the scores take a 16-at-a-time path on AVX-512; it must sum as the plain loop does.
    heads, kv_heads, dim = 6, 2, 64
    g = torch.Generator().manual_seed(2)
    plans = [(0, 3), (37, 1), (60, 2)]
    rows = sum(n for _, n in plans)
    q, k, v = (torch.randn(rows, h * dim, generator=g) for h in (heads, kv_heads, kv_heads))
    starts, past = np.cumsum([0] + [n for _, n in plans]), np.array([p for p, _ in plans])
    outs = []
    for portable in (False, True):
        caches = [(torch.randn(kv_heads, 64, dim, generator=torch.Generator().manual_seed(b)),
                   torch.randn(kv_heads, 64, dim, generator=torch.Generator().manual_seed(10 + b))) for b in range(3)]  # fmt: skip
        out = torch.empty(rows, heads * dim)
        ops.attention(q, k, v, starts, past, [c[0] for c in caches], [c[1] for c in caches], heads, 0.125, out, window=window,
                      portable=portable)  # fmt: skip
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
