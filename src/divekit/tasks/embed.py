"""Sentence embeddings from a pretrained BERT: the course's first kind of NLP transfer.

A sentence's embedding pools the encoder's last hidden states ``h_1 … h_n`` over its ``n`` real
tokens (``[CLS]`` and ``[SEP]`` included, padding excluded):

    mean:  e = (1/n) Σₜ hₜ          (sentence-transformers' pooling for all-MiniLM-L6-v2)
    cls:   e = h_[CLS]

Semantic search ranks texts by cosine similarity ``cos(e_q, e_i) = e_q·e_i / (‖e_q‖ ‖e_i‖)``.
Texts are batched by length (sorted, so a batch pads little) and returned in their order.

    from divekit.tasks.embed import embed, most_similar
    E = embed("minilm", ["A man is eating food.", "A man rides a horse."])     # (2, 384)
    most_similar("minilm", "Someone eats", lines, top_k=3)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from divekit.engine.device import resolve_device
from divekit.errors import DivekitError
from divekit.models.bert import BertModel
from divekit.models.bert_checkpoint import load_pretrained, resolve_checkpoint
from divekit.tokenizers import BertTokenizer

log = logging.getLogger("divekit")
POOLINGS = ("mean", "cls")
# the bounds of what `divekit embed` reads: a line (a text) is cut at MAX_LINE_CHARS characters
# while it is read (a BERT reads at most 512 tokens, and a word-piece is rarely 100 characters
# long; a 50 MB line took 95 s and 6 GB to tokenize), and a file gives at most MAX_TEXTS texts
# (their float32 embeddings: 1.5 GB at 384 dimensions)
MAX_LINE_CHARS = 100_000
MAX_TEXTS = 1_000_000


class Embedder:
    """A loaded checkpoint that embeds texts; reuse it for many calls."""

    def __init__(self, checkpoint_or_run: str | Path, device: str = "cpu"):
        self.model: BertModel
        self.tokenizer: BertTokenizer
        self.model, self.tokenizer = load_pretrained(checkpoint_or_run)
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        st_config = resolve_checkpoint(checkpoint_or_run) / "sentence_bert_config.json"
        if st_config.is_file():  # the sentence-transformers length the model was tuned at
            limit = json.loads(st_config.read_text()).get("max_seq_length")
            if isinstance(limit, int) and 2 < limit < self.tokenizer.max_len:
                self.tokenizer.max_len = limit

    @property
    def dim(self) -> int:
        return self.model.config.num_hiddens

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], pooling: str = "mean", batch_size: int = 32,
              normalize: bool = False, progress: bool = False) -> Tensor:
        """``(len(texts), H)`` float32 embeddings on the CPU, in the order of ``texts``."""
        if pooling not in POOLINGS:
            raise DivekitError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if batch_size < 1:
            raise DivekitError(f"batch size must be at least 1, got {batch_size}")
        if isinstance(texts, str) or not texts:
            raise DivekitError("give a non-empty list of texts to embed")
        encoded = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        out = torch.empty(len(encoded), self.dim)
        starts = range(0, len(order), batch_size)
        for s in tqdm(starts, desc="embed", unit="batch", disable=not progress, leave=False):
            rows = order[s : s + batch_size]
            tokens, segments, valid = _pad([encoded[i] for i in rows], self.tokenizer.pad_id)
            h = self.model.encoder(tokens.to(self.device), segments.to(self.device),
                                   valid.to(self.device)).float()  # (B, T, H)
            out[rows] = pool(h, valid.to(self.device), pooling).cpu()
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def most_similar(self, query: str, texts: Sequence[str], top_k: int = 5, pooling: str = "mean",
                     batch_size: int = 32, progress: bool = False) -> list[tuple[int, float, str]]:
        """The ``top_k`` texts closest to ``query`` by cosine: ``(index, cosine, text)``."""
        if top_k < 1:
            raise DivekitError(f"--top-k must be at least 1, got {top_k}")
        E = self.embed(texts, pooling, batch_size, normalize=True, progress=progress)
        q = self.embed([query], pooling, normalize=True)[0]
        scores = E @ q  # (N,)
        best = torch.topk(scores, min(top_k, len(texts)))
        return [(int(i), float(v), texts[int(i)]) for v, i in zip(best.values, best.indices)]


def _pad(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    valid = torch.tensor([len(ids) for ids, _ in encoded])
    tokens = torch.full((len(encoded), int(valid.max())), pad_id, dtype=torch.long)
    segments = torch.zeros_like(tokens)
    for r, (ids, segs) in enumerate(encoded):
        tokens[r, : len(ids)] = torch.tensor(ids)
        segments[r, : len(segs)] = torch.tensor(segs)
    return tokens, segments, valid


def pool(hidden: Tensor, valid_lens: Tensor, pooling: str = "mean") -> Tensor:
    """``(B, T, H)`` hidden states → ``(B, H)``: the mean over each row's valid tokens, or
    the ``[CLS]`` state."""
    if pooling == "cls":
        return hidden[:, 0]
    keep = (torch.arange(hidden.shape[1], device=hidden.device) < valid_lens[:, None]).to(hidden.dtype)
    return (hidden * keep[..., None]).sum(1) / valid_lens[:, None].to(hidden.dtype)


def embed(checkpoint_or_run: str | Path, texts: Sequence[str], pooling: str = "mean",
          batch_size: int = 32, device: str = "cpu", normalize: bool = False,
          progress: bool = False) -> Tensor:
    """Embeddings ``(N, H)`` of ``texts`` from a BERT checkpoint, a pretraining run or ``minilm``."""
    return Embedder(checkpoint_or_run, device).embed(texts, pooling, batch_size, normalize, progress)


def most_similar(checkpoint_or_run: str | Path, query: str, texts: Sequence[str], top_k: int = 5,
                 pooling: str = "mean", batch_size: int = 32, device: str = "cpu",
                 progress: bool = False) -> list[tuple[int, float, str]]:
    """Semantic search: the ``top_k`` of ``texts`` most similar to ``query`` (cosine)."""
    return Embedder(checkpoint_or_run, device).most_similar(query, texts, top_k, pooling,
                                                            batch_size, progress)


def read_lines(path: Path, option: str = "--input") -> list[str]:
    """The non-empty lines of a UTF-8 file, stripped, streamed: a line is cut at
    :data:`MAX_LINE_CHARS` while it is read (the rest is skipped, never held), with one note on
    standard error; more than :data:`MAX_TEXTS` lines are refused in one line."""
    lines: list[str] = []
    cut = 0
    try:
        with path.open(encoding="utf-8") as f:
            while line := f.readline(MAX_LINE_CHARS + 1):
                if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
                    cut += 1
                    while (rest := f.readline(1 << 20)) and not rest.endswith("\n"):
                        pass
                    line = line[:MAX_LINE_CHARS]
                if line.strip():
                    if len(lines) == MAX_TEXTS:
                        raise DivekitError(f"{option} {str(path)!r} has more than {MAX_TEXTS:,} "
                                           "non-empty lines (the limit); split it")
                    lines.append(line.strip())
    except UnicodeDecodeError as e:
        raise DivekitError(f"{option} {str(path)!r} is not UTF-8 text ({e.reason} at byte "
                           f"{e.start})") from None
    except OSError as e:
        raise DivekitError(f"{option} {str(path)!r} cannot be read: {e.strerror}") from None
    if cut:
        log.warning(f"note: {cut} line(s) of {path} were longer than {MAX_LINE_CHARS:,} "
                    "characters and were cut there (the model reads only its first max_len "
                    "tokens)")
    return lines


def save_embeddings(path: str | Path, embeddings: Tensor) -> None:
    """``embeddings`` as a float32 ``.npy`` file, written atomically."""
    import io

    import numpy as np

    from divekit.io import atomic_write_bytes

    buffer = io.BytesIO()
    np.save(buffer, embeddings.numpy().astype(np.float32))
    atomic_write_bytes(path, buffer.getvalue())


__all__: list[Any] = ["Embedder", "embed", "most_similar", "pool", "read_lines", "save_embeddings"]
