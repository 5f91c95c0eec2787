"""Translating with a trained encoder-decoder: sentences in, text out (d2l 10.7.6, 10.8).

What :mod:`divekit.tasks.translate` runs after training, and ``divekit translate`` through it:

* :func:`translate_sentences` cleans and tokenizes raw sentences as the training pairs were,
  encodes them ``batch_size`` at a time (a sentence longer than the run's ``--num-steps``
  keeps its first tokens, with one warning through the ``divekit`` logger per call) and
  decodes them;
* :func:`decode_nbest` decodes a batch of encoded sources greedily or by beam search
  (:func:`divekit.ops.decoding.greedy_search`, :func:`~divekit.ops.decoding.beam_search`),
  ranked by ``log P / L^α``; greedy lets the rows that produced ``<eos>`` leave the batch;
* :func:`attention_map` teacher-forces a translation to draw its attention.

"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from divekit.data.text import Vocab
from divekit.data.translation import (
    BOS,
    EOS,
    PAD,
    build_array,
    sentence_tokens,
    tokens_to_text,
)
from divekit.engine.config import finite
from divekit.errors import DivekitError
from divekit.ops.decoding import beam_search, greedy_search

log = logging.getLogger("divekit")


@dataclass
class Hypothesis:
    """One translation of an n-best list: its text, summed log-probability and the ranking
    score ``log P / L^α``."""

    text: str
    score: float
    normalized: float


@dataclass
class AttentionMap:
    """Attention of one translation: ``weights`` ``(heads, T_out, T_src)`` (the Transformer's
    last decoder block) or ``(T_out, T_src)`` (Bahdanau's), with the tokens that label them."""

    weights: Tensor
    src_tokens: list[str]
    out_tokens: list[str]
    titles: list[str] | None


@dataclass
class Translation:
    """What :func:`divekit.tasks.translate.translate` returns: one output per sentence, the
    source words the model never saw (read as ``<unk>``), and the first sentence's attention
    when asked for."""

    outputs: list[str]
    unknown: list[str]
    attention: AttentionMap | None = None
    nbest: list[list[Hypothesis]] | None = None  # with n_best > 1: each sentence's best first


# the largest --beam and --batch-size: a beam step scores batch × beam × vocabulary candidates
# and runs the decoder on batch × beam rows (--beam 100000 never finished); beams past a few
# dozen no longer change a translation
MAX_BEAM = 256
MAX_DECODE_BATCH = 4096
# the most sentences one call translates (translate -i FILE's line count): each costs its decode
# (0.15 ms greedy for the tests' tiny Transformer on one CPU thread, tens of times more for a
# real model with a beam) and about 600 bytes of Python objects, so 100,000 lines stay within
# minutes and tens of MB; a longer file is refused before anything runs, to be split
MAX_SENTENCES = 100_000


def check_decoding(beam: int, length_penalty: float, n_best: int = 1,
                   batch_size: int = 64) -> None:
    """The decoding options, each checked where it enters (one line naming the bad value)."""
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not whole(beam) or not 1 <= beam <= MAX_BEAM:
        raise DivekitError(f"--beam must be at least 1 (1 = greedy) and at most {MAX_BEAM}, "
                           f"got {beam}")
    if not (finite(length_penalty) and length_penalty >= 0):
        raise DivekitError(f"--length-penalty must be 0 or more, got {length_penalty}")
    if not whole(n_best) or n_best < 1:
        raise DivekitError(f"--n-best must be at least 1, got {n_best}")
    if n_best > beam:
        raise DivekitError(f"--n-best {n_best} is larger than --beam {beam}: beam search keeps "
                           f"only {beam} hypotheses (give --beam {n_best} or more)")
    if not whole(batch_size) or not 1 <= batch_size <= MAX_DECODE_BATCH:
        raise DivekitError(f"--batch-size must be at least 1 and at most {MAX_DECODE_BATCH}, "
                           f"got {batch_size}")


def detokens(indices: Sequence[int], vocab: Vocab, tokenizer: Any = None) -> str:
    """Token indices up to ``<eos>`` as a sentence (special tokens dropped): words joined by
    spaces, or subword pieces decoded by ``tokenizer``."""
    words = []
    for token in vocab.to_tokens(list(indices)):
        if token == EOS:
            break
        if token not in (PAD, BOS):
            words.append(token)
    return tokens_to_text(words, tokenizer)


def unknown_words(vocab: Vocab, sentences: Sequence[str], tokenizer: Any = None) -> list[str]:
    """Tokens of the sentences (cleaned and split as training did) that ``vocab`` lacks, in
    order, once each."""
    tokens = [t for line in sentence_tokens(sentences, tokenizer) for t in line]
    return list(dict.fromkeys(t for t in tokens if t not in vocab))


# ----------------------------------------------------------------------------- decoding


@torch.no_grad()
def decode_nbest(model: nn.Module, src: Tensor, src_len: Tensor, tgt_vocab: Vocab, max_len: int,
                 beam: int = 1, length_penalty: float = 0.75, n_best: int = 1,
                 tokenizer: Any = None) -> list[list[Hypothesis]]:
    """Translate a batch of encoded sources ``(B, T)`` on the model's device: greedy
    (``beam=1``) or beam search ranked by ``log P / L^α`` (``length_penalty=α``); the
    ``n_best`` best finished hypotheses of each source, best first. The model decodes in
    evaluation mode (no dropout), whatever its mode, which is restored after."""
    was_training = model.training
    model.eval()
    try:
        state = model.encode(src, src_len)
        first = torch.full((len(src),), tgt_vocab[BOS], dtype=torch.long, device=src.device)
        if beam <= 1:
            out = greedy_search(model.decode_step, state, first, tgt_vocab[EOS], max_len,
                                reorder=model.reorder_state)
            lists = [[(t, s, n)] for t, s, n in zip(out.tokens, out.scores, out.normalized)]
        else:
            out = beam_search(model.decode_step, state, first, tgt_vocab[EOS], max_len,
                              beam_size=beam, length_penalty=length_penalty,
                              reorder=model.reorder_state, n_best=n_best)
            lists = out.nbest or []
    finally:
        model.train(was_training)
    return [[Hypothesis(detokens(t, tgt_vocab, tokenizer), s, n) for t, s, n in hyps[:n_best]]
            for hyps in lists]


def decode(model: nn.Module, src: Tensor, src_len: Tensor, tgt_vocab: Vocab, max_len: int,
           beam: int = 1, length_penalty: float = 0.75, tokenizer: Any = None) -> list[str]:
    """The best translation of each source of the batch (see :func:`decode_nbest`)."""
    return [h[0].text for h in decode_nbest(model, src, src_len, tgt_vocab, max_len, beam,
                                            length_penalty, 1, tokenizer)]


# ----------------------------------------------------------------------------- sentences


def warn_truncated(lengths: Sequence[int], num_steps: int) -> None:
    """One warning (the ``divekit`` logger) for the sentences longer than ``num_steps``
    tokens, which the model reads cut to their first ``num_steps``; nothing when none is."""
    cut = [n for n in lengths if n > num_steps]
    if len(cut) == 1:
        log.warning("translate: a sentence is longer than the model's --num-steps %d: only "
                    "its first %d of %s tokens were translated", num_steps, num_steps,
                    f"{cut[0]:,}")
    elif cut:
        log.warning("translate: %d sentences are longer than the model's --num-steps %d: "
                    "only their first %d tokens were translated (of %s to %s)", len(cut),
                    num_steps, num_steps, f"{min(cut):,}", f"{max(cut):,}")


def translate_sentences(model: nn.Module, sentences: Sequence[str], src_vocab: Vocab,
                        tgt_vocab: Vocab, num_steps: int, tokenizer: Any = None, *,
                        beam: int = 1, length_penalty: float = 0.75, n_best: int = 1,
                        batch_size: int = 64) -> list[list[Hypothesis]]:
    """Raw sentences, cleaned and tokenized as the training pairs were (``tokenizer``: the
    run's subword model, or words), translated ``batch_size`` at a time; each sentence's
    ``n_best`` hypotheses, best first. An empty (or blank) sentence gets no hypothesis. A
    sentence of more than ``num_steps`` tokens keeps its first ``num_steps`` (as in training),
    and says so: one warning for the call. More than :data:`MAX_SENTENCES` are refused."""
    if isinstance(sentences, str) or not sentences:
        raise DivekitError("give at least one sentence to translate")
    if len(sentences) > MAX_SENTENCES:
        raise DivekitError(f"{len(sentences):,} sentences to translate: at most "
                           f"{MAX_SENTENCES:,} at a time (split the file)")
    check_decoding(beam, length_penalty, n_best, batch_size)
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    results: list[list[Hypothesis]] = [[] for _ in sentences]
    device = next(model.parameters()).device
    lengths = []
    with torch.inference_mode():
        for start in range(0, len(todo), batch_size):
            rows = todo[start:start + batch_size]
            tokens = sentence_tokens([sentences[i] for i in rows], tokenizer)
            lengths += [len(line) for line in tokens]
            src, src_len = build_array(tokens, src_vocab, num_steps)  # (B, num_steps), (B,)
            found = decode_nbest(model, src.to(device), src_len.to(device), tgt_vocab,
                                 num_steps, beam, length_penalty, n_best, tokenizer)
            for i, hyps in zip(rows, found):
                results[i] = hyps
    warn_truncated(lengths, num_steps)
    return results


def attention_map(model: nn.Module, sentence: str, output: str, src_vocab: Vocab,
                  tgt_vocab: Vocab, num_steps: int, tokenizer: Any = None) -> AttentionMap:
    """The encoder-decoder attention of ``output`` as the translation of ``sentence``
    (teacher-forced on it): the last Transformer block's heads, or Bahdanau's weights."""
    decoder, device = model.decoder, next(model.parameters()).device
    src, src_len = build_array(sentence_tokens([sentence], tokenizer), src_vocab, num_steps)
    out_tokens = sentence_tokens([output], tokenizer)[0] + [EOS]
    dec_in = torch.tensor([[tgt_vocab[BOS]] + tgt_vocab[out_tokens[:-1]]])
    args = (src.to(device), dec_in.to(device), src_len.to(device))
    with torch.inference_mode():
        if hasattr(decoder, "record_attention"):  # the Transformer: the last block's heads
            decoder.record_attention(True)
            try:
                model(*args)
                weights = decoder.blks[-1].attention2.attention_weights[0]  # (heads, T_out, T_src)
            finally:
                decoder.record_attention(False)
            titles: list[str] | None = [f"head {h + 1}" for h in range(weights.shape[0])]
        elif hasattr(decoder, "attention_weights"):
            model(*args)
            weights, titles = decoder.attention_weights[0], None  # (T_out, T_src)
        else:
            raise DivekitError(f"{type(model).__name__} with a {type(decoder).__name__} has "
                               "no attention to draw")
    n_src = int(src_len[0])
    return AttentionMap(weights[..., :n_src].cpu(), src_vocab.to_tokens(src[0, :n_src]),
                        out_tokens, titles)
