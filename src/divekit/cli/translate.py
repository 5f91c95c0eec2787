"""``divekit translate RUN [SENTENCE ...] [-i FILE]`` and ``divekit kernel-regression -o DIR``;
the work is :func:`divekit.tasks.translate.translate` and
:func:`divekit.models.kernel_regression.kernel_regression_demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from divekit.cli._common import add_command
from divekit.errors import DivekitError

COMMANDS = ("translate", "kernel-regression")


def read_sentences(path: str) -> list[str]:
    """One sentence per line of ``path`` (``-``: standard input), empty lines kept; read line by
    line and refused past ``MAX_SENTENCES`` lines, before the rest of the file is read."""
    from divekit.tasks.translate_decode import MAX_SENTENCES

    lines: list[str] = []
    try:
        stream = sys.stdin if path == "-" else open(path, encoding="utf-8", newline="\n")
        try:
            for line in stream:
                if len(lines) == MAX_SENTENCES:
                    raise DivekitError(f"-i {path}: more than {MAX_SENTENCES:,} lines: at most "
                                       f"{MAX_SENTENCES:,} at a time (split the file)")
                lines.append(line.removesuffix("\n").rstrip("\r"))
        finally:
            if stream is not sys.stdin:
                stream.close()
    except FileNotFoundError:
        raise DivekitError(f"-i {path}: no such file") from None
    except IsADirectoryError:
        raise DivekitError(f"-i {path}: is a folder, not a text file") from None
    except UnicodeDecodeError as e:
        raise DivekitError(f"-i {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return lines


def _cmd_translate(args: argparse.Namespace) -> None:
    from divekit.engine.record import read_record
    from divekit.engine.run import load_run
    from divekit.tasks.translate import check_decoding, translate

    check_decoding(args.beam, args.length_penalty, args.n_best, args.batch_size)
    if args.attention is not None:  # never an input; an existing file only with --overwrite
        from divekit.io import check_output

        check_output(args.attention, [args.input], overwrite=args.overwrite, option="--attention")
    from_file = args.input is not None or not args.sentences
    if args.input is not None and args.sentences:
        raise DivekitError("give sentences on the command line or -i FILE, not both")
    if from_file:
        if args.input is None and sys.stdin.isatty():
            raise DivekitError("give SENTENCE ..., -i FILE, or pipe one sentence per line")
        sentences = read_sentences(args.input or "-")
        if not sentences:
            raise DivekitError(f"-i {args.input or '-'}: no lines to translate")
    else:
        sentences = args.sentences
        if any(not s.strip() for s in sentences):
            raise DivekitError("give non-empty sentences to translate (an empty line is kept "
                               "only in -i FILE)")
    task = read_record(args.run_dir).get("task")
    if task != "translate":
        raise DivekitError(f"{args.run_dir} is a {task!r} run, not a translation run")
    run = load_run(args.run_dir, args.device)
    result = translate(run, sentences, beam=args.beam, length_penalty=args.length_penalty,
                       n_best=args.n_best, batch_size=args.batch_size,
                       attention=args.attention is not None)
    if result.attention is not None:
        from divekit.viz import plot_attention

        a = result.attention
        plot_attention(a.weights, args.attention, xlabel="source", ylabel="output",
                       titles=a.titles, xticks=a.src_tokens, yticks=a.out_tokens)
    for i, (source, output) in enumerate(zip(sentences, result.outputs)):
        if result.nbest is not None:  # Moses' n-best format: index ||| text ||| score
            for hyp in result.nbest[i]:
                print(f"{i} ||| {hyp.text} ||| {hyp.normalized:.4f}")
        elif from_file:
            print(output)
        else:
            print(f"{source} => {output}")
    if result.attention is not None:
        print(f"attention: {args.attention}", file=sys.stderr if from_file else sys.stdout)
    elif args.attention:
        print(f"note: the first translation is empty; no attention drawn to {args.attention}",
              file=sys.stderr)
    if result.unknown:
        print(f"note: the model never saw {', '.join(map(repr, result.unknown[:20]))}"
              f"{' ...' if len(result.unknown) > 20 else ''}; they were read as <unk>",
              file=sys.stderr)


def _cmd_kernel_regression(args: argparse.Namespace) -> None:
    from divekit.models.kernel_regression import kernel_regression
    from divekit.viz import plot_attention, plot_kernel_fit

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DivekitError(f"-o {out}: exists and is not a folder")
    result = kernel_regression(n_train=args.n_train, epochs=args.epochs, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in result.predictions:
        files.append(plot_kernel_fit(result, name, out / f"kernel_{name}_fit.png"))
        files.append(plot_attention(result.weights[name], out / f"attention_{name}.png",
                                    xlabel="sorted training inputs (keys)",
                                    ylabel="sorted test inputs (queries)"))
    for name, mse in result.test_mse.items():
        print(f"{name:<14} test MSE {mse:.4f}")
    print(f"parametric w = {result.w:.3f}; training loss {result.losses[0]:.4f} -> "
          f"{result.losses[-1]:.4f}")
    for path in files:
        print(f"wrote {path}")


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, parent, "translate", help="translate sentences with a trained translation model",
        description="Clean and tokenize each sentence as the training pairs were, encode it, and "
        "decode greedily (--beam 1) or with beam search, ranking finished translations by "
        "log P / length^α (--length-penalty α). Sentences come from the command line, or one "
        "per line from -i FILE or standard input (then only the translations are printed, one "
        "per line, an empty line for an empty line).",
    )
    p.add_argument("run_dir", help="a run directory written by `divekit train transformer ...`")
    p.add_argument("sentences", nargs="*", metavar="SENTENCE",
                   help="English sentences, e.g. 'i have two cats .'")
    p.add_argument("-i", "--input", metavar="FILE",
                   help="translate each line of FILE (- = standard input), at most 100,000 lines")
    p.add_argument("--beam", type=int, default=1,
                   help="beam size, at most 256; 1 = greedy (default: 1)")
    p.add_argument("--n-best", type=int, default=1, metavar="N",
                   help="print the N best hypotheses (N <= --beam) as 'index ||| text ||| "
                   "log P / length^α' (default: 1)")
    p.add_argument("--length-penalty", type=float, default=0.75, metavar="α",
                   help="α of the beam ranking (default: 0.75)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B",
                   help="sentences decoded together, at most 4096 (default: 64)")
    p.add_argument("--attention", metavar="PNG", help="draw the first sentence's attention to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --attention if it exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(handler=_cmd_translate)

    k = add_command(
        sub, parent, "kernel-regression",
        help="Nadaraya-Watson kernel regression: fits and attention heat maps",
        description="The course's first attention model on its toy data y = 2 sin x + x^0.8 + "
        "noise: average pooling, the non-parametric Gaussian kernel and the parametric kernel "
        "with a learned width w. Writes each fit against the truth and its attention weights "
        "(queries x keys) as PNG files.",
    )
    k.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for the pictures")
    k.add_argument("--n-train", type=int, default=50, metavar="N",
                   help="training points, 2 to 2000 (50)")
    k.add_argument("--epochs", type=int, default=5,
                   help="epochs of the parametric model, 1 to 10000 (5)")
    k.add_argument("--seed", type=int, default=0, help="random seed of the toy data (0)")
    k.set_defaults(handler=_cmd_kernel_regression)
