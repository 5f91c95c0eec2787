"""The text commands: ``divekit generate``, ``divekit tokenizer train|encode`` and
``divekit sequence``.

Each handler calls library functions (:mod:`divekit.tasks.language_model`,
:mod:`divekit.tasks.sequence`, :mod:`divekit.tokenizers`) and does the printing.
"""

from __future__ import annotations

import argparse
from typing import Any

from divekit.cli._common import add_command
from divekit.errors import DivekitError

COMMANDS = ("generate", "tokenizer", "sequence")


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    _add_generate(sub, parent)
    _add_tokenizer(sub, parent)
    _add_sequence(sub, parent)


# ------------------------------------------------------------------------ divekit generate
def _add_generate(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.tasks.language_model import MAX_LENGTH

    p = add_command(
        sub, parent, "generate", help="continue a text with a trained language model",
        description="Warm the model's hidden state up on --prefix, then sample --length tokens "
        "one at a time, each from softmax(logits / T) (or the most likely with --greedy).",
    )
    p.add_argument("run_dir", help="a run directory written by `divekit train gru ...`")
    p.add_argument("--prefix", required=True, help="the text to continue, e.g. 'time traveller'")
    p.add_argument("--length", type=int, default=50,
                   help=f"tokens to generate, 0 to {MAX_LENGTH} (default: 50)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="T < 1 sharpens, T > 1 flattens the distribution (default: 1)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> None:
    from divekit.engine.run import load_run
    from divekit.tasks.language_model import check_sampling, generate

    check_sampling(args.length, args.temperature, args.seed)  # before the run is opened
    run = load_run(args.run_dir, args.device)
    text = generate(run, args.prefix, args.length, temperature=args.temperature,
                    greedy=args.greedy, seed=args.seed)
    print(run.task.format_prediction({"text": text}))


# ------------------------------------------------------------------------ divekit tokenizer
def _add_tokenizer(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.tokenizers import MODEL_TYPES

    p = add_command(sub, parent, "tokenizer", help="train or try a SentencePiece tokenizer",
                       description="Subword tokenizers (SentencePiece) for every text task's --tokenizer.")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = add_command(tsub, parent, "train", help="learn a tokenizer from a corpus",
                        description="Learn --vocab-size pieces from a corpus (cleaned as the "
                        "language models see it) and write the model file.")
    t.add_argument("--data", default="pydoc", help="text corpus (default: pydoc)")
    t.add_argument("--vocab-size", type=int, default=1000, help="pieces to learn (default: 1000)")
    t.add_argument("--model-type", default="unigram", choices=MODEL_TYPES, help="(default: unigram)")
    t.add_argument("-o", "--out", default="tok.model", help="model file (default: tok.model)")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.add_argument("--data-dir", help="folder holding the corpus file")
    t.add_argument("--download", action="store_true", help="download a missing corpus")
    t.set_defaults(handler=cmd_tokenizer_train)
    e = add_command(tsub, parent, "encode", help="show the pieces of a text",
                        description="Split TEXT into the pieces of a tokenizer model.")
    e.add_argument("model", help="a tokenizer model file")
    e.add_argument("text", help="the text to split")
    e.set_defaults(handler=cmd_tokenizer_encode)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from divekit.data.text import corpus_lines
    from divekit.engine.config import data_dir_check
    from divekit.io import check_output
    from divekit.tokenizers import train_tokenizer

    ok, message = data_dir_check(args.data, args.data_dir, args.download)
    if not ok:
        raise DivekitError(message)
    check_output(args.out, [], overwrite=args.overwrite)
    lines = corpus_lines(args.data, data_dir=args.data_dir, download=args.download)
    tok = train_tokenizer(lines, args.vocab_size, model_type=args.model_type)
    path = tok.save(args.out)
    sample = " ".join(tok.encode("the time traveller"))
    print(f"{len(tok)} pieces → {path}  (e.g. 'the time traveller' → {sample})")


def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    from divekit.tasks.language_model import clean_prefix
    from divekit.tokenizers import SentencePieceTokenizer

    print(" ".join(SentencePieceTokenizer.load(args.model).encode(clean_prefix(args.text))))


# ------------------------------------------------------------------------ divekit sequence
def _add_sequence(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.config import add_config_options
    from divekit.tasks.sequence import SequenceConfig

    p = add_command(
        sub, parent, "sequence", help="autoregression vs a latent-variable RNN on a noisy sine",
        description="Train an MLP on τ lagged values and a GRU on x_t = sin(0.01 t) + N(0, 0.2²), "
        "predict 1, 4, 16 and 64 steps ahead, print the test MSEs and save the plot as DIR/kstep.png.",
    )
    add_config_options(p, SequenceConfig)
    p.set_defaults(handler=cmd_sequence)


def cmd_sequence(args: argparse.Namespace) -> None:
    from divekit.config import config_from_dict, typed_options
    from divekit.tasks.sequence import SequenceConfig, run

    result = run(config_from_dict(SequenceConfig, typed_options(args)))
    print(format_sequence_table(result))
    print(f"plot: {result['plot']}")


def format_sequence_table(result: dict[str, Any]) -> str:
    """The k-step test MSEs of both models, one row per k."""
    mse = result["mse"]
    lines = [f"test MSE (t ≥ {result['config']['n_train']}; noise variance {result['noise_variance']:.3f})",
             f"{'k':>4}  {'MLP τ=' + str(result['config']['tau']):>10}  {'GRU':>8}"]
    lines += [f"{k:>4}  {mse['mlp'][k]:>10.4f}  {mse['rnn'][k]:>8.4f}" for k in mse["mlp"]]
    return "\n".join(lines)
