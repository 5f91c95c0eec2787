"""The key/value cache: cached decoding gives what re-decoding the whole prefix every step gives
(tokens and scores, greedy and beam, on every encoder-decoder), each position's keys and values
are projected once, the encoder's outputs once per sentence, and the state is an immutable
typed object."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from divekit.models import create_model
from divekit.models.attention import PositionalEncoding
from divekit.models.seq2seq import AttentionDecoderState, Seq2SeqState
from divekit.models.transformer import TransformerDecoderState
from divekit.ops.decoding import beam_search, greedy_search

NAMES = ["seq2seq", "seq2seq_attention", "transformer"]
SMALL = {"seq2seq": dict(embed_size=8, num_hiddens=16, num_layers=2, dropout=0.3),
         "seq2seq_attention": dict(embed_size=8, num_hiddens=16, num_layers=2, dropout=0.3),
         "transformer": dict(num_hiddens=16, ffn_num_hiddens=32, num_heads=4, num_blks=2,
                             dropout=0.3)}
BOS, EOS, TGT = 1, 2, 13


def small(name, seed=0):
    torch.manual_seed(seed)
    return create_model(name, src_vocab_size=11, tgt_vocab_size=TGT, **SMALL[name]).eval()


def sources(batch=3, steps=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 11, (batch, steps), generator=g), torch.tensor([6, 3, 1, 5, 2][:batch])


def full_redecode(model, src, lens):
    """A step function that ignores every cache: the whole prefix through the model each step
    (the independent reference); its state is the prefix and the sources, as a dict."""
    def step(tokens, state):
        prefix = torch.cat([state["prefix"], tokens[:, None]], dim=1)
        logits = model(state["src"], prefix, state["lens"])[:, -1]
        return logits, {**state, "prefix": prefix}

    state = {"src": src, "lens": lens, "prefix": torch.zeros(len(src), 0, dtype=torch.long)}
    return step, state


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("beam", [1, 3])
def test_cached_decoding_equals_full_redecoding(name, beam):
    model = small(name)
    src, lens = sources()
    first = torch.full((len(src),), BOS)
    step, state = full_redecode(model, src, lens)
    if beam == 1:
        cached = greedy_search(model.decode_step, model.encode(src, lens), first, EOS, 8)
        full = greedy_search(step, state, first, EOS, 8)
    else:
        cached = beam_search(model.decode_step, model.encode(src, lens), first, EOS, 8,
                             beam_size=beam, reorder=model.reorder_state, n_best=beam)
        full = beam_search(step, state, first, EOS, 8, beam_size=beam, n_best=beam)
        assert [[h[0] for h in hs] for hs in cached.nbest] == [[h[0] for h in hs] for hs in full.nbest]
    assert cached.tokens == full.tokens
    assert cached.scores == pytest.approx(full.scores, abs=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_decoding_in_training_mode_is_evaluation_decoding(name):
    """The course decodes in whatever mode the model is in (dropout on while training); divekit's
    translation decoding switches dropout off and restores the mode."""
    from divekit.data.text import Vocab
    from divekit.tasks.translate_decode import decode

    vocab = Vocab([[str(i) for i in range(9)]], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    model = small(name)
    src, lens = sources()
    expected = decode(model, src, lens, vocab, 8)
    model.train()
    assert decode(model, src, lens, vocab, 8) == expected == decode(model, src, lens, vocab, 8)
    assert model.training


def count_calls(module: nn.Module, calls: list):
    return module.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))


def test_transformer_projects_each_position_once_and_the_encoder_once_per_sentence():
    model = small("transformer")
    src, lens = sources(batch=2)
    self_kv = [[] for _ in model.decoder.blks]
    enc_kv = [[] for _ in model.decoder.blks]
    hooks = []
    for i, blk in enumerate(model.decoder.blks):
        hooks += [count_calls(blk.attention1.W_k, self_kv[i]), count_calls(blk.attention1.W_v, self_kv[i]),
                  count_calls(blk.attention2.W_k, enc_kv[i]), count_calls(blk.attention2.W_v, enc_kv[i])]
    with torch.no_grad():
        model.decoder.dense.bias[TGT - 1] = -1e9  # <eos> never wins: every one of the 7 steps runs
        greedy_search(model.decode_step, model.encode(src, lens), torch.full((2,), BOS), TGT - 1, 7)
    for i in range(len(model.decoder.blks)):
        # W_k and W_v once per generated token, each on one new position per sentence
        assert self_kv[i] == [(2, 1, 16)] * (2 * 7)
        # the encoder side: W_k and W_v once, on the whole batch of sources
        assert enc_kv[i] == [(2, 6, 16), (2, 6, 16)]
    for h in hooks:
        h.remove()


def test_a_full_length_transformer_decode_projects_exactly_once_per_step():
    model = small("transformer")
    src, lens = sources(batch=2)
    calls: list = []
    hook = count_calls(model.decoder.blks[1].attention1.W_k, calls)
    state = model.encode(src, lens)
    tokens = torch.full((2,), BOS)
    for t in range(9):
        logits, state = model.decode_step(tokens, state)
        tokens = logits.argmax(-1)
        assert len(calls) == t + 1 and state.offset == t + 1
        assert state.blocks[1].self_k.shape == (2, 4, t + 1, 4)  # one new row a step
    hook.remove()


def test_bahdanau_projects_the_encoder_outputs_once_per_sentence():
    model = small("seq2seq_attention")
    src, lens = sources(batch=2)
    calls: list = []
    hook = count_calls(model.decoder.attention.W_k, calls)
    greedy_search(model.decode_step, model.encode(src, lens), torch.full((2,), BOS), EOS, 6)
    beam_search(model.decode_step, model.encode(src, lens), torch.full((2,), BOS), EOS, 6,
                beam_size=3, reorder=model.reorder_state)
    assert calls == [(2, 6, 16), (2, 6, 16)]  # once per encode, never per step
    hook.remove()


@pytest.mark.parametrize("name, cls", [("seq2seq", Seq2SeqState),
                                       ("seq2seq_attention", AttentionDecoderState),
                                       ("transformer", TransformerDecoderState)])
def test_the_state_is_a_frozen_dataclass_that_a_step_does_not_change(name, cls):
    model = small(name)
    src, lens = sources()
    state = model.encode(src, lens)
    assert isinstance(state, cls) and dataclasses.is_dataclass(state)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.enc_valid_lens = None  # type: ignore[misc]
    tokens = torch.full((3,), BOS)
    a, next_state = model.decode_step(tokens, state)
    b, _ = model.decode_step(tokens, state)  # the same step again from the same state
    torch.testing.assert_close(a, b)
    assert next_state is not state


def test_the_rnn_context_stays_the_encoders_at_inference():
    """The course's first decoder read its context from the state it updated, so at inference
    the context drifted to the decoder's own hidden state; here it is the encoder's, always."""
    model = small("seq2seq")
    src, lens = sources()
    enc_outputs, _ = model.encoder(src, lens)
    state = model.encode(src, lens)
    tokens = torch.full((3,), BOS)
    for _ in range(5):
        logits, state = model.decode_step(tokens, state)
        tokens = logits.argmax(-1)
    torch.testing.assert_close(state.context, enc_outputs[-1])


def test_positional_encoding_offset_continues_the_positions():
    pe = PositionalEncoding(8, dropout=0.0, max_len=20)
    X = torch.randn(2, 4, 8)
    whole = pe(torch.cat([torch.zeros(2, 3, 8), X], dim=1))
    torch.testing.assert_close(pe(X, offset=3), whole[:, 3:])
    with pytest.raises(Exception, match="max_len"):
        pe(X, offset=17)


def eos_prone(name, src, lens, max_len):
    """A small model (decoder weights × 3) whose <eos> bias is moved until its rows end at
    different steps (small random weights end every row at once, or none)."""
    model = small(name)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(3)
    first = torch.full((len(src),), BOS)
    bias = model.decoder.dense.bias
    for shift in torch.linspace(-10, 10, 201):
        with torch.no_grad():
            bias[EOS] = shift
        out = greedy_search(model.decode_step, model.encode(src, lens), first, EOS, max_len)
        if len({len(t) for t in out.tokens}) > 1:
            return model, out
    raise AssertionError("no <eos> bias ends the rows at different steps")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("compact", [0.75, 1.0])
def test_translation_greedy_equals_greedy_search_while_finished_rows_leave(name, compact):
    """Greedy search with ``reorder`` (what translation runs: finished rows dropped from the
    batch) gives the tokens and scores of the plain greedy search, which keeps every row."""
    src, lens = sources(batch=5, steps=6, seed=4)
    model, plain = eos_prone(name, src, lens, 10)
    first = torch.full((5,), BOS)
    reorders: list = []
    reorder = model.reorder_state
    model.reorder_state = lambda state, index: reorders.append(len(index)) or reorder(state, index)
    ours = greedy_search(model.decode_step, model.encode(src, lens), first, EOS, 10,
                         reorder=model.reorder_state, compact=compact)
    assert ours.tokens == plain.tokens
    assert ours.scores == pytest.approx(plain.scores, rel=1e-5, abs=1e-4)  # smaller batches
    assert ours.normalized == pytest.approx(plain.normalized, rel=1e-5, abs=1e-4)
    assert reorders == sorted(reorders, reverse=True)  # the batch only shrinks
    if compact == 1.0:  # every row that ends leaves at once: the batch shrank
        assert reorders and reorders[-1] < 5


def test_the_cache_grows_in_place_and_a_second_step_from_a_state_does_not_disturb_the_first():
    """A step writes its keys and values into the chain's preallocated storage (a new one only
    when it is full, twice as long); stepping an earlier state again writes into a copy, so
    both continuations decode as re-decoding their own prefix does."""
    model = small("transformer")
    src, lens = sources(batch=2)
    state = model.encode(src, lens)
    storages = []
    tokens = torch.full((2,), BOS)
    with torch.no_grad():
        for _ in range(40):
            _, state = model.decode_step(tokens, state)
            storages.append(state.blocks[0].storage)
    assert len({id(s) for s in storages}) == 3  # room for 16, 32, then 64 positions
    step, full = full_redecode(model, src, lens)
    base = model.encode(src, lens)
    _, s1 = model.decode_step(torch.full((2,), BOS), base)
    a, b = torch.tensor([5, 6]), torch.tensor([7, 8])
    _, sa = model.decode_step(a, s1)
    _, sb = model.decode_step(b, s1)  # from the same state: must not overwrite sa's row
    for state_after, second in ((sa, a), (sb, b)):
        logits, _ = model.decode_step(torch.tensor([9, 10]), state_after)
        prefix = torch.stack([torch.full((2,), BOS), second, torch.tensor([9, 10])], dim=1)
        expected = model(src, prefix, lens)[:, -1]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_a_padded_source_decodes_as_the_same_sentence_alone_and_an_empty_one_disturbs_nothing():
    """The encoder-decoder attention's key mask is built once per source batch: a padded
    source gives the logits of the same sentence without its padding (no mask at all), and an
    empty source in the batch (which attends to nothing) leaves the others as they were."""
    model = small("transformer")
    src, _ = sources(batch=3, steps=6)
    lens = torch.tensor([6, 4, 0])
    tokens = torch.tensor([[BOS, 5, 7, 3]] * 3)
    batch = model(src, tokens, lens)
    alone = model(src[1:2, :4], tokens[1:2], torch.tensor([4]))
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[:2], model(src[:2], tokens[:2], lens[:2]), atol=1e-5,
                               rtol=1e-5)
    no_lens = model(src[:1], tokens[:1])
    torch.testing.assert_close(batch[:1], no_lens, atol=1e-5, rtol=1e-5)
