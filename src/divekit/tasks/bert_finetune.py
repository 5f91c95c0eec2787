"""Fine-tuning a pretrained BERT (d2l 16.6–16.7): ``divekit finetune CKPT --task classify|pair|tag|qa``.

One task, four heads. The task loads the encoder, the tokenizer and the data, and builds the
model; everything that differs by head (how examples become tensors, the loss, the metrics,
``predict`` and how results print) is one object of :mod:`divekit.tasks.finetune_heads`, picked
once from ``--task`` (the layers themselves are :mod:`divekit.models.bert_heads`').

Parameter-efficient options (:mod:`divekit.models.lora`): ``--lora R`` (LoRA on
``--lora-targets``), ``--adapters SIZE`` and ``--add-tokens FILE`` freeze the encoder (unless
``--unfreeze``) and make the run's checkpoints hold only what trains; ``config.json`` points to
the base checkpoint (``base_checkpoint``), which is loaded first when the run is opened.

Such an adapter-only run is only half a model: the other half is the base's weights file. The
record therefore also keeps that file's SHA-256 (``base_sha256``, :func:`weights_sha256`), and
opening the run (``evaluate``, ``predict``, ``--resume``) refuses in one line when the base has
changed or is gone, naming both hashes: training the base further would otherwise change the
run's predictions without a word. ``finetune ... --resume --force-resume`` accepts the new base
(and records the change in ``base_changes``); every other fix is to put the original base back
or train the run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from divekit.config import option
from divekit.data.loader import TensorBatchLoader
from divekit.data.text_generated import GENERATED
from divekit.data.text_tasks import REAL, TextTaskData, load_csv
from divekit.engine.config import TaskConfig, finite
from divekit.engine.task import Task
from divekit.errors import DivekitError
from divekit.io import read_json_object
from divekit.models import lora
from divekit.models.bert import BertConfig, BertModel
from divekit.models.bert_checkpoint import (
    config_from_checkpoint,
    load_pretrained,
    read_weights,
    resolve_checkpoint,
)
from divekit.models.bert_heads import BertWithHead, ExtendedEmbedding, make_head
from divekit.tasks.bert_finetune_io import add_words, read_words
from divekit.tasks.finetune_heads import HEAD_CLASSES, FinetuneHead
from divekit.tokenizers import BertTokenizer

log = logging.getLogger("divekit")
TOKENIZER = "tokenizer"
# the largest sizes a user may give, checked before anything is allocated: a LoRA rank or an
# adapter width past the encoder's width (MiniLM 384, BERT-large 1024) adds nothing a full
# fine-tuning would not, and --adapters 1e8 asked for 51 GB
MAX_LORA_RANK = 1024
MAX_ADAPTER_SIZE = 4096


@dataclass(frozen=True)
class TextFinetuneConfig(TaskConfig):
    """Options of ``divekit finetune CHECKPOINT_OR_RUN --task ...``."""

    source: str = option("minilm", "BERT checkpoint directory, pretraining run, or minilm", cli=False)
    task: str = option("classify", "the head: classify (one text), pair (two texts), tag (a "
                       "label per word), qa (an answer span)", choices=list(HEAD_CLASSES))
    model: str = option("bert", "", cli=False)
    epochs: int = option(3, "total epochs")
    lr: float = option(1e-4, "learning rate")
    optimizer: str = option("adamw", "optimizer", choices=["sgd", "adam", "adamw"])
    batch_size: int | str = option(32, "examples (QA: windows) per minibatch, or auto: the "
                                   "largest that fits, capped at 10 × the labels", metavar="N|auto")
    max_len: int = option(128, "tokens per input, [CLS] and [SEP] included", metavar="T")
    max_answer_len: int = option(30, "qa: longest answer span in tokens", metavar="N")
    doc_stride: int = option(32, "qa: context tokens shared by consecutive windows of a long "
                             "passage", metavar="N")
    text_columns: str = option("text", "csv:PATH data: the text column(s), a or a,b", metavar="A[,B]")
    label_column: str = option("label", "csv:PATH data: the label column", metavar="C")
    head_dropout: float = option(0.1, "dropout before the head's layers")
    add_tokens: str | None = option(None, "a file of domain words (one a line) added whole to "
                                    "the vocabulary; only their new embedding rows (and the head) "
                                    "train unless --unfreeze", metavar="FILE")
    unfreeze: bool = option(False, "train the whole encoder as well with --add-tokens/--lora/--adapters")
    lora: int = option(0, f"LoRA rank r on --lora-targets (0 = off; at most {MAX_LORA_RANK})",
                       metavar="R")
    lora_alpha: float = option(16.0, "LoRA scale α (the update is α/r · BA)")
    lora_dropout: float = option(0.0, "dropout on the LoRA branch's input")
    lora_targets: str = option("query,value", "linear layers LoRA wraps: names (query, key, value, "
                               "output, dense1, dense2) or globs on the full name", metavar="LIST")
    adapters: int = option(0, "bottleneck adapters of SIZE units after attention and FFN (0 = "
                           f"off; at most {MAX_ADAPTER_SIZE})", metavar="SIZE")
    self_contained: bool = option(
        False, "keep everything the run needs in the run: the base's weights in every checkpoint "
        "(a LoRA/adapter run otherwise stores only what it trains), its BERT config and "
        "vocabulary, so evaluate, predict, export and serve never read the base again (larger "
        "checkpoints)")

    def checks(self) -> list[tuple[bool, str]]:
        heads = ", ".join(HEAD_CLASSES)
        return super().checks() + [
            (self.task in HEAD_CLASSES, f"--task must be one of {heads}, got {self.task!r}"),
            (isinstance(self.max_len, int) and 16 <= self.max_len <= 4096,
             f"--max-len must be in [16, 4096], got {self.max_len}"),
            (isinstance(self.max_answer_len, int) and self.max_answer_len >= 1,
             f"--max-answer-len must be at least 1, got {self.max_answer_len}"),
            (isinstance(self.doc_stride, int) and self.doc_stride >= 0,
             f"--doc-stride must be 0 or more, got {self.doc_stride}"),
            (finite(self.head_dropout) and 0 <= self.head_dropout < 1,
             f"--head-dropout must be in [0, 1), got {self.head_dropout}"),
            (isinstance(self.lora, int) and 0 <= self.lora <= MAX_LORA_RANK,
             f"--lora must be 0 (off) or a rank up to {MAX_LORA_RANK}, got {self.lora}"),
            (finite(self.lora_alpha) and self.lora_alpha > 0, f"--lora-alpha must be positive, got {self.lora_alpha}"),
            (finite(self.lora_dropout) and 0 <= self.lora_dropout < 1,
             f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (isinstance(self.adapters, int) and 0 <= self.adapters <= MAX_ADAPTER_SIZE,
             f"--adapters must be 0 (off) or a size up to {MAX_ADAPTER_SIZE}, got {self.adapters}"),
            (self.add_tokens is None or Path(self.add_tokens).is_file(),
             f"--add-tokens {self.add_tokens!r} is not a file"),
        ]

    @property
    def data_name(self) -> str:
        return self.data or HEAD_CLASSES[self.task].default_data

    @property
    def run_name(self) -> str:
        return f"bert-{self.task}-{Path(self.data_name.removeprefix('csv:')).stem}"

    @property
    def frozen_base(self) -> bool:
        return bool(self.lora or self.adapters or self.add_tokens) and not self.unfreeze


def is_bert_source(spec: str | None) -> bool:
    """Whether SOURCE names a BERT to fine-tune: ``minilm``, a checkpoint directory (its
    ``config.json`` has a ``model_type``), or a pretraining run (a ``bert/`` export, or a
    ``bert_pretrain`` record). Nothing is loaded: ``divekit finetune`` picks the text path by
    this and the image path by :func:`divekit.tasks.finetune.is_image_source`."""
    if spec == "minilm":
        return True
    path = Path(spec or "")
    if not spec or not path.is_dir():
        return False
    if (path / "bert" / "config.json").is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and ("model_type" in config
                                         or config.get("task") == "bert_pretrain")


def text_finetune_config(typed: dict[str, Any]) -> TextFinetuneConfig:
    """The :class:`TextFinetuneConfig` of what was typed (``source`` and the options), over the
    run's own options with ``--resume`` (:func:`~divekit.engine.record.resume_values`).

    Options of image fine-tuning, and options typed without the one they need
    (:func:`check_option_pairs`), are refused in one line. Without ``task`` the head is
    ``classify``, and a note says so."""
    from divekit.config import config_from_dict, field_names, flag_name
    from divekit.engine.record import resume_values

    foreign = sorted(k for k in typed if k not in field_names(TextFinetuneConfig))
    task = typed.get("task", TextFinetuneConfig.task)
    if foreign:
        flags = ", ".join(flag_name(k) for k in foreign)
        raise DivekitError(f"{flags} apply to image fine-tuning, not to --task {task}")
    if "task" not in typed and not typed.get("resume"):
        log.info("no --task: fine-tuning %s as %s (one label per text; --task pair, tag or qa "
                 "for the other heads)", typed.get("source", "minilm"), task)
    given = dict(typed)
    if typed.get("resume"):
        probe = config_from_dict(TextFinetuneConfig, typed)
        probe.validate()
        given = resume_values(TextFinetuneConfig, typed, probe.run_name)
    config = config_from_dict(TextFinetuneConfig, given)
    config.validate()
    check_option_pairs(config, typed)
    return config


def check_option_pairs(cfg: TextFinetuneConfig, typed: dict[str, Any]) -> None:
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


def load_text_task(config: TextFinetuneConfig) -> TextTaskData:
    """The data ``--data`` names: a generated task, a real format from ``--data-dir``, or csv:PATH."""
    name = config.data_name
    if name.startswith("csv:"):
        data = load_csv(name, config.text_columns.split(","), config.label_column)
    elif name in GENERATED:
        data = GENERATED[name](seed=config.seed)
    elif name in REAL:
        data = REAL[name](data_dir=config.data_dir)
    else:
        known = sorted([*GENERATED, *REAL])
        raise DivekitError(f"--data {name!r} is not a text task; choose one of {', '.join(known)} "
                           "or csv:PATH")
    if data.kind != config.task:
        raise DivekitError(f"--data {name} is a {data.kind} dataset, not one for --task {config.task}")
    if config.limit:
        data.train = data.train[: config.limit]
    return data


def base_weights_file(directory: Path) -> Path:
    """The file :func:`~divekit.models.bert_checkpoint.read_weights` reads in a resolved BERT
    checkpoint directory: ``model.safetensors``, else ``pytorch_model.bin``."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    read_weights(directory)  # raises the one-line "missing model.safetensors" error
    raise AssertionError("unreachable")


def weights_sha256(base: str) -> str:
    """The SHA-256 (hex) of the weights file of ``base`` (``minilm``, a checkpoint directory or
    a pretraining run), read in 1 MiB blocks: ~0.2 s for MiniLM's 91 MB."""
    path = base_weights_file(resolve_checkpoint(base))
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _trim(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Cut the padding every row of the batch shares (the columns past the longest row)."""
    t = int(batch[2].max())
    return tuple(x[:, :t] if x.dim() == 2 and x.shape[1] > 2 else x for x in batch)


@dataclass(frozen=True)
class TextPredictConfig:
    """Options of ``divekit predict`` on a text fine-tuning run (each head reads its own)."""

    top_k: int = option(3, "classify/pair: labels to show per text", metavar="K")
    max_answer_len: int | None = option(None, "question answering: longest answer span, in "
                                        "tokens (default: the run's)", metavar="N")


def _stored_bert_config(stored: Any) -> BertConfig:
    """The BERT architecture a self-contained run recorded (``bert_config`` in its
    config.json), refused in one line when it does not describe one."""
    try:
        return BertConfig(**stored)
    except (TypeError, ValueError) as e:
        raise DivekitError(f"config.json: bert_config does not describe a BERT ({e})") from None


class TextFinetuneTask(Task, name="bert_finetune"):
    """A pretrained BERT encoder with a fresh head for one of the four tasks; the head's own
    work is :attr:`head`'s (:mod:`divekit.tasks.finetune_heads`)."""

    Config = TextFinetuneConfig
    PredictConfig = TextPredictConfig

    def __init__(self, config: TextFinetuneConfig, record: dict[str, Any] | None = None):
        super().__init__(config, record)
        self._tokenizer: BertTokenizer | None = None
        self.added_words: list[str] = list(self.record.get("added_tokens", []))

    @cached_property
    def head(self) -> FinetuneHead:
        """The head ``--task`` names, made once (a run's record is checked before it is used)."""
        head_class = HEAD_CLASSES.get(self.config.task)
        if head_class is None:
            raise DivekitError(f"--task must be one of {', '.join(HEAD_CLASSES)}, "
                               f"got {self.config.task!r}")
        return head_class(self)

    # ------------------------------------------------------------------ data
    @cached_property
    def data(self) -> TextTaskData:
        return load_text_task(self.config)

    @property
    def labels(self) -> list[str]:
        return list(self.record["labels"]) if "labels" in self.record else self.data.labels

    @property
    def base(self) -> str:
        return str(self.record.get("base_checkpoint") or self.config.source)

    @property
    def tokenizer(self) -> BertTokenizer:
        if self._tokenizer is None:
            tok = BertTokenizer.load(resolve_checkpoint(self.base))
            if self.config.add_tokens:
                tok, self.added_words, skipped = add_words(tok, read_words(self.config.add_tokens))
                if skipped:
                    log.warning(f"--add-tokens: {len(skipped)} word(s) already in the vocabulary "
                                f"were skipped ({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})")
            self._tokenizer = tok
        self._tokenizer.max_len = min(self.config.max_len, self._tokenizer.max_len)
        return self._tokenizer

    def _encode(self, examples: list[Any], where: str) -> tuple[Tensor, ...]:
        return self.head.encode(examples, where)

    def train_data(self) -> TensorBatchLoader:
        return TensorBatchLoader(*self._encode(self.data.train, "training data"),
                                 batch_size=self.config.batch_size, shuffle=True,
                                 seed=self.config.seed, batch_transform=_trim)

    def val_data(self) -> TensorBatchLoader | None:
        if not self.data.valid:
            return None
        return TensorBatchLoader(*self._encode(self.data.valid, "validation"),
                                 batch_size=self.config.batch_size, batch_transform=_trim)

    def prepare(self) -> None:
        """``--batch-size auto`` → the largest batch of the training tensors (padded to their
        longest row) that fits, capped at 10 × the labels (not for qa), logged with the reason."""
        cfg = self.config
        if cfg.batch_size != "auto":
            return
        from divekit.engine.batch_size import choose_batch_size_for
        from divekit.engine.device import resolve_device

        tensors = self._encode(self.data.train, "training data")
        quiet = logging.getLogger("divekit")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # the Trainer builds the model again and reports it
        try:
            model = self.build_model()
        finally:
            quiet.setLevel(level)
        choice = choose_batch_size_for(
            model, tuple(t[:1] for t in tensors), lambda m, b: self.training_step(m, b)[0],
            num_classes=self.head.num_classes(),
            device=resolve_device(cfg.device), max_batch=max(1, len(tensors[0])),
            optimizer=cfg.optimizer)
        log.info("--batch-size auto: %d (%s)", choice.batch_size, choice.reason)
        self.config = dataclasses.replace(cfg, batch_size=choice.batch_size)

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        c = self.config
        stored = self.record.get("bert_config") if self.record.get("self_contained") else None
        if stored is not None:  # a self-contained run: its checkpoint holds every weight
            bert = BertModel(_stored_bert_config(stored))
        else:
            bert, _ = load_pretrained(self.base)
        encoder = bert.encoder
        if self.added_words or self.record.get("added_tokens"):
            encoder.token_embedding = ExtendedEmbedding(encoder.token_embedding, len(self.added_words))
        pooler = bert.hidden if self.head.pooled else None
        model = BertWithHead(encoder, make_head(self.head.name, bert.config.num_hiddens,
                                               self.head.outputs(), c.head_dropout, pooler))
        if c.lora:
            lora.apply_lora(model.encoder, lora.parse_targets(c.lora_targets), c.lora, c.lora_alpha,
                            c.lora_dropout)
        if c.adapters:
            lora.add_adapters(model.encoder, c.adapters, bert.config.num_hiddens)
        if c.frozen_base:
            lora.freeze_except(model, keep=("head.", "encoder.token_embedding.added"))
            if not c.self_contained:
                model.save_only(n for n, p in model.named_parameters() if p.requires_grad)
        lora.report(model)
        return model.train()

    def run_record(self) -> dict[str, Any]:
        base = self.config.source
        if base != "minilm":
            base = str(resolve_checkpoint(base).resolve())
        digest = weights_sha256(base)
        contained = {}
        if self.config.self_contained:
            path = resolve_checkpoint(base) / "config.json"
            config = config_from_checkpoint(read_json_object(path), path)
            contained = {"self_contained": True, "bert_config": dataclasses.asdict(config)}
        return {"labels": self.labels, "base_checkpoint": base, "base_sha256": digest,
                "added_tokens": self.added_words, "head": self.config.task,
                "notes": self.data.notes,
                "adapter_only": self.config.frozen_base and not self.config.self_contained,
                **contained, **self._base_changes(digest)}

    def _base_changes(self, digest: str) -> dict[str, Any]:
        """On ``--resume`` of an adapter-only run: refuse a base whose weights are not the ones
        the run was trained on (unless ``--force-resume``, which records the change under
        ``base_changes``, with the earlier ones). Called under the run's lock, where the record
        is written; ``{}`` or ``{"base_changes": [...]}``."""
        from divekit.engine.record import choose_run_dir, read_record

        cfg = self.config
        if not cfg.resume:
            return {}
        run_dir = choose_run_dir(cfg.out, cfg.run_name, resume=True)
        old = read_record(run_dir)
        earlier = old.get("base_changes")
        changes = list(earlier) if isinstance(earlier, list) else []
        then = old.get("base_sha256")
        if isinstance(then, str) and then != digest and old.get("adapter_only"):
            where = f"{run_dir} holds only the weights trained on top of its base {cfg.source}"
            if not cfg.force_resume:
                raise DivekitError(
                    f"{where}, whose weights changed (sha256 {then[:16]} in the run, "
                    f"{digest[:16]} now): put the original base back, train the run again, or "
                    "pass --force-resume to continue on the new base (recorded in config.json)")
            log.warning("--force-resume: %s, whose weights changed (sha256 %s in the run, %s "
                        "now): continuing on the new base", where, then[:16], digest[:16])
            changes.append({"base_sha256": then, "now": digest})
        return {"base_changes": changes} if changes else {}

    def check_base(self, run_dir: Any) -> None:
        """Refuse to open an adapter-only run whose base is gone or whose base weights are not
        the ones it was trained on (``base_sha256`` in its record), in one line naming both
        hashes. Records from before the hash was kept are not checked."""
        want = self.record.get("base_sha256")
        if not self.record.get("adapter_only") or not isinstance(want, str):
            return
        fix = (f"put the original base back, train the run again, or continue training on the "
               f"new base with `divekit finetune {self.base} --task {self.config.task} --resume "
               f"--out {run_dir} --force-resume`")
        try:
            now = weights_sha256(self.base)
        except DivekitError as e:
            raise DivekitError(f"{run_dir} holds only the weights trained on top of its base "
                               f"{self.base} (sha256 {want[:16]}), which cannot be read ({e}); "
                               "put it back there or train the run again") from None
        if now != want:
            raise DivekitError(
                f"{run_dir} holds only the weights trained on top of its base {self.base}, whose "
                f"weights changed (sha256 {want[:16]} in the run, {now[:16]} now), so its "
                f"predictions would change silently: {fix}")

    def save_extras(self, run_dir: Any) -> None:
        self.tokenizer.save(Path(run_dir) / TOKENIZER)

    def check_loaded(self, run_dir: Any) -> None:
        """A run's ``config.json`` is checked for ranges as the command line is (the config's
        :meth:`checks`, less the --add-tokens file, which is not needed once trained), and its
        facts for what this task knows: ``model`` is ``bert``, ``head`` is the config's task,
        ``labels`` are distinct non-empty strings (two or more but for tag). One line naming
        the file and the value (a tampered ``max_len -5`` was used as is)."""
        path = Path(run_dir) / "config.json"
        wrong = [msg for ok, msg in self.config.checks()
                 if not ok and not msg.startswith("--add-tokens")]
        if wrong:
            raise DivekitError(f"{path}: {wrong[0]}")
        if self.config.model != "bert":
            raise DivekitError(f"{path}: model {self.config.model!r} is not a text fine-tuning "
                               "model (bert)")
        head = self.record.get("head", self.config.task)
        if head != self.config.task:
            raise DivekitError(f"{path}: head {head!r} does not match the config's task "
                               f"{self.config.task!r}")
        labels = self.record.get("labels")
        fewest = self.head.fewest_labels
        if fewest is not None:
            if (not isinstance(labels, list) or len(labels) < fewest
                    or not all(isinstance(x, str) and x for x in labels)):
                raise DivekitError(f"{path}: labels must be a list of {fewest} or more non-empty "
                                   f"strings, got {str(labels)[:80]}")
            if len(set(labels)) != len(labels):
                dup = next(x for x in labels if labels.count(x) > 1)
                raise DivekitError(f"{path}: labels name {dup!r} twice")

    def load_extras(self, run_dir: Any) -> None:
        self.check_loaded(run_dir)
        if self.record.get("self_contained"):  # its vocabulary (added words too) is the run's
            self._tokenizer = BertTokenizer.load(Path(run_dir) / TOKENIZER)
            return
        self.check_base(run_dir)
        tok = BertTokenizer.load(resolve_checkpoint(self.base))
        if self.added_words:
            tok = add_words(tok, self.added_words)[0]
        self._tokenizer = tok

    # ------------------------------------------------------------------ steps
    def training_step(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        tokens, segments, valid, y = batch[:4]
        return self.head.loss(model(tokens, segments, valid), y)

    def validation_step(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        tokens, segments, valid = batch[:3]
        return self.head.validation_step(model(tokens, segments, valid).float(), batch)

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        return self.head.validation_end(sums)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def predict(self, model: nn.Module, inputs: Any, *, top_k: int = 3,
                max_answer_len: int | None = None) -> list[dict[str, Any]]:
        """The head's predictions on ``inputs`` (:meth:`FinetuneHead.read_inputs` reads them),
        with :class:`TextPredictConfig`'s options; any other option is refused by
        :func:`divekit.engine.run.predict`."""
        model.eval()
        device = next(model.parameters()).device
        options = TextPredictConfig(top_k=top_k, max_answer_len=max_answer_len)
        return self.head.predict(model, self.head.read_inputs(inputs), device, options)

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return self.head.format_metrics(metrics)

    def format_prediction(self, item: dict[str, Any]) -> str:
        return self.head.format_prediction(item)
