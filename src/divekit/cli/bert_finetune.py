"""``divekit finetune CHECKPOINT_OR_RUN --task classify|pair|tag|qa``: the text path of the
``finetune`` command (:mod:`divekit.cli.vision` hands over when ``--task`` is given), and how
``divekit evaluate`` and ``predict`` print a text fine-tuning run."""

from __future__ import annotations

import argparse
from typing import Any

from divekit.errors import DivekitError

TASKS = ("bert_finetune",)

EXAMPLES = """\
text fine-tuning (--task): SOURCE is a BERT checkpoint directory, a pretraining run, or minilm
  divekit finetune minilm --task classify                      generated reviews (sentiment-gen)
  divekit finetune minilm --task pair --data snli --data-dir ~/data/snli_1.0
  divekit finetune minilm --task tag --data conll2003 --data-dir ~/data/conll2003
  divekit finetune minilm --task qa --data squad --data-dir ~/data/squad --max-len 384
  divekit finetune minilm --task classify --data csv:reviews.csv --text-columns body --label-column stars
  divekit finetune minilm --task classify --lora 8              LoRA on the query/value projections
  divekit finetune minilm --task tag --add-tokens words.txt     domain words, only their rows train
  divekit predict runs/bert-pair-nli-gen "A chef cooks. ||| Nobody cooks."
"""


def add_text_options(p: argparse.ArgumentParser, skip: set[str]) -> None:
    """The text fine-tuning options that the image ``finetune`` options lack."""
    from divekit.config import add_config_options
    from divekit.tasks.bert_finetune import TextFinetuneConfig

    add_config_options(p, TextFinetuneConfig, skip=frozenset(skip),
                       group_title="text fine-tuning (with --task; shared options default to "
                       "adamw, --lr 1e-4, --epochs 3, --batch-size 32 there)")


def text_config(given: dict[str, Any]) -> Any:
    """The :class:`TextFinetuneConfig` of what was typed; image-only options are refused."""
    from divekit.config import config_from_dict, field_names
    from divekit.engine.record import read_record, saved_options
    from divekit.tasks.bert_finetune import TextFinetuneConfig

    names = field_names(TextFinetuneConfig)
    foreign = sorted(k for k in given if k not in names)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise DivekitError(f"{flags} apply to image fine-tuning, not to --task {given['task']}")
    typed = dict(given)
    if given.get("resume") and given.get("out"):
        saved = read_record(given["out"])["config"]
        given = {**saved_options(TextFinetuneConfig, saved, given, given["out"]), **given}
    cfg = config_from_dict(TextFinetuneConfig, given)
    cfg.validate()
    check_option_pairs(cfg, typed)
    return cfg


def check_option_pairs(cfg: Any, typed: dict[str, Any]) -> None:
    """Options typed without the one they need, or with data they do not apply to, are refused
    in one line instead of being dropped: --lora-targets/--lora-alpha/--lora-dropout need
    --lora, --unfreeze needs something frozen (--lora, --adapters or --add-tokens), and
    --text-columns/--label-column read csv:PATH data only (one or two columns)."""
    needs = {"lora_targets": "--lora R", "lora_alpha": "--lora R", "lora_dropout": "--lora R"}
    for key, need in needs.items():
        if key in typed and not cfg.lora:
            raise DivekitError(f"--{key.replace('_', '-')} applies to LoRA only: give {need} "
                               "as well, or leave it out")
    if typed.get("unfreeze") and not (cfg.lora or cfg.adapters or cfg.add_tokens):
        raise DivekitError("--unfreeze trains the encoder alongside --lora, --adapters or "
                           "--add-tokens, which freeze it; without them the whole encoder "
                           "trains anyway: leave --unfreeze out")
    columns = [c for c in str(cfg.text_columns).split(",")]
    if len(columns) > 2 or not all(c.strip() for c in columns):
        raise DivekitError(f"--text-columns takes one column or two (a,b), got "
                           f"{cfg.text_columns!r}")
    for key in ("text_columns", "label_column"):
        if key in typed and not cfg.data_name.startswith("csv:"):
            raise DivekitError(f"--{key.replace('_', '-')} reads csv:PATH data; --data "
                               f"{cfg.data_name} has its own columns")


def cmd_finetune_text(args: argparse.Namespace) -> None:
    from divekit.cli import print_final
    from divekit.config import typed_options
    from divekit.engine.run import train
    from divekit.tasks.bert_finetune import TextFinetuneTask

    cfg = text_config(typed_options(args))
    result = train(TextFinetuneTask(cfg))
    print_final(result)


def format_metrics(metrics: dict[str, Any]) -> str:
    """``divekit evaluate`` on a text fine-tuning run: the head's metrics."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def format_prediction(item: dict[str, Any]) -> str:
    if "answer" in item:
        return f"{item['input']}: {item['answer']!r} (score {item['score']:.3f})"
    if "entities" in item:
        shown = ", ".join(f"{kind}: {text}" for kind, text in item["entities"]) or "no entities"
        return f"{item['input']}: {shown}"
    others = ", ".join(f"{c} {p:.3f}" for c, p in item["top"][1:])
    gold = f" [gold: {item['gold']}]" if "gold" in item else ""
    return (f"{item['input']}: {item['label']} {item['probability']:.3f}"
            + (f" ({others})" if others else "") + gold)
