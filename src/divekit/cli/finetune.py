"""``divekit finetune SOURCE``: fine-tuning an image classifier or a BERT, picked from what
SOURCE is.

* a BERT (``minilm``, a checkpoint directory, a pretraining run): text fine-tuning with a
  fresh head, ``--task classify|pair|tag|qa`` (:mod:`divekit.tasks.bert_finetune`);
* an image classifier (a divekit run directory, a torchvision ``.pth`` weights file,
  ``ARCH:WEIGHTS``): image fine-tuning (:mod:`divekit.tasks.finetune`).

A SOURCE that is neither (a path that does not exist yet) takes the text path when ``--task``
is typed, else the image path, whose errors then say what a SOURCE may be. One parser reads the
options of both paths, so an option of the other path is refused in one line that names it
rather than as an unknown flag; ``--help`` shows only the options of the path that SOURCE and
``--task`` (typed before ``--help``) pick, each help saying how to see the other.
"""

from __future__ import annotations

import argparse
from typing import Any

from divekit.errors import DivekitError

COMMANDS = ("finetune",)

IMAGE_DESCRIPTION = (
    "Copy SOURCE's feature extractor, give it a fresh head for --data's classes, and train: the "
    "head at --head-lr-mult × --lr, the copied stages at --lr (times --lr-decay per stage "
    "down), the first --freeze stages not at all. SOURCE: a divekit run directory, a "
    "torchvision weights file (.pth state dict; --arch or its file name says the "
    "architecture), or ARCH:WEIGHTS such as resnet18:IMAGENET1K_V1 (downloads once). "
    "A BERT SOURCE (minilm, a checkpoint directory, a pretraining run) is text fine-tuning: "
    "see `divekit finetune --task classify --help`.")
TEXT_DESCRIPTION = (
    "Give a pretrained BERT encoder a fresh head for --task and train both on --data: "
    "classify (one text), pair (two texts), tag (a label per word) or qa (an answer span in a "
    "passage). SOURCE: minilm, a BERT checkpoint directory (config.json, vocab.txt, "
    "model.safetensors), or a `divekit train bert_*` pretraining run. Without --task the head "
    "is classify. An image classifier SOURCE (a run directory, a .pth file, ARCH:WEIGHTS) is "
    "image fine-tuning: see `divekit finetune --help`.")

IMAGE_EXAMPLES = """\
examples:
  divekit finetune runs/lenet_bn-digits --data digits --classes 5-9 --shots 6 --freeze 2
  divekit finetune resnet18:IMAGENET1K_V1 --data fashion-mnist --data-dir ~/data/fashion-mnist
  divekit finetune resnet18-f37072fd.pth --data digits --lr-decay 0.7    a torchvision file
"""
TEXT_EXAMPLES = """\
examples:
  divekit finetune minilm --task classify                      generated reviews (sentiment-gen)
  divekit finetune minilm --task pair --data snli --data-dir ~/data/snli_1.0
  divekit finetune minilm --task tag --data conll2003 --data-dir ~/data/conll2003
  divekit finetune minilm --task qa --data squad --data-dir ~/data/squad --max-len 384
  divekit finetune minilm --task classify --data csv:reviews.csv --text-columns body --label-column stars
  divekit finetune minilm --task classify --lora 8              LoRA on the query/value projections
  divekit finetune minilm --task tag --add-tokens words.txt     domain words, only their rows train
  divekit predict runs/bert-pair-nli-gen "A chef cooks. ||| Nobody cooks."
"""


def source_path(source: str | None, task_typed: bool) -> str:
    """``"text"`` or ``"image"``: the path ``finetune`` takes for SOURCE. A BERT or an image
    classifier decides by itself; a SOURCE that is neither goes by whether ``--task`` was
    typed. ``--task`` with an image classifier is refused in one line."""
    from divekit.tasks.bert_finetune import is_bert_source
    from divekit.tasks.finetune import is_image_source

    if is_bert_source(source):
        return "text"
    if is_image_source(source):
        if task_typed:
            raise DivekitError(f"--task is for text fine-tuning of a BERT (minilm, a checkpoint "
                               f"directory, a pretraining run); SOURCE {source} is an image "
                               "classifier: leave --task out")
        return "image"
    return "text" if task_typed else "image"


def path_parser(prog: str, path: str, parent: argparse.ArgumentParser | None = None
                ) -> argparse.ArgumentParser:
    """The parser of one path, with that path's options and defaults only (the help shown)."""
    import textwrap

    from divekit.config import add_config_options

    text = path == "text"
    p = argparse.ArgumentParser(
        prog=prog, parents=[parent] if parent is not None else [],
        usage=f"%(prog)s SOURCE {'[--task {classify,pair,tag,qa}] ' if text else ''}[options]",
        description=textwrap.fill(TEXT_DESCRIPTION if text else IMAGE_DESCRIPTION, 90),
        epilog=TEXT_EXAMPLES if text else IMAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if text:
        from divekit.tasks.bert_finetune import TextFinetuneConfig as config_cls
    else:
        from divekit.tasks.finetune import FinetuneConfig as config_cls  # type: ignore[assignment]
    p.add_argument("source", help="minilm, a BERT checkpoint directory, or a pretraining run"
                   if text else "run directory, torchvision weights file, or ARCH:WEIGHTS")
    if text:  # each head has its generated set (TextFinetuneConfig.data_name)
        from divekit.tasks.finetune_heads import HEAD_CLASSES

        sets = ", ".join(f"{name}: {h.default_data}" for name, h in HEAD_CLASSES.items())
        add_config_options(p, config_cls, shown={"data": f"by --task ({sets})"})
    else:
        add_config_options(p, config_cls)
    return p


class _PathHelp(argparse.Action):
    """``-h/--help``: the help of the path that SOURCE and ``--task``, as read so far, pick."""

    def __init__(self, option_strings: list[str], dest: str, parent: argparse.ArgumentParser,
                 **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.parent = parent

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        source, task_typed = getattr(namespace, "source", None), "task" in namespace
        try:
            path = source_path(source, task_typed)
        except DivekitError:  # --task with an image SOURCE: the help --task asks for
            path = "text"
        path_parser(parser.prog, path, self.parent).print_help()
        parser.exit()


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    from divekit.config import add_config_options, field_names
    from divekit.tasks.bert_finetune import TextFinetuneConfig
    from divekit.tasks.finetune import FinetuneConfig

    p = sub.add_parser("finetune", parents=[parent], add_help=False,
                       help="fine-tune a pretrained image classifier or BERT on a dataset",
                       description=IMAGE_DESCRIPTION)
    p.add_argument("-h", "--help", action=_PathHelp, parent=parent,
                   help="show the options of the path SOURCE (and --task) pick, and exit")
    p.add_argument("source", help="an image classifier or a BERT (see --help)")
    add_config_options(p, FinetuneConfig)
    add_config_options(p, TextFinetuneConfig, skip=frozenset(field_names(FinetuneConfig)))
    p.set_defaults(handler=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> None:
    from divekit.cli import print_final
    from divekit.config import typed_options

    typed = typed_options(args)
    if source_path(typed.get("source"), "task" in typed) == "text":
        from divekit.engine.run import train
        from divekit.tasks.bert_finetune import TextFinetuneTask, text_finetune_config

        print_final(train(TextFinetuneTask(text_finetune_config(typed))))
    else:
        from divekit.tasks.finetune import finetune, finetune_config

        print_final(finetune(finetune_config(typed)))
