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

When the batched-translation goal is not met (or not settled), the section gets a side-by-side
cProfile table of one batch's translation: divekit's batched decoder on the first batch, and
the course's loop on the first ``--profile-sentences`` of the same sentences (one sentence at a
time, its time is proportional to their number, so a subset shows where it goes and keeps the
profile short; the line above the table says how many, the factor that scales its figures to
the whole batch, and both sides' time per sentence).
"""

from __future__ import annotations

import argparse
import math

import torch
from _common import (
    Report,
    Spread,
    add_markdown_arg,
    goal_cell,
    interleave,
    paired_ratio,
    profile_report,
    verdict,
    wall,
)

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


GOALS = {50: 3.0, 200: 10.0}  # kv cache over no cache, by length (issue 13)
BATCHED_GOAL = 25.0  # batched translation over the course's loop as written (issue 26)
ROWS: list[list[str]] = []


def race(sides: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds per round of each side, ``repeats`` interleaved rounds (in the order given), and
    each side's last output."""
    out: dict[str, object] = {}

    def keep(name, fn):
        return lambda: out.__setitem__(name, fn())

    times = interleave({name: keep(name, fn) for name, fn in sides.items()}, repeats)
    return times, out


def decoding_row(model, length, b, repeats, g):
    """One row: ``b`` sources, ``length`` tokens each, decoded the three ways."""
    src = torch.randint(4, 1000, (b, SRC_LEN), generator=g)
    lens = torch.full((b,), SRC_LEN)
    first = torch.full((b,), BOS)
    with torch.inference_mode():
        enc = model.encoder(src, lens)
        course, cstep = course_step(model)
        state = {"enc": enc, "lens": lens, "prefix": torch.zeros(b, 0, dtype=torch.long)}
        times, out = race({
            "no": lambda: greedy_search(no_cache_step(model), state, first, EOS, length),
            "input": lambda: greedy_search(cstep, course.init_state(enc, lens), first, EOS,
                                           length),
            "kv": lambda: greedy_search(model.decode_step, model.decoder.init_state(enc, lens),
                                        first, EOS, length),
        }, repeats)
    a, b_, c = out["kv"], out["input"], out["no"]
    assert a.tokens == b_.tokens == c.tokens and len(a.tokens[0]) == length
    tok = b * length
    t_kv, t_in, t_no = (Spread.of(times[k]).median for k in ("kv", "input", "no"))
    vs_no, vs_in = paired_ratio(times["no"], times["kv"]), paired_ratio(times["input"], times["kv"])
    print(f"{length:>6} {b:>5} {tok / t_kv:>15.0f} {tok / t_in:>12.0f} {tok / t_no:>10.0f}"
          f"  {vs_no.median:>10.1f}x {vs_in.median:>8.1f}x", flush=True)
    goal = GOALS.get(length)
    print(f"{'':>13}rounds: vs no cache {vs_no.lo:.1f}-{vs_no.hi:.1f}x, vs input cache "
          f"{vs_in.lo:.1f}-{vs_in.hi:.1f}x" + (f"; goal >= {goal:g}x vs no cache: "
                                              f"{verdict(vs_no, goal)}" if goal else ""))
    ROWS.append([str(length), str(b), f"{tok / t_kv:,.0f}", f"{tok / t_in:,.0f}",
                 f"{tok / t_no:,.0f}", vs_no.md(1), vs_in.md(1), goal_cell(goal),
                 verdict(vs_no, goal)])


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


def batched_row(model, n, num_steps, batch, repeats, course_no_grad=False,
                profile_sentences=25):
    """``(row, missed)``: the batched-translation row and, when its goal is not met (or not
    settled), what :func:`profile_batched` needs, ``(outcome, sentences divekit's side decodes,
    sentences the course's side decodes, sides)``; ``missed`` is None when the goal is met or
    there is none (``--course-no-grad``)."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 1000, (n, SRC_LEN), generator=g)
    lens = torch.randint(3, SRC_LEN + 1, (n,), generator=g)

    def ours() -> list:
        tokens = []
        with torch.inference_mode():
            for s in range(0, n, batch):
                out = greedy_search(model.decode_step,
                                    model.encode(src[s:s + batch], lens[s:s + batch]),
                                    torch.full((len(src[s:s + batch]),), BOS), EOS, num_steps,
                                    reorder=model.reorder_state)
                tokens += out.tokens
        return tokens

    def course(count: int = n) -> list:
        # the course's predict_seq2seq as it is written: net.eval() and no torch.no_grad(), so
        # autograd records every step (divekit decodes under inference_mode)
        with torch.inference_mode(course_no_grad):
            return [predict_seq2seq(model, src[i], int(lens[i]), num_steps)
                    for i in range(count)]

    times, out = race({"course": course, "divekit": ours}, repeats)
    assert out["divekit"] == out["course"]
    r = paired_ratio(times["course"], times["divekit"])
    t_ours, t_course = Spread.of(times["divekit"]).median, Spread.of(times["course"]).median
    how = "inference_mode" if course_no_grad else "as written, autograd on"
    print(f"\n{n} sentences, {num_steps} tokens each: divekit batched greedy ({batch} a batch) "
          f"{t_ours:.2f} s, the course's predict_seq2seq one at a time "
          f"({how}) {t_course:.2f} s: {r.median:.1f}x")
    goal = None if course_no_grad else BATCHED_GOAL
    print(f"  rounds: {r.lo:.1f}-{r.hi:.1f}x" + (f"; goal >= {goal:g}x: {verdict(r, goal)}"
                                                  if goal else ""))
    row = [f"{n} sentences, {num_steps} tokens each", f"{t_ours:.2f} s ({batch} a batch)",
           f"{t_course:.2f} s ({how})", r.md(1), goal_cell(goal), verdict(r, goal)]
    if goal is None or verdict(r, goal) == "met":
        return row, None
    first = min(batch, n)  # the first batch's sentences
    subset = min(first, profile_sentences)

    def ours_first_batch() -> list:
        with torch.inference_mode():
            return greedy_search(model.decode_step, model.encode(src[:first], lens[:first]),
                                 torch.full((first,), BOS), EOS, num_steps,
                                 reorder=model.reorder_state).tokens

    def course_subset() -> list:
        return course(subset)

    return row, (verdict(r, goal), first, subset,
                 {f"course, {subset} sentence(s) one at a time": course_subset,
                  f"divekit, {first} sentences in one batch": ours_first_batch})


def profile_batched(report: Report, outcome: str, first: int, subset: int,
                    sides: dict, num_steps: int) -> None:
    """Where the time of the batched-translation goal not met (``outcome``) goes: each side timed
    once more (per sentence) and profiled side by side (:func:`_common.profile_report`)."""
    per = dict(zip(("course", "divekit"), (wall(fn) / k for fn, k in
                                          zip(sides.values(), (subset, first), strict=True))))
    scale = ("" if subset == first else
             f"; a subset: its time is proportional to the sentences, so its self ms × "
             f"{first / subset:g} are the whole batch's")
    note = (f"Batched translation, goal {outcome}: profiled on the first batch's {first} "
            f"sentences for divekit (one `greedy_search` call, inference mode) and the first "
            f"{subset} of them for the course (`predict_seq2seq` one sentence at a time, as "
            f"written, autograd on{scale}), up to {num_steps} tokens each. Timed once each "
            f"before the profile: course {per['course'] * 1e3:.1f} ms a "
            f"sentence, divekit {per['divekit'] * 1e3:.2f} ms a sentence, "
            f"{per['course'] / per['divekit']:.1f}× against the goal's {BATCHED_GOAL:g}×.")
    print(note)
    report.text(note)
    profile_report(report, "batched translation, one batch", outcome, sides, k=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="lengths 20 and 50 only")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved rounds of every side; medians and the ratios' min-max")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sentences", type=int, default=500)
    p.add_argument("--course-no-grad", action="store_true",
                   help="run the course's predict_seq2seq under inference_mode too")
    p.add_argument("--profile-sentences", type=int, default=25,
                   help="sentences of the course's side in the profile of a batched-translation "
                        "goal not met (default: 25 of the first batch's; smoke: 4)")
    p.add_argument("--smoke", action="store_true",
                   help="lengths 5 and 10, batch 1 and 4, 20 sentences in batches of 8, 1 repeat: "
                        "checks that it runs (seconds)")
    add_markdown_arg(p)
    args = p.parse_args()
    batches, sentence_batch = [1, 64], 250
    if args.smoke:
        args.repeats, args.sentences, batches, sentence_batch = 1, 20, [1, 4], 8
        args.profile_sentences = min(args.profile_sentences, 4)
    if args.profile_sentences < 1:
        p.error("--profile-sentences must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("transformer", src_vocab_size=1000, tgt_vocab_size=5000, dropout=0.0).eval()
    with torch.no_grad():
        model.decoder.dense.bias[EOS] = -1e9  # every row decodes the full length
    lengths = [5, 10] if args.smoke else [20, 50] if args.quick else [50, 200]
    decoding_rows(model, lengths, batches, args.repeats)
    with torch.no_grad():
        model.decoder.dense.bias[EOS] = 0.0  # translations end when <eos> wins
    batched, missed = batched_row(model, args.sentences, 20, sentence_batch, args.repeats,
                                  course_no_grad=args.course_no_grad,
                                  profile_sentences=args.profile_sentences)
    report = Report("Decoding: key/value cache and batched translation", threads=args.threads)
    report.table(["length", "batch", "kv cache tok/s", "input cache (course)", "no cache",
                  "vs no cache (min–max)", "vs input cache (min–max)", "goal", "verdict"],
                 ROWS, align="rrrrrrrll",
                 caption=f"Greedy tokens/s, the course's Transformer sizes, 5,000-token target "
                         f"vocabulary, random weights, `<eos>` impossible; medians of "
                         f"{args.repeats} interleaved rounds (no cache, input cache, kv cache); "
                         "the same tokens from all three (checked). Goal: kv cache over no "
                         "cache.")
    report.table(["batched greedy translation", "divekit, batched", "course, one at a time",
                  "ratio (min–max)", "goal", "verdict"], [batched], align="lrrrll",
                 caption="`greedy_search` with `reorder` (what `divekit translate` runs) against "
                         "the course's `predict_seq2seq`, same weights, same tokens (checked), "
                         "interleaved rounds (course, divekit).")
    if missed is not None:  # where the time goes
        profile_batched(report, *missed, num_steps=20)
    report.write(args.markdown)


if __name__ == "__main__":
    main()
