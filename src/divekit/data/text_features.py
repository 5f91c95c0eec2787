"""Turn fine-tuning examples into BERT inputs, one function per head.

Every function takes a WordPiece tokenizer (``ids``, ``encode_batch``, ``backend``, the special
ids, ``max_len``) and returns padded tensors ``tokens (N, T)``, ``segments (N, T)``,
``valid_lens (N,)`` and the targets:

* classify / pair: ``labels (N,)``;
* tag: ``labels (N, T)``, a word's tag on its *first* sub-token, ``IGNORE`` (-100, skipped by
  ``cross_entropy``) on the others and on ``[CLS]``/``[SEP]``;
* qa: ``spans (N, 2)`` start and end positions, ``(0, 0)`` (the ``[CLS]`` slot) when the
  answer is not inside a window. A passage longer than ``max_len`` is cut into windows of
  context tokens that overlap by ``stride``; :class:`QAFeature` keeps each window's character
  offsets so a predicted span maps back to the passage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from divekit.data.text_tasks import QAExample, TaggedSentence, TextExample
from divekit.errors import DivekitError

IGNORE = -100


def pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[(ids, segments), ...]`` → ``tokens (N, T)``, ``segments (N, T)``, ``valid (N,)``."""
    valid = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long)
    width = int(valid.max()) if len(rows) else 1
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    segments = torch.zeros_like(tokens)
    for r, (ids, segs) in enumerate(rows):
        tokens[r, : len(ids)] = torch.tensor(ids)
        segments[r, : len(segs)] = torch.tensor(segs)
    return tokens, segments, valid


def label_ids(labels: Sequence[str], known: Sequence[str], where: str) -> list[int]:
    index = {name: i for i, name in enumerate(known)}
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise DivekitError(f"{where}: label(s) {', '.join(map(repr, unknown[:5]))} not among the "
                           f"run's labels {', '.join(known)}")
    return [index[lab] for lab in labels]


def encode_texts(tok: Any, examples: Sequence[TextExample], labels: Sequence[str],
                 where: str = "data") -> tuple[Tensor, ...]:
    pairs = [e.pair for e in examples] if examples and examples[0].pair is not None else None
    rows = tok.encode_batch([e.text for e in examples], pairs)
    y = torch.tensor(label_ids([e.label for e in examples], labels, where), dtype=torch.long)
    return (*pad(rows, tok.pad_id), y)


def word_pieces(tok: Any, words: Sequence[str]) -> list[list[int]]:
    """Each word's sub-token ids (a word the tokenizer drops entirely becomes ``[UNK]``)."""
    return [ids or [tok.unk_id] for ids in tok.ids(list(words))]


def tag_row(tok: Any, words: Sequence[str], tag_ids: Sequence[int] | None = None
            ) -> tuple[list[int], list[int], list[int]]:
    """``[CLS] w₁… [SEP]`` ids, the labels (tag on first sub-tokens) and the first positions."""
    ids, labels, firsts = [tok.cls_id], [IGNORE], []
    budget = tok.max_len - 1
    for w, pieces in enumerate(word_pieces(tok, words)):
        if len(ids) + len(pieces) > budget:
            break  # the words after the limit are not tagged (a warning-free truncation)
        firsts.append(len(ids))
        labels += [tag_ids[w] if tag_ids is not None else 0] + [IGNORE] * (len(pieces) - 1)
        ids += pieces
    return ids + [tok.sep_id], labels + [IGNORE], firsts


def encode_tagged(tok: Any, sentences: Sequence[TaggedSentence], labels: Sequence[str],
                  where: str = "data") -> tuple[Tensor, ...]:
    rows, targets = [], []
    for s in sentences:
        ids, y, _ = tag_row(tok, s.words, label_ids(s.tags, labels, where))
        rows.append((ids, [0] * len(ids)))
        targets.append(y)
    tokens, segments, valid = pad(rows, tok.pad_id)
    y = torch.full_like(tokens, IGNORE)
    for r, t in enumerate(targets):
        y[r, : len(t)] = torch.tensor(t)
    return tokens, segments, valid, y


@dataclass
class QAFeature:
    """One window of one passage: which example, where the context starts in the sequence,
    and the character span of each context token in the window."""

    example: int
    context_start: int
    offsets: list[tuple[int, int]]


def qa_windows(tok: Any, question: str, context: str, stride: int
               ) -> list[tuple[list[int], list[int], int, list[tuple[int, int]], int]]:
    """``(ids, segments, context_start, offsets, first_token)`` per window of the passage."""
    q = tok.ids([question])[0][: max(1, tok.max_len // 4)]
    enc = tok.backend.encode(context, add_special_tokens=False)
    c_ids, c_off = list(enc.ids), [tuple(o) for o in enc.offsets]
    room = tok.max_len - len(q) - 3
    if room < 8:
        raise DivekitError(f"--max-len {tok.max_len} leaves {room} tokens for the passage")
    if stride >= room:
        raise DivekitError(f"--doc-stride {stride} must be below the window's {room} context tokens")
    out, first = [], 0
    while True:
        ids = [tok.cls_id, *q, tok.sep_id, *c_ids[first : first + room], tok.sep_id]
        segs = [0] * (len(q) + 2) + [1] * (len(ids) - len(q) - 2)
        out.append((ids, segs, len(q) + 2, c_off[first : first + room], first))
        if first + room >= len(c_ids):
            return out
        first += room - stride


def encode_qa(tok: Any, examples: Sequence[QAExample], stride: int
              ) -> tuple[tuple[Tensor, ...], list[QAFeature]]:
    rows, spans, features = [], [], []
    for i, ex in enumerate(examples):
        s_char = ex.starts[0] if ex.starts else -1
        e_char = s_char + len(ex.answers[0]) if ex.answers else -1
        for ids, segs, c0, offsets, _ in qa_windows(tok, ex.question, ex.context, stride):
            start = end = 0
            inside = [j for j, (a, b) in enumerate(offsets) if b > s_char and a < e_char]
            if inside and offsets[0][0] <= s_char and offsets[-1][1] >= e_char:
                start, end = c0 + inside[0], c0 + inside[-1]
            rows.append((ids, segs))
            spans.append((start, end))
            features.append(QAFeature(i, c0, offsets))
    tokens, segments, valid = pad(rows, tok.pad_id)
    index = torch.arange(len(rows))
    return (tokens, segments, valid, torch.tensor(spans, dtype=torch.long), index), features


def best_spans(start: Tensor, end: Tensor, context_start: Tensor, context_len: Tensor,
               max_answer_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """The best valid span of each row: ``argmax s_i + e_j`` over ``c₀ ≤ i ≤ j < c₀ + n`` and
    ``j - i < max_answer_len``. ``start``/``end``: ``(B, T)`` logits; returns ``(i, j, score)``."""
    b, t = start.shape
    pos = torch.arange(t, device=start.device)
    i, j = pos[:, None], pos[None, :]
    ok = (j >= i) & (j - i < max_answer_len)  # (T, T)
    inside = (pos[None] >= context_start[:, None]) & (pos[None] < (context_start + context_len)[:, None])
    mask = ok[None] & inside[:, :, None] & inside[:, None, :]  # (B, T, T)
    scores = (start.float()[:, :, None] + end.float()[:, None, :]).masked_fill(~mask, float("-inf"))
    flat = scores.reshape(b, -1).max(-1)
    return flat.indices // t, flat.indices % t, flat.values


__all__ = ["IGNORE", "QAFeature", "best_spans", "encode_qa", "encode_tagged", "encode_texts",
           "label_ids", "pad", "qa_windows", "tag_row", "word_pieces"]
