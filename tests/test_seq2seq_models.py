"""Encoder-decoder models: the course's shapes, Transformer blocks against torch.nn's layers,
incremental decoding against teacher forcing, padding, beam search on a real model."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from divekit.models import create_model
from divekit.models.seq2seq import Seq2SeqDecoder, Seq2SeqEncoder
from divekit.models.transformer import TransformerDecoderBlock, TransformerEncoderBlock
from divekit.ops.decoding import beam_search, greedy_search

NAMES = ["seq2seq", "seq2seq_attention", "transformer"]
SMALL = {"seq2seq": dict(embed_size=8, num_hiddens=16, num_layers=2, dropout=0.0),
         "seq2seq_attention": dict(embed_size=8, num_hiddens=16, num_layers=2, dropout=0.0),
         "transformer": dict(num_hiddens=16, ffn_num_hiddens=32, num_heads=4, num_blks=2, dropout=0.0)}


def small(name, src=11, tgt=13, seed=0):
    torch.manual_seed(seed)
    return create_model(name, src_vocab_size=src, tgt_vocab_size=tgt, **SMALL[name]).eval()


def test_the_courses_encoder_and_decoder_shapes():
    enc = Seq2SeqEncoder(10, 8, 16, 2)
    X = torch.zeros(4, 9, dtype=torch.long)
    outputs, state = enc(X)
    assert outputs.shape == (9, 4, 16) and state.shape == (2, 4, 16)
    dec = Seq2SeqDecoder(10, 8, 16, 2)
    logits, new_state = dec(X, dec.init_state(enc(X)))
    context, hidden = new_state.context, new_state.hidden
    assert logits.shape == (4, 9, 10) and context.shape == (4, 16) and hidden.shape == (2, 4, 16)


@pytest.mark.parametrize("name", NAMES)
def test_teacher_forcing_shapes(name):
    model = small(name)
    src, tgt = torch.randint(0, 11, (3, 7)), torch.randint(0, 13, (3, 5))
    assert model(src, tgt, torch.tensor([7, 3, 1])).shape == (3, 5, 13)


@pytest.mark.parametrize("name", NAMES)
def test_one_token_at_a_time_equals_the_whole_sequence(name):
    """decode_step with the model's cached state gives the teacher-forced logits, step by step."""
    model = small(name)
    src, lens = torch.randint(0, 11, (3, 6)), torch.tensor([6, 4, 2])
    tgt = torch.randint(0, 13, (3, 5))
    with torch.no_grad():
        full = model(src, tgt, lens)
        state = model.encode(src, lens)
        steps = []
        for t in range(tgt.shape[1]):
            logits, state = model.decode_step(tgt[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_what_lies_in_the_padding_does_not_matter_to_a_transformer():
    """(The GRU models start decoding from the encoder's final state, which ran over the
    padding too, as the course's do: only their attention masks it.)"""
    model = small("transformer")
    src, lens, tgt = torch.randint(1, 11, (2, 6)), torch.tensor([3, 5]), torch.randint(0, 13, (2, 4))
    other = src.clone()
    other[0, 3:], other[1, 5:] = 0, 7
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt, lens), model(other, tgt, lens), atol=1e-5, rtol=1e-5)


def test_a_transformer_decoder_position_does_not_see_the_future():
    model = small("transformer")
    src, tgt = torch.randint(0, 11, (2, 5)), torch.randint(0, 13, (2, 6))
    changed = tgt.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 13
    with torch.no_grad():
        a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def _copy_into(ours_mha, qkv_weight, qkv_bias, out_weight, out_bias):
    d = ours_mha.W_q.weight.shape[0]
    with torch.no_grad():
        for j, lin in enumerate((ours_mha.W_q, ours_mha.W_k, ours_mha.W_v)):
            lin.weight.copy_(qkv_weight[j * d:(j + 1) * d])
            lin.bias.copy_(qkv_bias[j * d:(j + 1) * d])
        ours_mha.W_o.weight.copy_(out_weight)
        ours_mha.W_o.bias.copy_(out_bias)


def _copy_ffn_norms(ours, ref, norms):
    with torch.no_grad():
        ours.ffn.dense1.weight.copy_(ref.linear1.weight)
        ours.ffn.dense1.bias.copy_(ref.linear1.bias)
        ours.ffn.dense2.weight.copy_(ref.linear2.weight)
        ours.ffn.dense2.bias.copy_(ref.linear2.bias)
        for mine, theirs in norms:
            mine.ln.weight.copy_(theirs.weight)
            mine.ln.bias.copy_(theirs.bias)


def test_encoder_block_equals_torch_transformer_encoder_layer():
    torch.manual_seed(0)
    d, heads, ffn = 16, 4, 24
    ref = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, batch_first=True).eval()
    for p in ref.parameters():  # LayerNorm starts at (1, 0): make the copy meaningful
        nn.init.normal_(p, std=0.3)
    ours = TransformerEncoderBlock(d, ffn, heads, 0.0, use_bias=True).eval()
    _copy_into(ours.attention, ref.self_attn.in_proj_weight, ref.self_attn.in_proj_bias,
               ref.self_attn.out_proj.weight, ref.self_attn.out_proj.bias)
    _copy_ffn_norms(ours, ref, [(ours.addnorm1, ref.norm1), (ours.addnorm2, ref.norm2)])
    X, lens = torch.randn(3, 7, d), torch.tensor([7, 2, 5])
    expected = ref(X, src_key_padding_mask=torch.arange(7) >= lens[:, None])
    torch.testing.assert_close(ours(X, lens), expected, atol=1e-5, rtol=1e-5)


def test_decoder_block_equals_torch_transformer_decoder_layer():
    torch.manual_seed(1)
    d, heads, ffn, t, s = 16, 4, 24, 6, 5
    ref = nn.TransformerDecoderLayer(d, heads, ffn, dropout=0.0, batch_first=True).eval()
    for p in ref.parameters():
        nn.init.normal_(p, std=0.3)
    ours = TransformerDecoderBlock(d, ffn, heads, 0.0, 0, use_bias=True).eval()
    _copy_into(ours.attention1, ref.self_attn.in_proj_weight, ref.self_attn.in_proj_bias,
               ref.self_attn.out_proj.weight, ref.self_attn.out_proj.bias)
    _copy_into(ours.attention2, ref.multihead_attn.in_proj_weight, ref.multihead_attn.in_proj_bias,
               ref.multihead_attn.out_proj.weight, ref.multihead_attn.out_proj.bias)
    _copy_ffn_norms(ours, ref, [(ours.addnorm1, ref.norm1), (ours.addnorm2, ref.norm2), (ours.addnorm3, ref.norm3)])
    X, memory, lens = torch.randn(2, t, d), torch.randn(2, s, d), torch.tensor([5, 3])
    causal = nn.Transformer.generate_square_subsequent_mask(t)
    expected = ref(X, memory, tgt_mask=causal, memory_key_padding_mask=torch.arange(s) >= lens[:, None])
    out, _ = ours(X, ours.init_cache(memory), lens)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_beam_search_on_a_transformer_is_exhaustive_when_wide():
    """Every sequence of up to 3 tokens scored by teacher forcing; a wide beam finds the best."""
    tgt_vocab, eos, bos, max_len = 5, 2, 1, 3
    model = small("transformer", tgt=tgt_vocab, seed=3)
    src, lens = torch.randint(0, 11, (2, 4)), torch.tensor([4, 2])
    out = beam_search(model.decode_step, model.encode(src, lens), torch.full((2,), bos), eos, max_len,
                      beam_size=64, length_penalty=0.75, reorder=model.reorder_state)
    others = [v for v in range(tgt_vocab) if v != eos]
    for row in range(2):
        best = None
        for length in range(1, max_len + 1):
            for body in itertools.product(others, repeat=length - 1):
                for last in [eos] + (others if length == max_len else []):
                    seq = [*body, last]
                    dec_in = torch.tensor([[bos, *seq[:-1]]])
                    with torch.no_grad():
                        logp = torch.log_softmax(model(src[row:row + 1], dec_in, lens[row:row + 1]), -1)
                    lp = sum(logp[0, i, y].item() for i, y in enumerate(seq))
                    if best is None or lp / length ** 0.75 > best[0]:
                        best = (lp / length ** 0.75, seq)
        assert out.tokens[row] == best[1]
        assert out.normalized[row] == pytest.approx(best[0], abs=1e-4)
    greedy = greedy_search(model.decode_step, model.encode(src, lens), torch.full((2,), bos), eos, max_len)
    one = beam_search(model.decode_step, model.encode(src, lens), torch.full((2,), bos), eos, max_len,
                      beam_size=1, reorder=model.reorder_state)
    assert greedy.tokens == one.tokens


@pytest.mark.parametrize("name", NAMES)
def test_every_model_learns_to_reverse_a_fixed_batch(name):
    """32 random source sequences, target = the reversed source: the loss halves in 60 steps."""
    torch.manual_seed(0)
    model = small(name, src=8, tgt=8).train()
    src = torch.randint(3, 8, (32, 5))
    tgt = torch.cat([src.flip(1), torch.full((32, 1), 2)], dim=1)  # reversed + <eos>
    dec_in = torch.cat([torch.full((32, 1), 1), tgt[:, :-1]], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(src, dec_in).reshape(-1, 8), tgt.reshape(-1))
        first = first if first is not None else loss.item()
        if loss.item() <= 0.5 * first:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() <= 0.5 * first, f"{name}: {first:.3f} -> {loss.item():.3f}"
