"""A stand-in for the book's pretrained ``bert.small``, pretrained by divekit itself.

The fine-tuning sections (natural-language inference with BERT) add
``DATA_HUB['bert.small']`` (``bert.small.torch.zip``) and read ``vocab.json`` (the
vocabulary's ``idx_to_token``) and ``pretrained.params`` (a ``state_dict``) from
``download_extract('bert.small')``. Where that archive is not here, ``download_extract`` falls
back to this stand-in (one ``d2l: ... not found ...; using ... instead`` note; refused under
``DIVEKIT_BOOK_STRICT=1``): a BERT of exactly bert.small's shape (2 layers, 256 hidden units,
4 heads, 512 feed-forward units, 512 positions) pretrained here with both of BERT's
objectives (masked LM + next-sentence prediction) on the nearest real text:

* WikiText-2's validation split when one is found (``_text._wiki_valid_split()``), else
* the prose paragraphs of Python's help text (``divekit.data.bert_pretrain.pydoc_paragraphs``).

The pieces are divekit's and the compat layer's own: sentences lower-cased and split on spaces
as the book's ``_read_wiki``, the book's ``Vocab`` (``<unk>`` at 0, then ``<pad> <mask> <cls>
<sep>``, then words seen :data:`_MIN_FREQ` times), divekit's
:class:`~divekit.data.bert_pretrain.BertPretrainLoader` (NSP pairs with dynamic 80/10/10
masking), the compat :class:`BERTModel` with the section's sizes, the book's
``_get_batch_loss_bert`` and Adam. :data:`_STEPS` steps normally (3.5 minutes measured on two busy CPU
cores), far fewer in quick mode; the step count is part of the stand-in's version, so a quick
stand-in is rebuilt at full size on the next normal run (a full one serves quick runs too).
The folder is written once into divekit's cache (``~/.cache/divekit/d2l-substitutes/
bert.small/<archive stem>/``, beside ``pretraining.json`` with the figures of the run), never
into ``$DIVEKIT_DATA``.

``bert.base`` has no stand-in: pretraining a model of its size (12 layers, 768 hidden units)
is not a matter of minutes on a CPU, so it stays the one-line not-found error.

Differences from the book: the weights are not the book's (it pretrained on a far larger
corpus for far longer) and the vocabulary is the pretraining text's, so fine-tuned accuracies
differ from the book's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from divekit.compat.d2l import _data, _text
from divekit.compat.d2l._util import quick, try_gpu
from divekit.data import bert_pretrain as _bert

__all__: list[str] = []

NAME = "bert.small"
# bert.small's shape, as the section builds it (BERTModel(len(vocab), 256, [256], 256, 512, 4,
# 2, 0.2, max_len=512, 256, 256, 256, 256, 256, 256))
SHAPE = {"num_hiddens": 256, "ffn_num_hiddens": 512, "num_heads": 4, "num_layers": 2,
         "dropout": 0.2, "max_len": 512}
_STEPS = {False: 300, True: 20}  # pretraining steps: normally, in quick mode
_BATCH_SIZE = 32
_MAX_LEN = 64  # tokens of a pretraining pair ([CLS] a [SEP] b [SEP]); positions up to 512 exist
_LR = 1e-3
_WARMUP = 0.1  # share of the steps with a linearly rising learning rate
_MIN_FREQ = 3
_SEED = 0
_REPORT = "pretraining.json"


def _source() -> Path | str:
    """The pretraining text: WikiText-2's validation split when found, else ``'pydoc'``."""
    path = _text._wiki_valid_split()
    return path.resolve() if path is not None else "pydoc"  # one stamp from any working folder


def _stem() -> str:
    """The folder the section reads: the archive's name without its extension (from the
    section's own ``DATA_HUB`` entry; ``bert.small.torch`` for the PyTorch archive)."""
    if NAME in _data.DATA_HUB:
        return _data._stem(_data._entry(NAME)[2])
    return "bert.small.torch"


def _stamp(src: Path | str, steps: int) -> str:
    return (f"1 {src} {_stem()} steps={steps} batch={_BATCH_SIZE} max_len={_MAX_LEN} "
            f"lr={_LR} min_freq={_MIN_FREQ}")


def _version() -> str:
    """The full-size stamp, or in quick mode the quick one unless a full stand-in is built."""
    src = _source()
    full = _stamp(src, _STEPS[False])
    if quick():
        marker = _data._writable_home(generated=True) / "d2l-substitutes" / NAME / ".complete"
        if marker.is_file() and marker.read_text() == full + "\n":
            return full
        return _stamp(src, _STEPS[True])
    return full


def _paragraphs(src: Path | str) -> list[_bert.Paragraph]:
    """Paragraphs of lower-cased sentences (WikiText's ``<unk>`` kept), as ``_read_wiki``."""
    if isinstance(src, Path):
        source = _bert.wiki_paragraphs(src.read_text(encoding="utf-8").split("\n"))
    else:
        source = _bert.pydoc_paragraphs()["train"]
    return [_bert.Paragraph([s.lower().replace("[unk]", "<unk>") for s in p], p.document)
            for p in source]


def _loader(paragraphs: Sequence[_bert.Paragraph]) -> tuple[_bert.BertPretrainLoader, Any]:
    """divekit's pretraining batches over the paragraphs, and the book's ``Vocab`` of them."""
    tokenized = [_text.tokenize(list(p)) for p in paragraphs]
    vocab = _text.Vocab([s for p in tokenized for s in p], min_freq=_MIN_FREQ,
                        reserved_tokens=_text.BERT_RESERVED)
    corpus = _bert.SentenceCorpus.from_ids([[vocab[s] for s in p] for p in tokenized],
                                           [p.document for p in paragraphs])
    special = {"pad": vocab["<pad>"], "unk": vocab.unk, "cls": vocab["<cls>"],
               "sep": vocab["<sep>"], "mask": vocab["<mask>"]}
    loader = _bert.BertPretrainLoader(corpus, batch_size=_BATCH_SIZE, max_len=_MAX_LEN,
                                      vocab_size=len(vocab), special_ids=special, seed=_SEED)
    return loader, vocab


def _model(vocab_size: int) -> nn.Module:
    """The compat ``BERTModel`` with the section's arguments."""
    from divekit.compat.d2l._models import BERTModel

    h = SHAPE["num_hiddens"]
    return BERTModel(vocab_size, h, norm_shape=[h], ffn_num_input=h,
                     ffn_num_hiddens=SHAPE["ffn_num_hiddens"], num_heads=SHAPE["num_heads"],
                     num_layers=SHAPE["num_layers"], dropout=SHAPE["dropout"],
                     max_len=SHAPE["max_len"], key_size=h, query_size=h, value_size=h,
                     hid_in_features=h, mlm_in_features=h, nsp_in_features=h)


def pretrain(src: Path | str, steps: int) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model on the CPU, vocab, report)`` after ``steps`` MLM + NSP steps on ``src``; the
    report holds every step's two losses and the time taken. The global random state is left
    as it was."""
    from divekit.compat.d2l._train import _get_batch_loss_bert

    loader, vocab = _loader(_paragraphs(src))
    device = try_gpu()
    forked = [device.index or 0] if device.type == "cuda" else []
    mlm_losses: list[float] = []
    nsp_losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(_SEED)
        net = _model(len(vocab)).to(device)
        trainer = torch.optim.Adam(net.parameters(), lr=_LR, foreach=True)
        warmup = max(1, int(_WARMUP * steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            trainer, lambda s: min(1.0, (s + 1) / warmup)
            * (0.5 * (1 + math.cos(math.pi * max(0, s + 1 - warmup) / max(1, steps - warmup)))))
        loss = nn.CrossEntropyLoss()
        net.train()
        epoch = 0
        while len(mlm_losses) < steps:
            loader.set_epoch(epoch)
            for batch in loader:
                batch = [x.to(device) for x in batch]
                trainer.zero_grad()
                mlm_l, nsp_l, total = _get_batch_loss_bert(net, loss, len(vocab), *batch)
                total.backward()
                trainer.step()
                schedule.step()
                mlm_losses.append(mlm_l.detach().item())
                nsp_losses.append(nsp_l.detach().item())
                if len(mlm_losses) == steps:
                    break
            epoch += 1
    seconds = time.perf_counter() - start
    report = {"source": str(src), "steps": steps, "batch_size": _BATCH_SIZE, "max_len": _MAX_LEN,
              "lr": _LR, "vocab_size": len(vocab), "seconds": round(seconds, 1),
              "device": str(device), "mlm_loss": mlm_losses, "nsp_loss": nsp_losses}
    return net.cpu().eval(), vocab, report


def _ends(losses: Sequence[float]) -> tuple[float, float]:
    """The mean of the first and of the last few steps' losses."""
    k = max(1, min(10, len(losses) // 4))
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def _build(dest: Path, src: Path | str) -> None:
    """``dest/<stem>/vocab.json`` (``idx_to_token``) and ``dest/<stem>/pretrained.params``
    (``torch.save(state_dict)``), in the archive's layout; ``dest/pretraining.json``."""
    steps = _STEPS[quick()]
    net, vocab, report = pretrain(src, steps)
    folder = dest / _stem()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab.idx_to_token), encoding="utf-8")
    torch.save(net.state_dict(), folder / "pretrained.params")
    (dest / _REPORT).write_text(json.dumps(report), encoding="utf-8")


def _describe(base: Path, src: Path | str) -> str:
    text = ("WikiText-2's validation split" if isinstance(src, Path)
            else "paragraphs of Python's help text (pydoc)")
    try:
        report = json.loads((base / _REPORT).read_text(encoding="utf-8"))
        (m0, m1), (n0, n1) = _ends(report["mlm_loss"]), _ends(report["nsp_loss"])
        figures = (f" for {report['steps']} steps of {report['batch_size']} pairs "
                   f"(MLM loss {m0:.2f} -> {m1:.2f}, NSP loss {n0:.2f} -> {n1:.2f}; "
                   f"{report['vocab_size']:,}-token vocabulary)")
    except (OSError, ValueError, KeyError, TypeError):
        figures = ""
    return (f"a BERT of bert.small's shape (2 layers, 256 hidden units, 4 heads) pretrained by "
            f"divekit on {text}{figures} from {base / _stem()}")


_data._register_substitute(NAME, _build, _describe, source=_source, version=_version)
