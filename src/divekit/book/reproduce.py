"""``divekit book reproduce``: the book's headline experiments, run at the book's settings.

Each experiment is a section of the book run unchanged (``run_section``, no ``--quick``) on the
compat layer; its printed lines give divekit's figure, set beside the figure the book prints.
The book's figures are those of its PyTorch edition (d2l-zh 2.0.0, zh.d2l.ai), trained on a GPU;
they vary from run to run as any training does (learners' reruns of the same cells print
perplexities of 1.0 to 1.1 for the GRU, for example), so a row agrees when it is in that range,
not digit for digit.

Where the book's data is not here, the compat layer says so in one line and trains on the
nearest data that is (WikiText-2's validation split for its missing train split; MNIST for
Fashion-MNIST); the table's *data* column carries that line. Experiments that take hours on a
laptop CPU at the book's settings (the CNN zoo at 224×224) are listed but run only when named
with ``--only``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from divekit.errors import DivekitError
from divekit.io import atomic_write_text

_NOTE = re.compile(r"^d2l: (.*)$", re.MULTILINE)


def _all(pattern: str, fmt: Callable[[re.Match[str]], str], sep: str = ", ") -> Callable[[str], str]:
    regex = re.compile(pattern, re.MULTILINE)

    def extract(text: str) -> str:
        return sep.join(fmt(m) for m in regex.finditer(text))

    return extract


_perplexity = _all(r"^perplexity (\d+\.\d+), ", lambda m: m[1])
_bert = _all(r"^MLM loss (\d+\.\d+), NSP loss (\d+\.\d+)", lambda m: f"MLM {m[1]}, NSP {m[2]}")
_accuracy = _all(r"^loss (\d+\.\d+), train acc (\d+\.\d+), test acc (\d+\.\d+)",
                 lambda m: f"loss {m[1]}, train acc {m[2]}, test acc {m[3]}")


# the book's four test sentences of its translation sections, with their references
BOOK_SENTENCES = (("go .", "va !"), ("i lost .", "j'ai perdu ."), ("he's calm .", "il est calme ."),
                  ("i'm home .", "je suis chez moi ."))


@dataclass(frozen=True)
class Experiment:
    """A section of the book run unchanged (``section``), or, for a section not in the chapters
    folder, divekit's own training at the book's settings (``train``: options of
    :func:`divekit.tasks.train`), whose run then translates the book's four sentences."""

    name: str
    section: str | None  # relative to the chapters folder
    what: str
    book: str  # the figure the book prints
    extract: Callable[[str], str] = lambda text: ""
    default: bool = True  # run without --only
    minutes: float = 1.0  # about, on a 2-core laptop CPU
    train: dict[str, object] | None = None


# the book's translation settings (600 pairs of fra-eng, 10 tokens, batch 64, lr 0.005): its
# seq2seq, Bahdanau and Transformer sections, which the chapters folder here does not hold
_NMT = {"data": "fra-eng", "max_examples": 600, "num_steps": 10, "batch_size": 64, "lr": 0.005,
        "optimizer": "adam", "min_freq": 2, "dropout": 0.1, "val_size": 4,
        "bleu_examples": 4, "grad_clip": 1.0, "scheduler": "none"}


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("rnn", "chapter_recurrent-neural-networks/rnn-concise.md",
               "nn.RNN language model, The Time Machine, 500 epochs", "perplexity 1.3",
               _perplexity, minutes=1),
    Experiment("gru", "chapter_recurrent-modern/gru.md",
               "GRU from scratch, then nn.GRU, 500 epochs each", "perplexity 1.1, 1.0",
               _perplexity, minutes=4),
    Experiment("lstm", "chapter_recurrent-modern/lstm.md",
               "LSTM from scratch, then nn.LSTM, 500 epochs each", "perplexity 1.1, 1.0",
               _perplexity, minutes=5),
    Experiment("deep-rnn", "chapter_recurrent-modern/deep-rnn.md",
               "two-layer LSTM, 500 epochs", "perplexity 1.0", _perplexity, minutes=3),
    Experiment("bi-rnn", "chapter_recurrent-modern/bi-rnn.md",
               "bidirectional LSTM (the wrong use the section shows), 500 epochs",
               "perplexity 1.1", _perplexity, minutes=4),
    Experiment("seq2seq", None, "GRU encoder-decoder, fra-eng (600 pairs), 300 epochs "
               "(divekit's `seq2seq` at the section's settings)",
               "loss 0.019; bleu 1.000 / 1.000 / 0.658 / 0.447", minutes=3,
               train={**_NMT, "model": "seq2seq", "epochs": 300, "embed_size": 32,
                      "num_hiddens": 32, "num_layers": 2}),
    Experiment("bahdanau", None, "GRU encoder-decoder with additive attention, fra-eng, 250 "
               "epochs (divekit's `seq2seq_attention`)", "loss 0.020; bleu 1.000 / 1.000 / "
               "1.000 / 1.000", minutes=4,
               train={**_NMT, "model": "seq2seq_attention", "epochs": 250, "embed_size": 32,
                      "num_hiddens": 32, "num_layers": 2}),
    Experiment("transformer", None, "Transformer (2 blocks, 32 wide, 4 heads), fra-eng, 200 "
               "epochs (divekit's `transformer`)", "loss 0.030; bleu 1.000 / 1.000 / 1.000 / "
               "1.000", minutes=5,
               train={**_NMT, "model": "transformer", "epochs": 200, "num_hiddens": 32,
                      "ffn_num_hiddens": 64, "num_heads": 4, "num_blks": 2}),
    Experiment("bert-pretraining", "chapter_natural-language-processing-pretraining/"
               "bert-pretraining.md", "BERT (2 layers, 128 hidden), WikiText-2, 50 steps",
               "MLM 5.885, NSP 0.760", _bert, minutes=4),
    Experiment("alexnet", "chapter_convolutional-modern/alexnet.md",
               "AlexNet, Fashion-MNIST at 224×224, 10 epochs",
               "loss 0.327, train acc 0.881, test acc 0.885", _accuracy, default=False,
               minutes=600),
)


@dataclass
class Row:
    experiment: Experiment
    divekit: str = ""
    data: str = "the book's"
    seconds: float = 0.0
    status: str = "not run"
    report: str = ""
    notes: list[str] = field(default_factory=list)


def select(only: Sequence[str] | None) -> list[Experiment]:
    """The default experiments, or those named (``--only rnn,seq2seq``)."""
    if not only:
        return [e for e in EXPERIMENTS if e.default]
    names = {e.name: e for e in EXPERIMENTS}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise DivekitError(f"unknown experiment {unknown[0]!r}; choose from: {', '.join(names)}")
    return [names[n] for n in only]


def run_training(e: Experiment, out: Path, data_dir: Path) -> tuple[str, str]:
    """Train ``e.train`` into ``out/run`` and translate the book's sentences: (figure, data)."""
    from divekit.engine.run import load_run
    from divekit.ops.bleu import bleu
    from divekit.tasks import train
    from divekit.tasks.translate import translate

    options = {**(e.train or {}), "data_dir": str(data_dir), "out": str(out / "run"),
               "quiet": True, "device": "auto", "seed": 0}
    result = train(options)
    run = load_run(result.run_dir)
    sources = [s for s, _ in BOOK_SENTENCES]
    outputs = translate(run, sources).outputs
    scores = [bleu(hyp, ref, k=2) for hyp, (_, ref) in zip(outputs, BOOK_SENTENCES)]
    lines = [f"{s} => {h}, bleu {b:.3f}" for s, h, b in zip(sources, outputs, scores)]
    atomic_write_text(out / "translations.txt", "\n".join(lines) + "\n")
    loss = result.final.get("train_loss", float("nan"))
    # The book's train_seq2seq prints sum(MaskedSoftmaxCELoss) / #tokens, and that loss is each
    # sequence's masked sum over its num_steps positions divided by num_steps (a mean over
    # dim 1, padding included): its figure is the per-token loss / num_steps. divekit's
    # train_loss is the per-token loss, so it is put on the book's scale to compare.
    steps = int((e.train or {}).get("num_steps", 1))
    figure = (f"loss {loss / steps:.3f} (per token {loss:.3f} / {steps} steps, the book's "
              "scale); bleu " + " / ".join(f"{b:.3f}" for b in scores))
    return figure, f"fra-eng from {data_dir}"


def _printed(result) -> str:  # noqa: ANN001 (a runner.RunResult)
    return "\n".join(v for run in result.runs for k, v in run.items if k == "text")


def render(rows: Sequence[Row], chapters: Path, started: str) -> str:
    lines = [
        "# The book's results, reproduced on divekit",
        "",
        f"Started {started}; sections from `{chapters}`, run unchanged on "
        "`divekit.compat.d2l` at the book's settings (no `--quick`), on this machine's "
        f"{os.cpu_count()} CPU cores. *book*: the figure the book's PyTorch edition prints "
        "(a GPU run; training varies from run to run).",
        "",
        "| experiment | what | book | divekit | data | time | status |",
        "| --- | --- | --- | --- | --- | ---: | --- |",
    ]
    for r in rows:
        e = r.experiment
        report = f"[{r.status}]({r.report})" if r.report else r.status
        lines.append(f"| {e.name} | {e.what} | {e.book} | {r.divekit or '—'} | {r.data} | "
                     f"{r.seconds:.0f} s | {report} |")
    return "\n".join(lines) + "\n"


def reproduce(chapters: str | os.PathLike | None, out_dir: str | os.PathLike, *,
              only: Sequence[str] | None = None, data_dir: str | os.PathLike | None = None,
              overwrite: bool = False, progress: bool = True,
              echo: Callable[[str], None] = print) -> list[Row]:
    """Run the experiments into ``out_dir/NAME/`` and write ``out_dir/reproduce.md``."""
    from datetime import datetime

    from divekit.book.runner import default_chapters_dir, run_section

    folder = Path(chapters) if chapters else default_chapters_dir()
    if folder is None or not folder.is_dir():
        raise DivekitError("no chapters folder: give --chapters DIR (the book's chapter_*/ "
                           "folders), e.g. ../shared/book/chapters")
    experiments = select(only)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DivekitError(f"-o {out} is a file, not a folder")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DivekitError(f"--data-dir {data_dir} is not a folder")
    table = out / "reproduce.md"
    if not overwrite:  # an earlier (perhaps interrupted) reproduce into the same folder
        taken = [p for p in [table, *(out / e.name for e in experiments)] if p.exists()]
        if taken:
            raise DivekitError(f"{taken[0]} exists (an earlier reproduce?); use --overwrite "
                               "or another -o")
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    rows = [Row(e) for e in experiments]
    for row in rows:
        e = row.experiment
        if e.section is None:
            from divekit.book.runner import default_data_dir

            echo(f"{e.name}: divekit train {e.train['model']} (about {e.minutes:g} min)")
            tic = time.perf_counter()
            (out / e.name).mkdir(parents=True, exist_ok=True)
            row.divekit, row.data = run_training(
                e, out / e.name, Path(data_dir) if data_dir else default_data_dir())
            row.seconds = time.perf_counter() - tic
            row.report = f"{e.name}/translations.txt"
            row.status = "ran"
            atomic_write_text(table, render(rows, folder, started))
            continue
        path = folder / e.section
        if not path.is_file():
            row.status = f"section not in {folder}"
            continue
        echo(f"{e.name}: {e.section} (about {e.minutes:g} min)")
        tic = time.perf_counter()
        result = run_section(path, out / e.name, quick=False, data_dir=data_dir,
                             overwrite=overwrite, progress=progress)
        row.seconds = time.perf_counter() - tic
        printed = _printed(result)
        row.divekit = e.extract(printed)
        notes = sorted(set(_NOTE.findall(printed)))
        row.data = "; ".join(notes) if notes else "the book's"
        row.report = os.path.relpath(result.report, out)
        row.status = "ran" if result.ok else f"failed: {result.status}"
        atomic_write_text(table, render(rows, folder, started))
    atomic_write_text(table, render(rows, folder, started))
    return rows
