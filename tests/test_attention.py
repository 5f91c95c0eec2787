"""Attention layers against torch.nn.MultiheadAttention, scaled_dot_product_attention and loops
written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from divekit.errors import DivekitError
from divekit.models.attention import (
    AdditiveAttention,
    DotProductAttention,
    MultiHeadAttention,
    PositionalEncoding,
)


def _loop_attention(scores: torch.Tensor, values: torch.Tensor, lens) -> torch.Tensor:
    """Softmax over each query's first ``len`` keys, by hand; zero output for length 0."""
    b, q, _ = scores.shape
    out = torch.zeros(b, q, values.shape[-1], dtype=values.dtype)
    for i in range(b):
        for j in range(q):
            n = scores.shape[-1] if lens is None else int(lens[i] if lens.dim() == 1 else lens[i, j])
            if n:
                w = torch.softmax(scores[i, j, :n], dim=0)
                out[i, j] = w @ values[i, :n]
    return out


@pytest.mark.parametrize("record", [False, True])
@pytest.mark.parametrize("lens_shape", ["none", "batch", "query"])
def test_dot_product_attention_equals_the_formula(record, lens_shape):
    torch.manual_seed(0)
    b, q, k, d, v = 3, 4, 6, 8, 5
    Q, K, V = torch.randn(b, q, d), torch.randn(b, k, d), torch.randn(b, k, v)
    lens = {"none": None, "batch": torch.tensor([2, 6, 1]),
            "query": torch.randint(1, k + 1, (b, q))}[lens_shape]
    att = DotProductAttention(record_weights=record).eval()
    out = att(Q, K, V, lens)
    ref = _loop_attention(Q @ K.transpose(1, 2) / math.sqrt(d), V, lens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if record:
        assert att.attention_weights.shape == (b, q, k)
        torch.testing.assert_close(att.attention_weights.sum(-1), torch.ones(b, q))
    else:
        assert att.attention_weights is None


def test_a_query_with_no_valid_key_gets_zero_output_not_nan():
    torch.manual_seed(0)
    Q, K, V = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 2)
    lens = torch.tensor([0, 3])
    out = DotProductAttention()(Q, K, V, lens)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _loop_attention(Q @ K.transpose(1, 2) / 2, V, lens), atol=1e-5, rtol=1e-5)


def test_additive_attention_equals_the_formula():
    torch.manual_seed(0)
    b, q, k, dq, dk, h = 2, 3, 5, 6, 4, 7
    Q, K, V = torch.randn(b, q, dq), torch.randn(b, k, dk), torch.randn(b, k, 3)
    att = AdditiveAttention(h, key_size=dk, query_size=dq).eval()
    lens = torch.tensor([2, 5])
    out = att(Q, K, V, lens)
    scores = torch.zeros(b, q, k)
    for i in range(b):
        for j in range(q):
            for m in range(k):
                scores[i, j, m] = att.w_v.weight[0] @ torch.tanh(att.W_q.weight @ Q[i, j] + att.W_k.weight @ K[i, m])
    torch.testing.assert_close(out, _loop_attention(scores, V, lens), atol=1e-5, rtol=1e-5)
    assert att.attention_weights.shape == (b, q, k)


def test_additive_attention_sizes_itself_lazily_as_the_course():
    att = AdditiveAttention(8)
    out = att(torch.randn(2, 1, 20), torch.ones(2, 10, 2), torch.arange(40.0).reshape(1, 10, 4).repeat(2, 1, 1),
              torch.tensor([2, 6]))
    assert out.shape == (2, 1, 4)
    # equal keys → uniform weights over the valid ones (the course's example)
    torch.testing.assert_close(att.attention_weights[0, 0, :2], torch.full((2,), 0.5))
    assert att.attention_weights[0, 0, 2:].abs().max() == 0


@pytest.mark.parametrize("record", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_multi_head_attention_equals_torch_multihead_attention(record, bias):
    torch.manual_seed(0)
    hidden, heads, b, q, k = 16, 4, 3, 5, 7
    ours = MultiHeadAttention(hidden, heads, bias=bias, query_size=hidden, key_size=hidden,
                              value_size=hidden, record_weights=record).eval()
    ref = nn.MultiheadAttention(hidden, heads, bias=bias, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.W_q.weight, ours.W_k.weight, ours.W_v.weight]))
        ref.out_proj.weight.copy_(ours.W_o.weight)
        if bias:
            ref.in_proj_bias.copy_(torch.cat([ours.W_q.bias, ours.W_k.bias, ours.W_v.bias]))
            ref.out_proj.bias.copy_(ours.W_o.bias)
    X, Y = torch.randn(b, q, hidden), torch.randn(b, k, hidden)
    lens = torch.tensor([3, 7, 1])
    out = ours(X, Y, Y, lens)
    padding = torch.arange(k) >= lens[:, None]  # True = ignore
    expected, weights = ref(X, Y, Y, key_padding_mask=padding, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if record:
        torch.testing.assert_close(ours.attention_weights, weights, atol=1e-6, rtol=1e-5)


def test_multi_head_attention_takes_per_query_lengths_and_trains():
    torch.manual_seed(0)
    att = MultiHeadAttention(12, 3, dropout=0.1)
    X = torch.randn(2, 4, 12, requires_grad=True)
    lens = torch.tensor([[1, 2, 3, 4], [4, 4, 2, 1]])  # causal-style masks per query
    out = att(X, X, X, lens)
    out.square().mean().backward()
    assert out.shape == (2, 4, 12) and torch.isfinite(X.grad).all()
    att.eval()
    ref = MultiHeadAttention(12, 3, record_weights=True).eval()
    ref.load_state_dict(att.state_dict())
    torch.testing.assert_close(att(X, X, X, lens), ref(X, X, X, lens), atol=1e-5, rtol=1e-5)
    assert (ref.attention_weights[0, :, 0, 1:] == 0).all()  # query 0 of row 0 sees key 0 only


def test_positional_encoding_equals_the_formula():
    d, t = 10, 30
    pe = PositionalEncoding(d, max_len=50).eval()
    out = pe(torch.zeros(1, t, d))
    for i in (0, 1, 7, 29):
        for j in range(d // 2):
            angle = i / 10000 ** (2 * j / d)
            assert out[0, i, 2 * j].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert out[0, i, 2 * j + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    with pytest.raises(DivekitError, match="longer than max_len"):
        pe(torch.zeros(1, 51, d))


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(DivekitError, match="multiple of num_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(DivekitError, match="do not fit"):
        DotProductAttention()(torch.randn(1, 2, 3), torch.randn(1, 4, 5), torch.randn(1, 4, 2))
    with pytest.raises(DivekitError, match="valid_lens must have shape"):
        DotProductAttention()(torch.randn(2, 2, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 2),
                              torch.tensor([1, 2, 3]))


def test_bf16_autocast_runs():
    att = MultiHeadAttention(8, 2, query_size=8, key_size=8, value_size=8)
    X = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = att(X, X, X, torch.tensor([2, 3]))
    assert torch.isfinite(out.float()).all()


def test_attention_heat_maps_are_saved_for_one_or_many_heads(tmp_path):
    from PIL import Image

    from divekit.viz import plot_attention

    att = MultiHeadAttention(8, 2, query_size=8, key_size=8, value_size=8, record_weights=True).eval()
    X = torch.randn(1, 5, 8)
    att(X, X, X, torch.tensor([3]))
    one = plot_attention(att.attention_weights[0, 0], tmp_path / "one.png", xticks=list("abcde"))
    heads = plot_attention(att.attention_weights[0], tmp_path / "heads.png", titles=["head 1", "head 2"])
    grid = plot_attention(att.attention_weights, tmp_path / "grid.png")
    sizes = [Image.open(p).size for p in (one, heads, grid)]
    assert all(w > 50 and h > 50 for w, h in sizes)
    assert sizes[1][0] > sizes[0][0]  # two panels side by side
    with pytest.raises(DivekitError, match=r"attention weights must be \(H, W\), \(C, H, W\)"):
        plot_attention(torch.zeros(5), tmp_path / "bad.png")
