"""``divekit translate RUN "sentence" ...`` and what ``divekit evaluate`` / ``predict`` print for
translation runs. All the printing of the translation task is here; the work is
:func:`divekit.tasks.translate.translate`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

TASKS = ("translate",)


def format_metrics(metrics: dict[str, Any]) -> str:
    """``divekit evaluate``'s line: validation loss, token accuracy and BLEU (when computed)."""
    bleu = f", BLEU {metrics['bleu']:.2f}" if "bleu" in metrics else ""
    beams = sorted(k for k in metrics if k.startswith("bleu_beam"))
    bleu += "".join(f", BLEU (beam {k[len('bleu_beam'):]}) {metrics[k]:.2f}" for k in beams)
    return f"validation: loss {metrics['loss']:.4f}, token accuracy {metrics['acc']:.4f}{bleu}"


def format_prediction(item: dict[str, Any]) -> str:
    """``divekit predict``'s line per sentence, as ``divekit translate`` prints it."""
    return f"{item['source']} => {item['translation']}"


def _cmd_translate(args: argparse.Namespace) -> None:
    from divekit.engine.run import load_run
    from divekit.tasks.translate import translate

    run = load_run(args.run_dir, args.device)
    result = translate(run, args.sentences, beam=args.beam, length_penalty=args.length_penalty,
                       attention=args.attention is not None)
    if result.attention is not None:
        from divekit.viz import plot_attention

        a = result.attention
        plot_attention(a.weights, args.attention, xlabel="source", ylabel="output",
                       titles=a.titles, xticks=a.src_tokens, yticks=a.out_tokens)
    for source, output in zip(args.sentences, result.outputs):
        print(f"{source} => {output}")
    if args.attention:
        print(f"attention: {args.attention}")
    if result.unknown:
        print(f"note: the model never saw {', '.join(map(repr, result.unknown))}; they were read "
              "as <unk>", file=sys.stderr)


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "translate", parents=[parent], help="translate sentences with a trained translation model",
        description="Clean and tokenize each sentence as the training pairs were, encode it, and "
        "decode greedily (--beam 1) or with beam search, ranking finished translations by "
        "log P / length^α (--length-penalty α).",
    )
    p.add_argument("run_dir", help="a run directory written by `divekit train transformer ...`")
    p.add_argument("sentences", nargs="+", metavar="SENTENCE",
                   help="English sentences, e.g. 'i have two cats .'")
    p.add_argument("--beam", type=int, default=1, help="beam size; 1 = greedy (default: 1)")
    p.add_argument("--length-penalty", type=float, default=0.75,
                   help="α of the beam ranking (default: 0.75)")
    p.add_argument("--attention", metavar="PNG", help="draw the first sentence's attention to this file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(handler=_cmd_translate)
