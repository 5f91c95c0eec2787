"""Machine-translation building blocks against the course's package (d2l 1.0.3) and sacrebleu.

Each row times divekit and its peer on the same inputs in the same process (median of
``--repeats`` interleaved runs, one thread) and prints the speed-up (peer time / divekit time):

* ``preprocess+tokenize``: the whole Tatoeba ``fra.txt`` (167,130 pairs, from
  ``../shared/data/fra-eng`` when present, else 20,000 generated numbers-fr pairs) through
  d2l 1.0's ``MTFraEng._preprocess`` + ``_tokenize`` vs ``preprocess_nmt`` + ``tokenize_nmt``
  (identical tokens, checked; d2l appends ``<eos>`` at this stage, divekit when building
  arrays);
* ``bleu (course)``: the course's per-sentence ``bleu(pred, label, k=4)`` over 20,000 pairs;
* ``corpus BLEU``: ``sacrebleu.corpus_bleu`` vs ``divekit.ops.bleu.corpus_bleu`` on the same
  20,000 pairs (same score, checked);
* ``masked_softmax``: forward + backward on ``(128, 13, 13)`` scores with random lengths;
* ``multi-head attention``: forward + backward, ``(128, 13, 256)`` self-attention, 4 heads, the
  same weights;
* ``transformer encoder``: two blocks (d 256, FFN 64, 4 heads) forward + backward on
  ``(128, 13)`` tokens, the same weights, dropout 0.

    python benchmarks/translation.py
    python benchmarks/translation.py --repeats 7
    python benchmarks/translation.py --smoke      # small inputs, then a seconds-long ``corpus``

Without d2l (or sacrebleu) the peer's column is skipped (said in the output); divekit runs alone.

``corpus``: the whole-corpus Transformer. Trains on every fra-eng pair but a fixed held-out
2,000 (seed 0) for at most ``--budget-min`` minutes of training (tokenizer training and data
preparation not counted; the clock stops the run mid-epoch), then translates the held-out
sources greedily and with beam 4 and scores them with the ``sacrebleu`` package itself
(13a, detokenized output against the raw lower-cased French references, ``lowercase=True``),
with the course's four sentences. Results go to ``OUT/results.json``::

    nice python benchmarks/translation.py corpus --tokenizer bpe:4000 --budget-min 45 --out runs/bpe
    nice python benchmarks/translation.py corpus --budget-min 45 --out runs/words
    python benchmarks/translation.py corpus --smoke   # 400 generated pairs, 1 s of training
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import Report, Spread, add_markdown_arg, interleave, paired_ratio

ROOT = Path(__file__).resolve().parents[1]
FRA = ROOT.parent / "shared" / "data" / "fra-eng" / "fra.txt"
# the sizes of the rows: pairs of text (None: the whole fra.txt), BLEU pairs, batch, width
FULL = {"pairs": None, "bleu_pairs": 20_000, "batch": 128, "d": 256}
SMOKE = {"pairs": 1000, "bleu_pairs": 200, "batch": 8, "d": 32}
D2L_MISSING = ("d2l is not installed: its rows run divekit alone (pip install --no-deps d2l==1.0.3 "
               "&& pip install requests ipython matplotlib-inline pandas)")


def import_d2l():
    """``d2l.torch``, or None (said once) when the package is not installed."""
    try:
        import d2l.torch as d2l
    except ImportError:
        print(D2L_MISSING)
        return None
    return d2l


ROWS: list[list[str]] = []  # the report's table, a row per measured case
NOTES: list[str] = []  # what the rows ran on


def race(ours: Callable[[], object], theirs: Callable[[], object] | None,
         repeats: int, inner: int = 1) -> tuple[list[float], list[float]]:
    """Seconds of ``inner`` calls, ``repeats`` interleaved rounds (the peer first, so load
    changes hit both) after one warm-up round; no peer: its list is empty."""
    def block(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(inner):
                fn()
        return run

    sides = {"peer": block(theirs)} if theirs is not None else {}
    times = interleave({**sides, "divekit": block(ours)}, repeats, warmup=1)
    return [t / inner for t in times["divekit"]], [t / inner for t in times.get("peer", [])]


def row(name: str, ours: list[float], theirs: list[float], peer: str) -> None:
    a = Spread.of(ours).median
    if not theirs:
        print(f"{name:<24} {a * 1e3:>10.2f} {'skipped':>10}  {'-':>7}  ({peer} not installed)")
        ROWS.append([name, f"{a * 1e3:.2f}", "—", "—", f"{peer} not installed"])
        return
    b, r = Spread.of(theirs).median, paired_ratio(theirs, ours)
    print(f"{name:<24} {a * 1e3:>10.2f} {b * 1e3:>10.2f}  [{r.lo:.2f}-{r.hi:.2f}] "
          f"{r.median:>6.2f}x  ({peer})")
    ROWS.append([name, f"{a * 1e3:.2f}", f"{b * 1e3:.2f}", r.md(), peer])


def text_rows(repeats: int, d2l, sizes: dict = FULL) -> None:
    from divekit.data.numbers_fr import numbers_fr
    from divekit.data.translation import preprocess_nmt, tokenize_nmt
    from divekit.ops.bleu import bleu, corpus_bleu

    pairs = sizes["pairs"]
    if FRA.is_file():
        text = FRA.read_text(encoding="utf-8")
        what = "fra.txt (../shared/data)"
        if pairs is not None:
            text = "\n".join(text.split("\n")[:pairs]) + "\n"
            what = f"the first {pairs:,} lines of fra.txt (../shared/data)"
    else:
        n_generated = pairs or 20_000
        text, what = numbers_fr(n_generated), f"{n_generated:,} numbers-fr pairs (no fra.txt)"
    theirs = None
    if d2l is not None:
        course = d2l.MTFraEng.__new__(d2l.MTFraEng)  # its methods, without its download

        def theirs() -> tuple[list, list]:
            return course._tokenize(course._preprocess(text))

    ours_out = tokenize_nmt(preprocess_nmt(text))
    if theirs is not None:
        for mine, course_side in zip(ours_out, theirs()):
            assert [t + ["<eos>"] for t in mine] == course_side, "tokenized pairs differ"
    print(f"text: {what}, {len(ours_out[0]):,} pairs")
    NOTES.append(f"text rows: {what}, {len(ours_out[0]):,} pairs")
    a, b = race(lambda: tokenize_nmt(preprocess_nmt(text)), theirs, repeats)
    row("preprocess+tokenize", a, b, "d2l")

    rng = random.Random(0)
    src, tgt = ours_out
    n = min(sizes["bleu_pairs"], len(tgt))
    refs = [" ".join(t) for t in tgt[:n]]
    words = sorted({w for t in tgt[:n] for w in t})
    hyps = [" ".join(w if rng.random() < 0.7 else rng.choice(words) for w in t) for t in tgt[:n]]
    a, b = race(lambda: [bleu(h, r, 4) for h, r in zip(hyps, refs)],
                d2l and (lambda: [d2l.bleu(h, r, 4) for h, r in zip(hyps, refs)]), repeats)
    row("bleu (course, k=4)", a, b, "d2l")
    try:
        import sacrebleu
    except ImportError:
        a, _ = race(lambda: corpus_bleu(hyps, refs, tokenize="none", smooth="exp"), None, repeats)
        row("corpus BLEU", a, [], "sacrebleu")
        return
    ours_score = corpus_bleu(hyps, refs, tokenize="none", smooth="exp")
    theirs_score = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", force=True).score
    assert abs(ours_score - theirs_score) < 1e-6 * max(1.0, theirs_score), (ours_score, theirs_score)
    a, b = race(lambda: corpus_bleu(hyps, refs, tokenize="none", smooth="exp"),
                lambda: sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", force=True), repeats)
    row("corpus BLEU", a, b, "sacrebleu")


def _fwd_bwd(fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for p in params:
            p.grad = None
        fn().float().square().mean().backward()
    return run


def tensor_rows(repeats: int, d2l, sizes: dict = FULL) -> None:
    from divekit.models.attention import MultiHeadAttention
    from divekit.models.transformer import TransformerEncoder
    from divekit.ops.masking import masked_softmax

    torch.manual_seed(0)
    b, t, d, heads = sizes["batch"], 13, sizes["d"], 4
    scores = torch.randn(b, t, t, requires_grad=True)
    lens = torch.randint(1, t + 1, (b,))
    # the course masks in place, so both sides get a fresh non-leaf copy of the scores
    a_, b_ = race(_fwd_bwd(lambda: masked_softmax(scores * 1, lens), [scores]),
                  d2l and _fwd_bwd(lambda: d2l.masked_softmax(scores * 1, lens), [scores]),
                  repeats, inner=20)
    row("masked_softmax", a_, b_, "d2l")

    ours = MultiHeadAttention(d, heads, 0.0, query_size=d, key_size=d, value_size=d).train()
    vocab = 1000
    if d2l is None:
        X = torch.randn(b, t, d, requires_grad=True)
        a_, _ = race(_fwd_bwd(lambda: ours(X, X, X, lens), [X, *ours.parameters()]), None,
                     repeats, inner=5)
        row("multi-head attention", a_, [], "d2l")
        enc = TransformerEncoder(vocab, d, 64, heads, 2, 0.0).train()
        tokens = torch.randint(0, vocab, (b, t))
        a_, _ = race(_fwd_bwd(lambda: enc(tokens, lens), list(enc.parameters())), None,
                     repeats, inner=3)
        row("transformer encoder", a_, [], "d2l")
        return
    theirs = d2l.MultiHeadAttention(d, heads, 0.0)
    X = torch.randn(b, t, d, requires_grad=True)
    theirs(X, X, X, lens)  # size its LazyLinear layers
    theirs.load_state_dict({k.replace("attention.", "", 0): v for k, v in ours.state_dict().items()}, strict=False)
    with torch.no_grad():
        for name in ("W_q", "W_k", "W_v", "W_o"):
            getattr(theirs, name).weight.copy_(getattr(ours, name).weight)
        torch.testing.assert_close(ours(X, X, X, lens), theirs(X, X, X, lens), atol=1e-5, rtol=1e-5)
    a_, b_ = race(_fwd_bwd(lambda: ours(X, X, X, lens), [X, *ours.parameters()]),
                  _fwd_bwd(lambda: theirs(X, X, X, lens), [X, *theirs.parameters()]),
                  repeats, inner=5)
    row("multi-head attention", a_, b_, "d2l")

    enc = TransformerEncoder(vocab, d, 64, heads, 2, 0.0).train()
    peer = d2l.TransformerEncoder(vocab, d, 64, heads, 2, 0.0).train()
    tokens = torch.randint(0, vocab, (b, t))
    peer(tokens, lens)  # size the LazyLinear layers
    mine, course = list(enc.parameters()), list(peer.parameters())  # the same layers, in order
    assert [p.shape for p in mine] == [p.shape for p in course]
    with torch.no_grad():
        for a, b in zip(mine, course):
            b.copy_(a)
        torch.testing.assert_close(enc(tokens, lens), peer(tokens, lens), atol=1e-4, rtol=1e-4)
    a_, b_ = race(_fwd_bwd(lambda: enc(tokens, lens), list(enc.parameters())),
                  _fwd_bwd(lambda: peer(tokens, lens), list(peer.parameters())),
                  repeats, inner=3)
    row("transformer encoder", a_, b_, "d2l")


COURSE_SENTENCES = [("go .", "va !"), ("i lost .", "j'ai perdu ."), ("he's calm .", "il est calme ."),
                    ("i'm home .", "je suis chez moi .")]


class BudgetReached(Exception):
    pass


def corpus_main(argv: list[str]) -> None:
    import sys

    p = argparse.ArgumentParser(prog="translation.py corpus")
    p.add_argument("--tokenizer", default=None, help="bpe:N (default: words)")
    p.add_argument("--budget-min", type=float, default=45.0)
    p.add_argument("--num-steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required="--smoke" not in argv)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--smoke", action="store_true",
                   help="400 generated pairs in fra.txt's format, 20 held out, a 1-second budget, "
                        "OUT in a temporary folder: checks that it runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dk-bench-") as tmp:
        fra = FRA
        if args.smoke:
            from divekit.data.numbers_fr import numbers_fr

            fra = Path(tmp) / "fra-eng" / "fra.txt"
            fra.parent.mkdir()
            fra.write_text(numbers_fr(400), encoding="utf-8")
            args.val_size, args.budget_min, args.batch_size = 20, 1 / 60, 32
            args.out = args.out or str(Path(tmp) / "run")
        if not fra.is_file():
            sys.exit(f"skipped: {fra} not found")
        corpus_run(args, fra)


def corpus_run(args: argparse.Namespace, fra: Path) -> None:
    import json

    from divekit.data.translation import detokenize, split_indices
    from divekit.engine.callbacks import Callback
    from divekit.engine.run import make_config, train
    from divekit.io import atomic_write_json
    from divekit.tasks.translate import TranslateConfig, TranslationTask

    try:
        import sacrebleu
    except ImportError:  # divekit's corpus_bleu gives sacrebleu's number for the same options
        sacrebleu = None
        print("sacrebleu is not installed: the held-out pairs are scored with divekit's "
              "corpus_bleu")
    values = {"model": "transformer", "data": "fra-eng", "data_dir": str(fra.parent),
              "val_size": args.val_size, "num_steps": args.num_steps, "epochs": 100,
              "batch_size": args.batch_size, "lr": args.lr, "bleu_examples": 0, "dropout": 0.1,
              "out": args.out, "tokenizer": args.tokenizer, "min_freq": 2}
    if args.smoke:
        values["quiet"] = True
    cfg = make_config(TranslateConfig, values)
    task = TranslationTask(cfg)
    t0 = time.perf_counter()
    data = task.data
    prep_s = time.perf_counter() - t0
    budget = args.budget_min * 60

    class Budget(Callback):
        def on_fit_start(self, trainer):
            self.trainer, self.start, self.steps = trainer, time.perf_counter(), 0

        def on_train_batch_end(self, trainer, index, logs):
            self.steps += 1
            if time.perf_counter() - self.start > budget:
                raise BudgetReached

    budget_cb = Budget()
    try:
        train(task, [budget_cb])
    except BudgetReached:
        pass
    train_s = time.perf_counter() - budget_cb.start
    model = budget_cb.trainer.model.eval()
    import io

    from divekit.io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # the weights at the budget's end, for re-scoring
    atomic_write_bytes(Path(args.out) / "budget_weights.pt", buf.getvalue())
    # the held-out pairs' raw text, in the split's order (one pair per line with a tab)
    lines = [ln.split("\t") for ln in fra.read_text(encoding="utf-8").split("\n") if "\t" in ln]
    _, val_idx = split_indices(len(lines), args.val_size / len(lines), cfg.seed)
    assert len(val_idx) == len(data.val.src)
    sources = [lines[i][0] for i in val_idx]
    refs = [lines[i][1].replace("\u202f", " ").replace("\xa0", " ").lower() for i in val_idx]
    results = {"tokenizer": args.tokenizer or "words", "train_pairs": len(data.train.src),
               "src_vocab": len(data.src_vocab), "tgt_vocab": len(data.tgt_vocab),
               "prep_s": prep_s, "train_s": train_s, "steps": budget_cb.steps,
               "epochs": budget_cb.steps * args.batch_size / len(data.train.src),
               "threads": args.threads, "num_steps": args.num_steps}
    for beam in (1, 4):
        t = time.perf_counter()
        found = task.translate_sentences(model, sources, beam, batch_size=250)
        hyps = [detokenize(h[0].text) if h else "" for h in found]
        if sacrebleu is not None:
            score = sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score
        else:
            from divekit.ops.bleu import corpus_bleu

            score = corpus_bleu(hyps, refs, lowercase=True)
        results[f"sacrebleu_beam{beam}"] = score
        results[f"decode_s_beam{beam}"] = time.perf_counter() - t
        results[f"examples_beam{beam}"] = list(zip(sources[:10], hyps[:10], refs[:10]))
    course = task.translate_sentences(model, [e for e, _ in COURSE_SENTENCES], 4)
    results["course"] = [(e, h[0].text, f) for (e, f), h in zip(COURSE_SENTENCES, course)]
    atomic_write_json(Path(args.out) / "results.json", results)
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("examples")}, indent=1))


def main() -> None:
    import sys

    if sys.argv[1:2] == ["corpus"]:
        corpus_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per row (default: 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true",
                   help="1,000 pairs, batch 8, width 32, 1 repeat, then `corpus --smoke`: checks "
                        "that it runs (seconds)")
    add_markdown_arg(p)
    args = p.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.smoke:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    from divekit.engine.device import configure_allocator

    configure_allocator()
    d2l = import_d2l()
    print(f"{'':<24} {'divekit ms':>10} {'peer ms':>10}  speed-up")
    text_rows(args.repeats, d2l, sizes)
    tensor_rows(args.repeats, d2l, sizes)
    b, t, d = sizes["batch"], 13, sizes["d"]
    report = Report("Translation building blocks", threads=args.threads)
    report.table(["row", "divekit ms", "peer ms", "speed-up (min–max)", "peer"], ROWS,
                 align="lrrrl",
                 caption=f"Median of {args.repeats} interleaved rounds (peer, divekit) after a "
                         "warm-up round, "
                         f"{args.threads} thread(s); the speed-up is the median and min–max of "
                         "the per-round ratios. " + "; ".join(NOTES) + f"; tensor rows: batch "
                         f"{b}, {t} tokens, width {d}, 4 heads (masked_softmax: 20 calls a "
                         "round, attention 5, encoder 3). Both sides' results are checked equal "
                         "before timing.")
    report.write(args.markdown)
    if args.smoke:
        print("\ncorpus --smoke:")
        corpus_main(["--smoke", "--threads", str(args.threads)])


if __name__ == "__main__":
    main()
