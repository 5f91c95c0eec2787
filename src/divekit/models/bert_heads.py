"""Fine-tuning heads on a pretrained BERT encoder (d2l 16.6): each task picks different features.

* :class:`ClassifierHead` — single texts and text pairs: the ``[CLS]`` vector through an MLP,
  ``ŷ = W_o tanh(W_h h_[CLS] + b_h) + b_o``, whose hidden layer is BERT's pooler (the course's
  ``BERTClassifier`` reuses ``bert.hidden``).
* :class:`TaggingHead` — every token through an MLP, ``ŷ_t = W_2 GELU(W_1 h_t + b_1) + b_2``.
* :class:`SpanHead` — question answering: start and end logits ``s_t = w_s·h_t``,
  ``e_t = w_e·h_t`` over the positions.

:class:`BertWithHead` is the encoder with one head: ``forward(tokens, segments, valid_lens)``.
:class:`ExtendedEmbedding` adds rows to the token embedding for a domain vocabulary: the new
rows are their own parameter, so the old ones can stay frozen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from divekit.models.bert import BertEncoder, _init_weights
from divekit.ops.masking import length_mask

HEADS = ("classify", "pair", "tag", "qa")


class ClassifierHead(nn.Module):
    """``(B, T, H)`` hidden states → ``(B, C)`` logits from the ``[CLS]`` position."""

    def __init__(self, num_hiddens: int, num_classes: int, dropout: float = 0.1,
                 pooler: nn.Module | None = None):
        super().__init__()
        self.hidden = pooler if pooler is not None else nn.Sequential(
            nn.Linear(num_hiddens, num_hiddens), nn.Tanh())
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(num_hiddens, num_classes)
        _init_weights(self.output)

    def forward(self, X: Tensor, valid_lens: Tensor | None = None) -> Tensor:
        return self.output(self.dropout(self.hidden(X[:, 0])))  # (B, C)


class TaggingHead(nn.Module):
    """``(B, T, H)`` → ``(B, T, C)``: one MLP applied at every position."""

    def __init__(self, num_hiddens: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(num_hiddens, num_hiddens),
                                 nn.GELU(), nn.Dropout(dropout), nn.Linear(num_hiddens, num_classes))
        self.mlp.apply(_init_weights)

    def forward(self, X: Tensor, valid_lens: Tensor | None = None) -> Tensor:
        return self.mlp(X)


class SpanHead(nn.Module):
    """``(B, T, H)`` → start and end logits ``(B, T, 2)``; padding positions get ``-inf``."""

    def __init__(self, num_hiddens: int):
        super().__init__()
        self.output = nn.Linear(num_hiddens, 2)
        _init_weights(self.output)

    def forward(self, X: Tensor, valid_lens: Tensor | None = None) -> Tensor:
        logits = self.output(X)  # (B, T, 2)
        if valid_lens is not None:
            keep = length_mask(valid_lens, X.shape[1])  # (B, T)
            logits = logits.masked_fill(~keep[..., None], float("-inf"))
        return logits


def make_head(kind: str, num_hiddens: int, num_classes: int, dropout: float = 0.1,
              pooler: nn.Module | None = None) -> nn.Module:
    if kind in ("classify", "pair"):
        return ClassifierHead(num_hiddens, num_classes, dropout, pooler)
    if kind == "tag":
        return TaggingHead(num_hiddens, num_classes, dropout)
    if kind == "qa":
        return SpanHead(num_hiddens)
    raise ValueError(f"head {kind!r} is not one of {', '.join(HEADS)}")


class ExtendedEmbedding(nn.Module):
    """The rows of ``base`` followed by ``extra`` new rows, as one embedding table.

    ``E = [E_old; E_new]``; the new rows start at the mean of the old ones (a neutral word),
    and are a separate parameter, so ``E_old`` can be frozen while ``E_new`` trains."""

    def __init__(self, base: nn.Embedding, extra: int):
        super().__init__()
        self.base = base
        start = base.weight.detach().mean(0, keepdim=True).expand(extra, -1).clone()
        self.added = nn.Parameter(start)  # (extra, H)

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.added.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, torch.cat([self.base.weight, self.added]))


class BertWithHead(nn.Module):
    """A BERT encoder and a task head: ``(tokens, segments, valid_lens) → head output``.

    ``saved`` (a set of parameter names) makes :meth:`state_dict` hold only those entries —
    a LoRA/adapter run's checkpoint is then its adapters and head, and the frozen base comes
    from the base checkpoint the run points to. :meth:`load_state_dict` reads such a file."""

    def __init__(self, encoder: BertEncoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.saved: set[str] | None = None

    def forward(self, tokens: Tensor, segments: Tensor | None = None,
                valid_lens: Tensor | None = None) -> Tensor:
        return self.head(self.encoder(tokens, segments, valid_lens), valid_lens)

    def save_only(self, names: Iterable[str] | None) -> None:
        self.saved = None if names is None else set(names)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        state = super().state_dict(*args, **kwargs)
        if self.saved is None:
            return state
        prefix = kwargs.get("prefix", "")
        for key in [k for k in state if k.removeprefix(prefix) not in self.saved]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        if self.saved is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k in self.saved]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"adapter weights do not fit: missing {missing[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
        return _IncompatibleKeys(missing, result.unexpected_keys)


__all__ = ["BertWithHead", "ClassifierHead", "ExtendedEmbedding", "HEADS", "SpanHead",
           "TaggingHead", "make_head"]
