"""Decoding a sequence model's output: greedy search and beam search (d2l 10.8).

Both drive a ``step`` function, so they serve an RNN encoder-decoder, a Transformer decoder
or a language model alike::

    logits, state = step(tokens, state)   # tokens (N,) last token of each hypothesis → (N, V)

``state`` is whatever the model carries (a tensor, or tuples/lists/dicts of tensors, ``None``
entries allowed); beam search keeps one row of it per hypothesis and reorders it with
``reorder(state, index)`` — by default every tensor is indexed along ``batch_dim`` (0; an RNN's
``(layers, N, H)`` state wants ``batch_dim=1``).

Scores are sums of log-probabilities; beam search ranks finished hypotheses by the course's
length-normalised score ``log P(y_1..y_L) / L^α`` (``length_penalty=α``; L counts the tokens
generated, ``<eos>`` included). A hypothesis ends at ``<eos>`` or after ``max_len`` tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from divekit.errors import DivekitError

Step = Callable[[Tensor, Any], tuple[Tensor, Any]]


def index_state(state: Any, index: Tensor, batch_dim: int = 0) -> Any:
    """Every tensor of a nested state indexed by ``index`` along ``batch_dim``."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.index_select(batch_dim, index.to(state.device))
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        if hasattr(state, "index_select"):  # a state that knows its own batch dimensions
            return state.index_select(index)
        return dataclasses.replace(state, **{f.name: index_state(getattr(state, f.name), index,
                                                                 batch_dim)
                                             for f in dataclasses.fields(state) if f.init})
    if isinstance(state, dict):
        return {k: index_state(v, index, batch_dim) for k, v in state.items()}
    if isinstance(state, list | tuple):
        items = [index_state(v, index, batch_dim) for v in state]
        return tuple(items) if isinstance(state, tuple) else items
    return state  # numbers, strings: shared by every hypothesis


@dataclass
class Decoded:
    """``tokens[b]``: the chosen sequence of batch row b (without ``<bos>``, with ``<eos>`` if
    it ended); ``scores[b]``: its summed log-probability; ``normalized[b]``: the ranking score.
    ``nbest[b]`` (beam search): the ``n_best`` best finished ``(tokens, score, normalized)``,
    best first."""

    tokens: list[list[int]]
    scores: list[float]
    normalized: list[float]
    nbest: list[list[tuple[list[int], float, float]]] | None = None


def _check(max_len: int, eos: int) -> None:
    if max_len < 1:
        raise DivekitError(f"max_len must be at least 1, got {max_len}")
    if eos < 0:
        raise DivekitError(f"eos must be a token index, got {eos}")


@torch.no_grad()
def greedy_search(step: Step, state: Any, bos: int | Tensor, eos: int, max_len: int,
                  batch_size: int | None = None,
                  reorder: Callable[[Any, Tensor], Any] | None = None,
                  compact: float = 0.75) -> Decoded:
    """Pick the most likely token at every step (the course's ``predict_seq2seq``), for a whole
    batch at once; rows that reached ``<eos>`` stop growing while the others go on.

    Each step takes the best token and its log-probability in one ``max`` over the log-softmax.
    With ``reorder(state, index)`` (as for :func:`beam_search`), once the rows still decoding
    are at most ``compact`` of the batch the finished ones leave it, so sentences that ended
    cost nothing more; the tokens and scores are the same either way."""
    _check(max_len, eos)
    tokens = _first_tokens(bos, batch_size)
    n = len(tokens)
    out = torch.zeros(n, max_len, dtype=torch.long)
    scores = torch.zeros(n, dtype=torch.float64)
    lengths = torch.full((n,), max_len)
    rows = torch.arange(n)  # the output row of each row still in the batch
    alive = torch.ones(n, dtype=torch.bool)  # per row in the batch
    for t in range(max_len):
        logits, state = step(tokens, state)  # (m, V)
        logp, best = torch.log_softmax(logits.float(), dim=-1).max(dim=-1)  # (m,), (m,)
        chosen, logp = best.cpu(), logp.cpu().double()
        out[rows, t] = chosen
        scores[rows] += torch.where(alive, logp, 0.0)
        ended = alive & (chosen == eos)
        lengths[rows[ended]] = t + 1
        alive &= ~ended
        live = int(alive.sum())
        if live == 0:
            break
        if reorder is not None and live <= compact * len(rows):  # finished rows leave
            keep = alive.nonzero().squeeze(1)
            rows, alive = rows[keep], alive[keep]
            keep = keep.to(best.device)
            state, best = reorder(state, keep), best[keep]
        tokens = best.to(tokens.device)
    seqs = [out[i, : lengths[i]].tolist() for i in range(n)]
    return Decoded(seqs, scores.tolist(), (scores / lengths).tolist())


def _first_tokens(bos: int | Tensor, batch_size: int | None) -> Tensor:
    if isinstance(bos, Tensor):
        return bos.reshape(-1).long()
    if batch_size is None:
        raise DivekitError("give batch_size with an integer bos (or a (B,) tensor of first tokens)")
    return torch.full((batch_size,), int(bos), dtype=torch.long)


@torch.no_grad()
def beam_search(step: Step, state: Any, bos: int | Tensor, eos: int, max_len: int, beam_size: int = 4,
                length_penalty: float = 0.75, batch_size: int | None = None, batch_dim: int = 0,
                reorder: Callable[[Any, Tensor], Any] | None = None, n_best: int = 1) -> Decoded:
    """Beam search: keep the ``beam_size`` most likely unfinished prefixes per batch row.

    At each step every live prefix is extended by every token and the ``beam_size`` best
    extensions (by summed log-probability) are kept: those ending in ``<eos>`` become finished
    hypotheses, the others stay live (so the beam narrows as hypotheses finish); at ``max_len``
    every live extension finishes. The winner is the finished hypothesis with the best
    ``score / L^length_penalty``. ``beam_size=1`` is greedy search; a beam as wide as the number
    of candidates is exhaustive search (both tested). ``n_best`` (at most ``beam_size``) also
    keeps each row's best finished hypotheses in ``Decoded.nbest``.
    """
    _check(max_len, eos)
    if beam_size < 1:
        raise DivekitError(f"beam_size must be at least 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise DivekitError(f"n_best must be in [1, beam_size={beam_size}], got {n_best}")
    first = _first_tokens(bos, batch_size)
    b, k = len(first), beam_size
    pick = reorder or (lambda s, i: index_state(s, i, batch_dim))
    # hypothesis rows: b * k, row r belongs to batch row r // k
    rows = torch.arange(b).repeat_interleave(k)
    state = pick(state, rows.to(first.device))
    tokens = first.repeat_interleave(k)
    prefix = torch.zeros(b * k, 0, dtype=torch.long)
    score = torch.full((b, k), float("-inf"), dtype=torch.float64)
    score[:, 0] = 0.0  # one live prefix per row at the start (the others are copies)
    finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(b)]

    def finish(row: int, seq: list[int], total: float) -> None:
        finished[row].append((total / len(seq) ** length_penalty, total, seq))

    for t in range(max_len):
        logits, state = step(tokens, state)
        logp = torch.log_softmax(logits.float(), dim=-1).cpu().double()  # (b*k, V)
        v = logp.shape[-1]
        if eos >= v:
            raise DivekitError(f"eos {eos} is outside the vocabulary of {v} tokens")
        total = score.reshape(-1, 1) + logp  # (b*k, V)
        if t == max_len - 1:  # the last step: every extension of a live prefix ends here
            for r, tok in torch.nonzero(torch.isfinite(total)).tolist():
                finish(r // k, prefix[r].tolist() + [tok], float(total[r, tok]))
            break
        top, where = total.reshape(b, k * v).topk(k, dim=1)  # the k best extensions per row
        parent = (where // v) + torch.arange(b)[:, None] * k  # (b, k) hypothesis rows
        chosen = where % v
        ended = (chosen == eos) & torch.isfinite(top)
        for row, j in torch.nonzero(ended).tolist():  # <eos> among the k best: finished
            finish(row, prefix[parent[row, j]].tolist() + [eos], float(top[row, j]))
        score = torch.where(chosen == eos, float("-inf"), top)  # the rest stay live
        if not torch.isfinite(score).any():
            break
        prefix = torch.cat([prefix[parent.flatten()], chosen.reshape(-1, 1)], dim=1)
        state = pick(state, parent.flatten().to(first.device))
        tokens = chosen.flatten().to(first.device)

    seqs, scores, normalized, nbest = [], [], [], []
    for row in range(b):
        ranked = sorted(finished[row], key=lambda h: -h[0])  # stable: ties keep finishing order
        best = ranked[0]
        normalized.append(best[0])
        scores.append(best[1])
        seqs.append(best[2])
        nbest.append([(seq, total, norm) for norm, total, seq in ranked[:n_best]])
    return Decoded(seqs, scores, normalized, nbest)
