"""Transformer decoding speed: the key/value cache against no cache and the course's input cache.

Three ways to decode ``L`` tokens greedily with the *same* weights (the course's Transformer:
d 256, FFN 64, 4 heads, 2 blocks; a 5,000-token target vocabulary; random weights with
``<eos>`` made impossible so every row runs the full length), compared in tokens per second:

* ``kv cache``: divekit's decoder, each block caching its self-attention's projected keys and
  values (one new row a step) and the encoder's outputs projected once per sentence;
* ``input cache``: the course's decoder (d2l 11.7): each block caches its *inputs* and re-projects
  every cached position, and the encoder's outputs, at every step;
* ``no cache``: the whole prefix through the decoder at every step (full re-decoding).

All three give the same tokens (checked). Then divekit's batched greedy translation of 500
sentences (:func:`divekit.ops.decoding.greedy_search` with ``reorder``, what ``divekit translate``
runs: batches of 250, key/value cache, finished rows leaving the batch) against the course's
``predict_seq2seq``, one sentence at a time with its input-cache decoder, on the same weights
(same tokens, checked), run as the course writes it: ``net.eval()`` and no ``torch.no_grad()``
(d2l's ``predict_seq2seq`` and ``EncoderDecoder.predict_step`` both leave autograd on), while
divekit decodes under ``inference_mode``. ``--course-no-grad`` gives the course's loop
``inference_mode`` too, to separate that from the batching::

    python benchmarks/decoding.py                 # lengths 50 and 200, batch 1 and 64
    python benchmarks/decoding.py --quick         # lengths 20 and 50
    python benchmarks/decoding.py --smoke         # lengths 5 and 10, 20 sentences (seconds)
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from divekit.models import create_model
from divekit.ops.decoding import greedy_search

BOS, EOS, SRC_LEN = 1, 2, 12


class CourseDecoderStep:
    """The course's ``TransformerDecoder.forward`` (d2l 11.7) on divekit's weights: the state is
    ``[enc_outputs, enc_valid_lens, [None] * num_blks]`` and block i caches its inputs in
    ``state[2][i]``, projecting all of them (and the encoder's outputs) again every step."""

    def __init__(self, model):
        self.dec = model.decoder

    def init_state(self, enc_outputs, enc_valid_lens):
        return [enc_outputs, enc_valid_lens, [None] * len(self.dec.blks)]

    def __call__(self, X, state):
        dec = self.dec
        offset = 0 if state[2][0] is None else state[2][0].shape[1]
        H = dec.pos_encoding(dec.embedding(X) * math.sqrt(dec.num_hiddens), offset)
        for i, blk in enumerate(dec.blks):
            key_values = H if state[2][i] is None else torch.cat((state[2][i], H), dim=1)
            state[2][i] = key_values
            Y = blk.addnorm1(H, blk.attention1(H, key_values, key_values, None))
            Z = blk.addnorm2(Y, blk.attention2(Y, state[0], state[0], state[1]))
            H = blk.addnorm3(Z, blk.ffn(Z))
        return dec.dense(H), state


def course_step(model):
    course = CourseDecoderStep(model)

    def step(tokens, state):
        logits, state = course(tokens[:, None], state)
        return logits[:, -1], state

    return course, step


def no_cache_step(model):
    def step(tokens, state):
        prefix = torch.cat([state["prefix"], tokens[:, None]], dim=1)
        fresh = model.decoder.init_state(state["enc"], state["lens"])
        logits, _ = model.decoder(prefix, fresh)  # every position again
        return logits[:, -1], {**state, "prefix": prefix}

    return step


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def decoding_row(model, length, b, repeats, g):
    """One row: ``b`` sources, ``length`` tokens each, decoded the three ways."""
    src = torch.randint(4, 1000, (b, SRC_LEN), generator=g)
    lens = torch.full((b,), SRC_LEN)
    first = torch.full((b,), BOS)
    with torch.inference_mode():
        enc = model.encoder(src, lens)
        course, cstep = course_step(model)
        t_kv, a = timed(lambda: greedy_search(model.decode_step, model.decoder.init_state(enc, lens),
                                              first, EOS, length), repeats)
        t_in, b_ = timed(lambda: greedy_search(cstep, course.init_state(enc, lens), first, EOS,
                                               length), repeats)
        state = {"enc": enc, "lens": lens, "prefix": torch.zeros(b, 0, dtype=torch.long)}
        t_no, c = timed(lambda: greedy_search(no_cache_step(model), state, first, EOS, length),
                        repeats)
    assert a.tokens == b_.tokens == c.tokens and len(a.tokens[0]) == length
    tok = b * length
    print(f"{length:>6} {b:>5} {tok / t_kv:>15.0f} {tok / t_in:>12.0f} {tok / t_no:>10.0f}"
          f"  {t_no / t_kv:>10.1f}x {t_in / t_kv:>8.1f}x", flush=True)


def decoding_rows(model, lengths, batches, repeats):
    print(f"{'length':>6} {'batch':>5} {'kv cache tok/s':>15} {'input cache':>12} {'no cache':>10}"
          f"  {'vs no cache':>11} {'vs input':>9}")
    g = torch.Generator().manual_seed(0)
    for length in lengths:
        for b in batches:
            decoding_row(model, length, b, repeats, g)


def predict_seq2seq(model, src_row, valid_len, num_steps):
    """The course's ``predict_seq2seq`` (d2l 10.7.6) for one encoded sentence: its decoder
    (here :class:`CourseDecoderStep`, the course's input cache) fed one token at a time."""
    course = CourseDecoderStep(model)
    enc_X = src_row.unsqueeze(0)
    enc_valid_len = torch.tensor([valid_len])
    enc_outputs = model.encoder(enc_X, enc_valid_len)
    dec_state = course.init_state(enc_outputs, enc_valid_len)
    dec_X = torch.tensor([[BOS]])
    output_seq = []
    for _ in range(num_steps):
        Y, dec_state = course(dec_X, dec_state)
        dec_X = Y.argmax(dim=2)
        pred = int(dec_X.squeeze(0).item())
        output_seq.append(pred)
        if pred == EOS:
            break
    return output_seq


def batched_row(model, n, num_steps, batch, course_no_grad=False):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 1000, (n, SRC_LEN), generator=g)
    lens = torch.randint(3, SRC_LEN + 1, (n,), generator=g)
    with torch.inference_mode():
        t = time.perf_counter()
        ours = []
        for s in range(0, n, batch):
            out = greedy_search(model.decode_step,
                                model.encode(src[s:s + batch], lens[s:s + batch]),
                                torch.full((len(src[s:s + batch]),), BOS), EOS, num_steps,
                                reorder=model.reorder_state)
            ours += out.tokens
        t_ours = time.perf_counter() - t
    # the course's predict_seq2seq as it is written: net.eval() and no torch.no_grad(), so
    # autograd records every step (divekit decodes under inference_mode)
    with torch.inference_mode(course_no_grad):
        t = time.perf_counter()
        course = [predict_seq2seq(model, src[i], int(lens[i]), num_steps) for i in range(n)]
        t_course = time.perf_counter() - t
    assert ours == course
    print(f"\n{n} sentences, {num_steps} tokens each: divekit batched greedy ({batch} a batch) "
          f"{t_ours:.2f} s, the course's predict_seq2seq one at a time "
          f"({'inference_mode' if course_no_grad else 'as written, autograd on'}) {t_course:.2f} s: "
          f"{t_course / t_ours:.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="lengths 20 and 50 only")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sentences", type=int, default=500)
    p.add_argument("--course-no-grad", action="store_true",
                   help="run the course's predict_seq2seq under inference_mode too")
    p.add_argument("--smoke", action="store_true",
                   help="lengths 5 and 10, batch 1 and 4, 20 sentences in batches of 8, 1 repeat: "
                        "checks that it runs (seconds)")
    args = p.parse_args()
    batches, sentence_batch = [1, 64], 250
    if args.smoke:
        args.repeats, args.sentences, batches, sentence_batch = 1, 20, [1, 4], 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("transformer", src_vocab_size=1000, tgt_vocab_size=5000, dropout=0.0).eval()
    with torch.no_grad():
        model.decoder.dense.bias[EOS] = -1e9  # every row decodes the full length
    lengths = [5, 10] if args.smoke else [20, 50] if args.quick else [50, 200]
    decoding_rows(model, lengths, batches, args.repeats)
    with torch.no_grad():
        model.decoder.dense.bias[EOS] = 0.0  # translations end when <eos> wins
    batched_row(model, args.sentences, 20, sentence_batch, course_no_grad=args.course_no_grad)


if __name__ == "__main__":
    main()
