"""The book's networks (``divekit.compat.d2l``): attention against ``torch.nn.MultiheadAttention``
and brute-force loops written here from the formulas, masks and the masked loss against loops,
RNN models against running the layers by hand, encoder-decoder subclasses written the way the
chapters write them, BERT and ResNet shapes, and the book's signatures."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divekit.compat import d2l
from divekit.compat.d2l import _models
from divekit.errors import DivekitError
from divekit.models.bert import BertConfig
from divekit.models.bert_checkpoint import config_to_checkpoint
from divekit.ops.conv import conv_matrix

API = Path(__file__).resolve().parents[2] / "shared" / "book" / "API.md"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------ masks


def test_sequence_mask_matches_a_loop():
    g = gen(1)
    X = randn(4, 6, 3, g=g)
    valid = torch.tensor([0, 2, 6, 9])
    for value in (0, -1.5):
        Y = d2l.sequence_mask(X, valid, value)
        for b in range(4):
            for t in range(6):
                want = X[b, t] if t < valid[b] else torch.full((3,), float(value))
                assert torch.equal(Y[b, t], want)
    ints = torch.arange(6).reshape(2, 3)
    assert d2l.sequence_mask(ints, torch.tensor([1, 2])).tolist() == [[0, 0, 0], [3, 4, 0]]


def _softmax_prefix(scores: list[float], n: int) -> list[float]:
    """softmax over the first n scores, 0 after them (all zero when n is 0)."""
    if n == 0:
        return [0.0] * len(scores)
    top = max(scores[:n])
    e = [math.exp(s - top) for s in scores[:n]]
    return [x / sum(e) for x in e] + [0.0] * (len(scores) - n)


def test_masked_softmax_matches_brute_force():
    g = gen(2)
    X = randn(3, 2, 5, g=g, dtype=torch.float64)
    for valid in (torch.tensor([1, 3, 5]), torch.tensor([[2, 4], [5, 1], [3, 3]])):
        W = d2l.masked_softmax(X, valid)
        for b in range(3):
            for q in range(2):
                n = int(valid[b] if valid.dim() == 1 else valid[b, q])
                want = torch.tensor(_softmax_prefix(X[b, q].tolist(), n), dtype=torch.float64)
                assert torch.allclose(W[b, q], want, atol=1e-12)
    assert torch.allclose(d2l.masked_softmax(X, None), torch.softmax(X, -1))
    # a row with nothing valid attends to nothing (the book's makes it uniform over padding)
    assert torch.equal(d2l.masked_softmax(X, torch.tensor([0, 1, 1]))[0], torch.zeros(2, 5))


# ------------------------------------------------------------------------------ attention


def test_dot_product_attention_matches_brute_force_and_keeps_weights():
    g = gen(3)
    B, Q, K, d, v = 2, 3, 5, 4, 6
    q, k, val = randn(B, Q, d, g=g), randn(B, K, d, g=g), randn(B, K, v, g=g)
    attention = d2l.DotProductAttention(dropout=0.5).eval()
    for valid in (torch.tensor([2, 5]), torch.tensor([[1, 2, 3], [5, 4, 2]]), None):
        out = attention(q, k, val, valid)
        assert out.shape == (B, Q, v)
        assert attention.attention_weights.shape == (B, Q, K)
        for b in range(B):
            for i in range(Q):
                n = K if valid is None else int(valid[b] if valid.dim() == 1 else valid[b, i])
                scores = [float(q[b, i] @ k[b, j]) / math.sqrt(d) for j in range(K)]
                w = torch.tensor(_softmax_prefix(scores, n))
                assert torch.allclose(attention.attention_weights[b, i], w, atol=1e-6)
                assert torch.allclose(out[b, i], (w[:, None] * val[b]).sum(0), atol=1e-5)


def test_additive_attention_matches_the_formula():
    g = gen(4)
    B, Q, K, dq, dk, h, v = 2, 2, 4, 5, 3, 7, 2
    attention = d2l.AdditiveAttention(key_size=dk, query_size=dq, num_hiddens=h, dropout=0.1).eval()
    q, k, val = randn(B, Q, dq, g=g), randn(B, K, dk, g=g), randn(B, K, v, g=g)
    valid = torch.tensor([2, 4])
    with torch.no_grad():
        out = attention(q, k, val, valid)
    Wq, Wk, wv = (w.detach() for w in (attention.W_q.weight, attention.W_k.weight,
                                       attention.w_v.weight[0]))
    for b in range(B):
        for i in range(Q):
            scores = [float(wv @ torch.tanh(Wq @ q[b, i] + Wk @ k[b, j])) for j in range(K)]
            w = torch.tensor(_softmax_prefix(scores, int(valid[b])))
            assert torch.allclose(attention.attention_weights[b, i], w, atol=1e-6)
            assert torch.allclose(out[b, i], (w[:, None] * val[b]).sum(0), atol=1e-5)


def _torch_mha(ours: d2l.MultiHeadAttention, num_hiddens: int, num_heads: int, key_size: int,
               value_size: int, bias: bool) -> nn.MultiheadAttention:
    """torch.nn.MultiheadAttention holding the same weights as ``ours``."""
    ref = nn.MultiheadAttention(num_hiddens, num_heads, bias=bias, kdim=key_size, vdim=value_size,
                                batch_first=True).eval()
    with torch.no_grad():
        if ref._qkv_same_embed_dim:
            ref.in_proj_weight.copy_(torch.cat([ours.W_q.weight, ours.W_k.weight, ours.W_v.weight]))
        else:
            ref.q_proj_weight.copy_(ours.W_q.weight)
            ref.k_proj_weight.copy_(ours.W_k.weight)
            ref.v_proj_weight.copy_(ours.W_v.weight)
        ref.out_proj.weight.copy_(ours.W_o.weight)
        if bias:
            ref.in_proj_bias.copy_(torch.cat([ours.W_q.bias, ours.W_k.bias, ours.W_v.bias]))
            ref.out_proj.bias.copy_(ours.W_o.bias)
    return ref


@pytest.mark.parametrize("key_size, value_size, bias", [(12, 12, False), (5, 7, True)])
def test_multihead_attention_matches_torch(key_size, value_size, bias):
    g = gen(5)
    B, Q, K, H, heads = 3, 4, 6, 12, 3
    ours = d2l.MultiHeadAttention(key_size, H, value_size, H, heads, 0.5, bias).eval()
    ref = _torch_mha(ours, H, heads, key_size, value_size, bias)
    q, k, v = randn(B, Q, H, g=g), randn(B, K, key_size, g=g), randn(B, K, value_size, g=g)

    valid = torch.tensor([2, 6, 4])
    out = ours(q, k, v, valid)
    pad = torch.arange(K) >= valid[:, None]  # (B, K), True = not attended
    want, want_w = ref(q, k, v, key_padding_mask=pad, need_weights=True,
                       average_attn_weights=False)
    assert torch.allclose(out, want, atol=1e-5)
    weights = ours.attention.attention_weights  # the book's (B * heads, Q, K) layout
    assert weights.shape == (B * heads, Q, K)
    assert torch.allclose(weights.reshape(B, heads, Q, K), want_w, atol=1e-6)

    per_query = torch.tensor([[1, 2, 3, 4], [6, 5, 4, 3], [2, 2, 6, 1]])  # (B, Q)
    out = ours(q, k, v, per_query)
    mask = torch.arange(K) >= per_query[..., None]  # (B, Q, K)
    want, _ = ref(q, k, v, attn_mask=mask.repeat_interleave(heads, dim=0))
    assert torch.allclose(out, want, atol=1e-5)

    out = ours(q, k, v, None)
    assert torch.allclose(out, ref(q, k, v, need_weights=False)[0], atol=1e-5)


def test_transpose_qkv_and_output_are_the_head_split():
    g = gen(6)
    X = randn(2, 5, 12, g=g)
    Y = d2l.transpose_qkv(X, 3)
    assert Y.shape == (6, 5, 4)
    for b in range(2):
        for h in range(3):
            assert torch.equal(Y[b * 3 + h], X[b, :, h * 4:(h + 1) * 4])
    assert torch.equal(d2l.transpose_output(Y, 3), X)


def test_positional_encoding_is_the_sin_cos_formula():
    d, max_len = 6, 50
    pe = d2l.PositionalEncoding(d, 0.0, max_len).eval()
    assert pe.P.shape == (1, max_len, d)
    for i in (0, 1, 7, 49):
        for j in range(d // 2):
            angle = i / 10000 ** (2 * j / d)
            assert math.isclose(pe.P[0, i, 2 * j], math.sin(angle), abs_tol=1e-5)
            assert math.isclose(pe.P[0, i, 2 * j + 1], math.cos(angle), abs_tol=1e-5)
    X = torch.ones(2, 9, d)
    assert torch.allclose(pe(X), X + pe.P[:, :9])


# ------------------------------------------------------------------------------ Transformer encoder


def test_addnorm_ffn_and_encoder_block_shapes():
    add_norm = d2l.AddNorm([3, 4], 0.5).eval()  # normalising over (T, H), as the book shows
    X = torch.ones(2, 3, 4)
    assert add_norm(X, X).shape == (2, 3, 4)
    ffn = d2l.PositionWiseFFN(4, 4, 8).eval()
    assert ffn(X).shape == (2, 3, 8)
    valid = torch.tensor([3, 2])
    for norm_shape in ([10, 8], [8], 8):
        blk = d2l.EncoderBlock(8, 8, 8, 8, norm_shape, 8, 16, 2, 0.5).eval()
        assert blk(torch.ones(2, 10, 8), valid).shape == (2, 10, 8)
        assert blk.attention.attention.attention_weights.shape == (4, 10, 10)


def test_transformer_encoder_keeps_each_blocks_attention():
    torch.manual_seed(0)
    enc = d2l.TransformerEncoder(30, 8, 8, 8, 8, [8], 8, 16, 2, 3, 0.5).eval()
    assert isinstance(enc, d2l.Encoder)
    X = torch.randint(0, 30, (2, 7))
    valid = torch.tensor([4, 7])
    out = enc(X, valid)
    assert out.shape == (2, 7, 8)
    assert len(enc.attention_weights) == 3
    for w in enc.attention_weights:
        assert w.shape == (2 * 2, 7, 7)
        assert torch.allclose(w.sum(-1), torch.ones(4, 7))
        assert torch.equal(w[:2, :, 4:], torch.zeros(2, 7, 3))  # sequence 0's padding
    # the transformer section stacks them per layer and head
    stacked = torch.cat(enc.attention_weights, 0).reshape((3, 2, -1, 7))
    assert stacked.shape == (3, 2, 14, 7)


# ------------------------------------------------------------------------------ encoder-decoder


class GRUDecoder(d2l.Decoder):
    """A decoder written against the book's interface: the encoder's last state starts the GRU
    and the top layer's last state is a context fed at every step."""

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, **kwargs):
        super().__init__(**kwargs)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers)
        self.dense = nn.Linear(num_hiddens, vocab_size)

    def init_state(self, enc_outputs, *args):
        return enc_outputs[1]

    def forward(self, X, state):
        emb = self.embedding(X).permute(1, 0, 2)  # (T, B, E)
        context = state[-1].unsqueeze(0).expand(emb.shape[0], -1, -1)
        out, state = self.rnn(torch.cat((emb, context), dim=2), state)
        return self.dense(out).permute(1, 0, 2), state


class AttentionGRUDecoder(d2l.AttentionDecoder):
    """A decoder with additive attention over the encoder's outputs, one step at a time."""

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, **kwargs):
        super().__init__(**kwargs)
        self.attention = d2l.AdditiveAttention(num_hiddens, num_hiddens, num_hiddens, 0.0)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers)
        self.dense = nn.Linear(num_hiddens, vocab_size)
        self._weights = []

    def init_state(self, enc_outputs, enc_valid_lens, *args):
        outputs, hidden = enc_outputs
        return outputs.permute(1, 0, 2), hidden, enc_valid_lens

    def forward(self, X, state):
        enc_outputs, hidden, valid = state
        outs, self._weights = [], []
        for x in self.embedding(X).permute(1, 0, 2):
            context = self.attention(hidden[-1].unsqueeze(1), enc_outputs, enc_outputs, valid)
            out, hidden = self.rnn(torch.cat((context, x.unsqueeze(1)), -1).permute(1, 0, 2),
                                   hidden)
            outs.append(out)
            self._weights.append(self.attention.attention_weights)
        return self.dense(torch.cat(outs, 0)).permute(1, 0, 2), [enc_outputs, hidden, valid]

    @property
    def attention_weights(self):
        return self._weights


def test_seq2seq_encoder_shapes():
    enc = d2l.Seq2SeqEncoder(vocab_size=10, embed_size=8, num_hiddens=16, num_layers=2).eval()
    assert isinstance(enc, d2l.Encoder)
    output, state = enc(torch.zeros((4, 7), dtype=torch.long))
    assert output.shape == (7, 4, 16) and state.shape == (2, 4, 16)


@pytest.mark.parametrize("decoder_type", [GRUDecoder, AttentionGRUDecoder])
def test_chapter_style_subclasses_run_through_encoder_decoder(decoder_type):
    torch.manual_seed(1)
    V, B, T_src, T = 11, 3, 5, 4
    net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(V, 6, 8, 2), decoder_type(V, 6, 8, 2)).eval()
    src = torch.randint(0, V, (B, T_src))
    tgt = torch.randint(0, V, (B, T))
    valid = torch.tensor([5, 2, 3])
    with torch.no_grad():
        Y, state = net(src, tgt, valid)
        assert Y.shape == (B, T, V)
        # divekit's incremental protocol runs on them: one token at a time gives the
        # teacher-forced logits (all steps with attention; the first step of GRUDecoder, whose
        # context is whatever state it is handed, as the book's first decoder)
        step_state = net.encode(src, valid)
        steps = T if decoder_type is AttentionGRUDecoder else 1
        for t in range(steps):
            logits, step_state = net.decode_step(tgt[:, t], step_state)
            assert torch.allclose(logits, Y[:, t], atol=1e-5)
    if decoder_type is AttentionGRUDecoder:
        assert len(net.decoder.attention_weights) == 1  # the last call was one step
        w = net.decoder.attention_weights[0]
        assert w.shape == (B, 1, T_src) and torch.equal(w[1, 0, 2:], torch.zeros(3))


def test_interfaces_raise_until_subclassed():
    with pytest.raises(NotImplementedError):
        d2l.Encoder()(torch.zeros(1))
    with pytest.raises(NotImplementedError):
        d2l.Decoder().init_state(None)
    with pytest.raises(NotImplementedError):
        d2l.AttentionDecoder().attention_weights  # noqa: B018
    with pytest.raises(TypeError):
        d2l.Seq2SeqEncoder(10, 8, 16, 2, unknown=1)


def test_masked_softmax_ce_loss_matches_per_token_cross_entropy():
    g = gen(7)
    B, T, V = 3, 4, 6
    pred = randn(B, T, V, g=g)
    label = torch.randint(0, V, (B, T), generator=g)
    valid = torch.tensor([4, 2, 0])
    loss = d2l.MaskedSoftmaxCELoss()
    assert isinstance(loss, nn.CrossEntropyLoss)
    got = loss(pred, label, valid)
    for b in range(B):
        terms = [F.cross_entropy(pred[b, t][None], label[b, t][None]) if t < valid[b]
                 else torch.tensor(0.0) for t in range(T)]
        assert torch.allclose(got[b], torch.stack(terms).sum() / T, atol=1e-6)
    assert loss.reduction == "mean"  # the module's own setting is left alone


def test_masked_softmax_ce_loss_rows_equal_the_books_permuted_form():
    """Computed on (B*T, V) rows: the values and gradients of the book's
    cross_entropy(pred.permute(0, 2, 1), label), class weights, label smoothing and an
    ignored index included."""
    g = gen(8)
    B, T, V = 4, 5, 7
    label = torch.randint(0, V, (B, T), generator=g)
    valid = torch.tensor([5, 3, 1, 0])
    for kwargs in ({}, {"weight": torch.rand(V, generator=g) + 0.5},
                   {"label_smoothing": 0.1, "ignore_index": 2}):
        pred = randn(B, T, V, g=g).requires_grad_()
        got = d2l.MaskedSoftmaxCELoss(**kwargs)(pred, label, valid)
        (grad,) = torch.autograd.grad(got.sum(), pred)
        ref_pred = pred.detach().clone().requires_grad_()
        mask = (torch.arange(T)[None] < valid[:, None]).float()
        per_token = F.cross_entropy(ref_pred.permute(0, 2, 1), label, reduction="none", **kwargs)
        ref = (per_token * mask).mean(dim=1)
        (ref_grad,) = torch.autograd.grad(ref.sum(), ref_pred)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(grad, ref_grad)


# ------------------------------------------------------------------------------ RNN models


def test_rnn_model_with_gru_matches_the_layer_and_a_dense_layer():
    torch.manual_seed(2)
    V, H, B, T = 7, 5, 3, 4
    layer = nn.GRU(V, H)
    net = d2l.RNNModel(layer, vocab_size=V).eval()
    assert net.rnn is layer and isinstance(net.linear, nn.Linear)
    assert (net.num_hiddens, net.num_directions, net.vocab_size) == (H, 1, V)
    X = torch.randint(0, V, (B, T))
    state = net.begin_state(device="cpu", batch_size=B)
    assert state.shape == (1, B, H) and not state.any()
    state = torch.randn(1, B, H)
    Y, new_state = net(X, state)
    outs, want_state = layer(F.one_hot(X.T, V).float(), state)  # (T, B, H)
    want = outs.reshape(-1, H) @ net.linear.weight.T + net.linear.bias  # (T * B, V)
    assert Y.shape == (T * B, V)
    assert torch.allclose(Y, want, atol=1e-6) and torch.allclose(new_state, want_state)


def test_rnn_model_with_a_deep_bidirectional_lstm():
    V, H, B, T = 6, 4, 2, 5
    net = d2l.RNNModel(nn.LSTM(V, H, 2, bidirectional=True), V)
    assert net.num_directions == 2 and net.linear.in_features == 2 * H
    h, c = net.begin_state("cpu", batch_size=B)
    assert h.shape == c.shape == (4, B, H)
    Y, (h, c) = net(torch.randint(0, V, (B, T)), (h, c))
    assert Y.shape == (T * B, V) and h.shape == (4, B, H)
    assert net.begin_state("cpu")[0].shape == (4, 1, H)


def test_rnn_model_scratch_runs_the_learners_functions():
    V, H, B, T = 5, 3, 2, 4

    def get_params(vocab_size, num_hiddens, device):
        g = gen(8)
        params = [randn(vocab_size, num_hiddens, g=g) * 0.1, randn(num_hiddens, num_hiddens, g=g) * 0.1,
                  torch.zeros(num_hiddens), randn(num_hiddens, vocab_size, g=g) * 0.1,
                  torch.zeros(vocab_size)]
        return [p.to(device).requires_grad_(True) for p in params]

    def init_state(batch_size, num_hiddens, device):
        return (torch.zeros((batch_size, num_hiddens), device=device),)

    def tanh_rnn(inputs, state, params):
        W_xh, W_hh, b_h, W_hq, b_q = params
        (Hs,) = state
        outputs = []
        for x in inputs:
            Hs = torch.tanh(x @ W_xh + Hs @ W_hh + b_h)
            outputs.append(Hs @ W_hq + b_q)
        return torch.cat(outputs, dim=0), (Hs,)

    net = d2l.RNNModelScratch(V, H, "cpu", get_params, init_state, tanh_rnn)
    assert not isinstance(net, nn.Module) and len(net.params) == 5
    X = torch.arange(B * T).reshape(B, T) % V
    state = net.begin_state(B, "cpu")
    Y, (H_last,) = net(X, state)
    assert Y.shape == (T * B, V) and H_last.shape == (B, H)
    want, _ = tanh_rnn(F.one_hot(X.T, V).float(), state, net.params)
    assert torch.equal(Y, want)
    Y.sum().backward()
    assert all(p.grad is not None for p in net.params)


# ------------------------------------------------------------------------------ BERT

SMALL = dict(vocab_size=20, num_hiddens=16, norm_shape=[16], ffn_num_input=16, ffn_num_hiddens=32,
             num_heads=2, num_layers=2, dropout=0.2, max_len=12, key_size=16, query_size=16,
             value_size=16)


def test_get_tokens_and_segments():
    assert d2l.get_tokens_and_segments(["a", "b"]) == (["<cls>", "a", "b", "<sep>"], [0, 0, 0, 0])
    tokens, segments = d2l.get_tokens_and_segments(["a"], ["x", "y"])
    assert tokens == ["<cls>", "a", "<sep>", "x", "y", "<sep>"]
    assert segments == [0, 0, 0, 1, 1, 1]


def test_bert_model_shapes_with_and_without_pred_positions():
    torch.manual_seed(3)
    net = d2l.BERTModel(**SMALL, hid_in_features=16, mlm_in_features=16, nsp_in_features=16).eval()
    tokens = torch.randint(0, 20, (2, 8))
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])
    valid = torch.tensor([8.0, 5.0])  # the book's data loader gives float lengths
    encoded, mlm, nsp = net(tokens, segments, valid, torch.tensor([[1, 5, 2], [6, 1, 4]]))
    assert encoded.shape == (2, 8, 16) and mlm.shape == (2, 3, 20) and nsp.shape == (2, 2)
    encoded2, mlm2, nsp2 = net(tokens, segments, valid)
    assert mlm2 is None and torch.allclose(encoded2, encoded) and torch.allclose(nsp2, nsp)
    # the fine-tuning section's classifier reuses these parts
    assert isinstance(net.hidden, nn.Sequential) and net.nsp.output.in_features == 16
    out = net.hidden(net.encoder(tokens, segments, valid)[:, 0, :])
    assert out.shape == (2, 16)
    assert not any("embed_norm" in k for k in net.state_dict())  # the book's BERT has none


def test_bert_model_loads_the_books_parameter_layout():
    torch.manual_seed(4)
    net = d2l.BERTModel(**SMALL, hid_in_features=16, mlm_in_features=16, nsp_in_features=16).eval()
    state = net.state_dict()
    assert state["encoder.pos_embedding"].shape == (12, 16)
    book_state = {k: (v[None] if k == "encoder.pos_embedding" else v) for k, v in state.items()}
    fresh = d2l.BERTModel(**SMALL, hid_in_features=16, mlm_in_features=16, nsp_in_features=16).eval()
    fresh.load_state_dict(book_state)  # strict: the same keys, (1, max_len, H) positions
    tokens = torch.randint(0, 20, (2, 6))
    segments = torch.zeros_like(tokens)
    positions = torch.tensor([[1, 2], [3, 4]])
    for a, b in zip(net(tokens, segments, None, positions), fresh(tokens, segments, None, positions)):
        assert torch.equal(a, b)


def test_bert_parts_on_their_own():
    torch.manual_seed(5)
    encoder = d2l.BERTEncoder(20, 16, [16], 16, 32, 2, 2, 0.2, 12, 16, 16, 16).eval()
    tokens = torch.randint(0, 20, (2, 8))
    X = encoder(tokens, torch.zeros_like(tokens), None)
    assert X.shape == (2, 8, 16) and torch.isfinite(X).all()
    mlm = d2l.MaskLM(20, 16, num_inputs=16)
    assert mlm(X, torch.tensor([[1, 5, 2], [6, 1, 5]])).shape == (2, 3, 20)
    wide = d2l.MaskLM(20, 10, num_inputs=16)  # the first dense layer reads num_inputs features
    Y = wide(X, torch.tensor([[0], [7]]))
    assert Y.shape == (2, 1, 20)
    assert torch.allclose(Y[1, 0], wide.mlp(X[1, 7]), atol=1e-6)
    nsp = d2l.NextSentencePred(8 * 16)
    assert nsp(X.flatten(1)).shape == (2, 2)


def test_bert_sizes_that_must_agree_are_checked():
    with pytest.raises(DivekitError, match="key_size 768 must equal num_hiddens 16"):
        d2l.BERTModel(20, 16, [16], 16, 32, 2, 2, 0.1)
    with pytest.raises(DivekitError, match="norm_shape"):
        d2l.BERTEncoder(20, 16, [8, 16], 16, 32, 2, 2, 0.1, key_size=16, query_size=16,
                        value_size=16)


def test_bert_config_embed_norm_option():
    plain = BertConfig(num_layers=1, num_hiddens=8, num_heads=2, ffn_num_hiddens=16,
                       vocab_size=10, embed_norm=False)
    with pytest.raises(DivekitError, match="no Hugging Face"):
        config_to_checkpoint(plain)
    assert "layer_norm_eps" in config_to_checkpoint(BertConfig())
    with pytest.raises(DivekitError, match="embed_norm"):
        BertConfig(embed_norm="no")


# ------------------------------------------------------------------------------ CNNs


def test_residual_shapes_with_and_without_1x1_conv():
    X = torch.rand(4, 3, 6, 6)
    blk = d2l.Residual(3, 3)
    assert blk(X).shape == (4, 3, 6, 6) and blk.conv3 is None
    blk = d2l.Residual(3, 6, use_1x1conv=True, strides=2)
    assert blk(X).shape == (4, 6, 3, 3) and isinstance(blk.conv3, nn.Conv2d)


def test_resnet18_is_the_small_image_variant():
    net = d2l.resnet18(10)
    assert isinstance(net, nn.Sequential)
    assert net[0].kernel_size == (3, 3) and net[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert sum(isinstance(m, d2l.Residual) for m in net.modules()) == 8
    assert [name for name, _ in net.named_children()][3:] == [
        "resnet_block1", "resnet_block2", "resnet_block3", "resnet_block4", "global_avg_pool", "fc"]
    assert net.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert d2l.resnet18(5, 3).eval()(torch.rand(1, 3, 12, 12)).shape == (1, 5)


def test_corr2d_matches_conv2d_a_loop_and_the_conv_matrix():
    g = gen(9)
    X, K = randn(5, 7, g=g), randn(2, 3, g=g)
    Y = d2l.corr2d(X, K)
    assert Y.shape == (4, 5)
    assert torch.allclose(Y, F.conv2d(X[None, None], K[None, None])[0, 0], atol=1e-6)
    for i in range(4):
        for j in range(5):
            assert math.isclose(Y[i, j], float((X[i:i + 2, j:j + 3] * K).sum()), abs_tol=1e-5)
    assert torch.allclose(Y.flatten(), conv_matrix(K, (5, 7)) @ X.flatten(), atol=1e-5)
    # the book's transposed-conv example: integer-valued floats
    X = torch.arange(9.0).reshape(3, 3)
    assert d2l.corr2d(X, torch.tensor([[1.0, 2.0], [3.0, 4.0]])).tolist() == [[27, 37], [57, 67]]
    K = torch.ones(2, 2, requires_grad=True)
    d2l.corr2d(X, K).sum().backward()
    assert K.grad.tolist() == [[8, 12], [20, 24]]
    with pytest.raises(DivekitError):
        d2l.corr2d(torch.ones(2, 2), torch.ones(3, 3))


# ------------------------------------------------------------------------------ signatures

BOOK = {  # the book's signatures (d2l 2.0.0, as API.md lists them)
    "Residual": {"__init__": "input_channels, num_channels, use_1x1conv=False, strides=1",
                 "forward": "X"},
    "resnet18": "num_classes, in_channels=1",
    "corr2d": "X, K",
    "RNNModelScratch": {"__init__": "vocab_size, num_hiddens, device, get_params, init_state, forward_fn",
                        "__call__": "X, state", "begin_state": "batch_size, device"},
    "RNNModel": {"__init__": "rnn_layer, vocab_size, **kwargs", "forward": "inputs, state",
                 "begin_state": "device, batch_size=1"},
    "Encoder": {"__init__": "**kwargs", "forward": "X, *args"},
    "Decoder": {"__init__": "**kwargs", "init_state": "enc_outputs, *args", "forward": "X, state"},
    "AttentionDecoder": {"__init__": "**kwargs"},
    "EncoderDecoder": {"__init__": "encoder, decoder, **kwargs", "forward": "enc_X, dec_X, *args"},
    "Seq2SeqEncoder": {"__init__": "vocab_size, embed_size, num_hiddens, num_layers, dropout=0, **kwargs",
                       "forward": "X, *args"},
    "sequence_mask": "X, valid_len, value=0",
    "masked_softmax": "X, valid_lens",
    "MaskedSoftmaxCELoss": {"forward": "pred, label, valid_len"},
    "AdditiveAttention": {"__init__": "key_size, query_size, num_hiddens, dropout, **kwargs",
                          "forward": "queries, keys, values, valid_lens"},
    "DotProductAttention": {"__init__": "dropout, **kwargs",
                            "forward": "queries, keys, values, valid_lens=None"},
    "MultiHeadAttention": {"__init__": "key_size, query_size, value_size, num_hiddens, num_heads, "
                                       "dropout, bias=False, **kwargs",
                           "forward": "queries, keys, values, valid_lens"},
    "transpose_qkv": "X, num_heads",
    "transpose_output": "X, num_heads",
    "PositionalEncoding": {"__init__": "num_hiddens, dropout, max_len=1000", "forward": "X"},
    "PositionWiseFFN": {"__init__": "ffn_num_input, ffn_num_hiddens, ffn_num_outputs, **kwargs",
                        "forward": "X"},
    "AddNorm": {"__init__": "normalized_shape, dropout, **kwargs", "forward": "X, Y"},
    "EncoderBlock": {"__init__": "key_size, query_size, value_size, num_hiddens, norm_shape, "
                                 "ffn_num_input, ffn_num_hiddens, num_heads, dropout, use_bias=False, "
                                 "**kwargs",
                     "forward": "X, valid_lens"},
    "TransformerEncoder": {"__init__": "vocab_size, key_size, query_size, value_size, num_hiddens, "
                                       "norm_shape, ffn_num_input, ffn_num_hiddens, num_heads, "
                                       "num_layers, dropout, use_bias=False, **kwargs",
                           "forward": "X, valid_lens, *args"},
    "get_tokens_and_segments": "tokens_a, tokens_b=None",
    "BERTEncoder": {"__init__": "vocab_size, num_hiddens, norm_shape, ffn_num_input, ffn_num_hiddens, "
                                "num_heads, num_layers, dropout, max_len=1000, key_size=768, "
                                "query_size=768, value_size=768, **kwargs",
                    "forward": "tokens, segments, valid_lens"},
    "MaskLM": {"__init__": "vocab_size, num_hiddens, num_inputs=768, **kwargs",
               "forward": "X, pred_positions"},
    "NextSentencePred": {"__init__": "num_inputs, **kwargs", "forward": "X"},
    "BERTModel": {"__init__": "vocab_size, num_hiddens, norm_shape, ffn_num_input, ffn_num_hiddens, "
                              "num_heads, num_layers, dropout, max_len=1000, key_size=768, "
                              "query_size=768, value_size=768, hid_in_features=768, "
                              "mlm_in_features=768, nsp_in_features=768",
                  "forward": "tokens, segments, valid_lens=None, pred_positions=None"},
}


def _params(signature: inspect.Signature) -> list[tuple]:
    """(name, kind, default) of each parameter but ``self``; defaults compare by value."""
    return [(p.name, p.kind, p.default) for p in signature.parameters.values() if p.name != "self"]


def _expected(params: str) -> list[tuple]:
    return _params(inspect.signature(eval(f"lambda {params}: None")))  # noqa: S307


def _check(name: str, spec: str | dict[str, str]) -> None:
    obj = getattr(d2l, name)
    if isinstance(spec, str):
        assert _params(inspect.signature(obj)) == _expected(spec), name
        return
    for method, params in spec.items():
        got = _params(inspect.signature(getattr(obj, method)))
        assert got == _expected(params), f"{name}.{method}"


def test_signatures_are_the_books():
    assert set(BOOK) == set(_models.__all__)
    for name, spec in BOOK.items():
        _check(name, spec)
    assert issubclass(d2l.MaskedSoftmaxCELoss, nn.CrossEntropyLoss)
    assert issubclass(d2l.AttentionDecoder, d2l.Decoder)
    for name in ("Seq2SeqEncoder", "TransformerEncoder"):
        assert issubclass(getattr(d2l, name), d2l.Encoder)


@pytest.mark.skipif(not API.exists(), reason="needs ../shared/book/API.md")
def test_signatures_match_api_md():
    """Every name of this module against the book's API table, bases included."""
    bases = {"nn.Module": nn.Module, "d2l.Encoder": d2l.Encoder, "d2l.Decoder": d2l.Decoder,
             "nn.CrossEntropyLoss": nn.CrossEntropyLoss}
    seen = set()
    for line in API.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) < 4:
            continue
        m = re.fullmatch(r"\|? ?\**`(\w+)`\**", cells[0])
        if not m or m.group(1) not in _models.__all__:
            continue
        name, kind = m.group(1), cells[1]
        snippets = re.findall(r"`([^`]*)`", cells[3])
        head = re.fullmatch(r"(?:\(([\w.]+)\) )?(?:__init__)?\((.*)\)", snippets[0])
        assert head, snippets[0]
        obj = getattr(d2l, name)
        if kind == "function":
            assert _params(inspect.signature(obj)) == _expected(head.group(2)), name
        else:
            if head.group(1):
                assert issubclass(obj, bases[head.group(1)]), name
            if head.group(2) or "__init__" in vars(obj):
                assert _params(inspect.signature(obj.__init__)) == _expected(head.group(2)), name
            for method in snippets[1:]:
                mm = re.fullmatch(r"(\w+)\((.*)\)", method)
                if mm:  # methods; a bare name is a property
                    got = _params(inspect.signature(getattr(obj, mm.group(1))))
                    assert got == _expected(mm.group(2)), f"{name}.{mm.group(1)}"
                else:
                    assert isinstance(inspect.getattr_static(obj, method), property)
        seen.add(name)
    assert seen == set(_models.__all__)
