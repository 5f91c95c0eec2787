"""``divekit embed``: sentence embeddings and semantic search with a pretrained BERT."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from divekit.cli._common import add_command
from divekit.errors import DivekitError

COMMANDS = ("embed",)
SHOWN_CHARS = 80  # the text printed beside an embedding or a score

EXAMPLES = """\
examples:
  divekit embed minilm "A man is eating food." "A man rides a horse."
  divekit embed minilm -i sentences.txt -o emb.npy            one row per non-empty line
  divekit embed minilm -i faq.txt --similar "how do I reset it" --top-k 3
  divekit embed runs/bert_small-pydoc "a list comprehension" --pooling cls
"""


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.tasks.embed import MAX_LINE_CHARS, MAX_TEXTS  # what -i reads at most

    p = add_command(
        sub, parent, "embed", help="sentence embeddings / semantic search with a BERT",
        description="Embed texts with a BERT checkpoint directory (Hugging Face layout), a "
        "divekit pretraining run, or minilm (all-MiniLM-L6-v2, embedded): the encoder's last "
        "hidden states pooled over each text's tokens.", examples=EXAMPLES)
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN", help="a checkpoint directory, a run, or minilm")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed")
    p.add_argument("-i", "--input", metavar="FILE",
                   help=f"also embed every non-empty line of FILE (at most {MAX_TEXTS:,} lines; "
                   f"a line is cut at {MAX_LINE_CHARS:,} characters, with a note)")
    p.add_argument("-o", "--output", metavar="NPY", help="write the (N, H) float32 embeddings as .npy")
    p.add_argument("--overwrite", action="store_true", help="replace -o if it exists")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"],
                   help="mean over the tokens (sentence-transformers) or the [CLS] state (default: mean)")
    p.add_argument("--normalize", action="store_true", help="scale every embedding to unit length")
    p.add_argument("--similar", metavar="QUERY", help="rank the texts by cosine similarity to QUERY")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="with --similar: show K (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts per batch (default: 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_embed)


def _texts(args: argparse.Namespace) -> list[str]:
    from divekit.tasks.embed import MAX_LINE_CHARS, read_lines

    texts = [t[:MAX_LINE_CHARS] for t in args.texts]
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise DivekitError(f"--input {args.input!r} is not a file")
        texts += read_lines(path)
    if not texts:
        raise DivekitError("nothing to embed: give TEXT arguments or -i FILE with non-empty lines")
    return texts


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _check_output(args: argparse.Namespace) -> Path:
    from divekit.io import check_output  # never an input; an existing file only with --overwrite

    inputs: list[Path] = [Path(args.input)] if args.input else []
    ckpt = Path(args.checkpoint)
    if ckpt.is_dir():
        inputs += [f for f in ckpt.rglob("*") if f.is_file()]
    return check_output(args.output, inputs, overwrite=args.overwrite).resolve()


def cmd_embed(args: argparse.Namespace) -> None:
    from divekit.tasks.embed import Embedder

    if args.top_k is not None and args.similar is None:
        raise DivekitError("--top-k ranks the texts for --similar QUERY; give --similar as well, "
                           "or leave --top-k out")
    if args.similar is not None and (args.output or args.normalize):
        raise DivekitError("--similar prints a ranking; -o and --normalize apply to embeddings "
                           "without --similar")
    texts = _texts(args)
    out = _check_output(args) if args.output else None
    if args.batch_size < 1:
        raise DivekitError(f"--batch-size must be at least 1, got {args.batch_size}")
    embedder = Embedder(args.checkpoint, args.device)
    progress = not args.quiet and len(texts) > 4 * args.batch_size and sys.stderr.isatty()
    if args.similar is not None:
        top_k = 5 if args.top_k is None else args.top_k
        for i, score, text in embedder.most_similar(args.similar, texts, top_k, args.pooling,
                                                    args.batch_size, progress):
            print(f"{score:.4f}\t{i + 1}\t{_shown(text)}")
        return
    E = embedder.embed(texts, args.pooling, args.batch_size, args.normalize, progress)
    if out is not None:
        from divekit.tasks.embed import save_embeddings

        save_embeddings(out, E)
        print(f"{len(texts)} embeddings of {E.shape[1]} dimensions ({args.pooling} pooling) -> {out}")
        return
    for text, e in zip(texts, E):
        head = ", ".join(f"{v:+.4f}" for v in e[:4].tolist())
        print(f"[{head}, ...] ({E.shape[1]} dims, norm {float(e.norm()):.3f})  {_shown(text)}")

