"""Encoder-decoder models for sequence-to-sequence learning (d2l 10.6, 10.7, 11.4).

Every model here is an :class:`EncoderDecoder` with one interface that training and decoding
use, whatever sits inside (a GRU, a GRU with Bahdanau attention, a Transformer):

* ``model(src, dec_input, src_valid_len) → logits (B, T, V)`` — teacher forcing: the decoder
  reads ``<bos> y_1 … y_{T-1}`` and predicts ``y_1 … y_T``;
* ``state = model.encode(src, src_valid_len)`` then ``logits, state = model.decode_step(tokens,
  state)`` one token ``(N,)`` at a time, with ``model.reorder_state(state, index)`` to follow beam
  search's hypotheses (see :mod:`divekit.ops.decoding`).

Shapes follow the course: the GRU encoder returns time-major ``outputs (T, B, H)`` and
``state (layers, B, H)``; decoders return batch-major logits ``(B, T, V)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from divekit.config import flag_name, option
from divekit.errors import DivekitError
from divekit.models.attention import AdditiveAttention
from divekit.models.registry import register_model

# the course's recipe for its seq2seq models (d2l 10.7): Adam at 0.005, 10 epochs of 128 pairs
GRU_RECIPES = {"*": {"optimizer": "adam", "lr": 0.005, "epochs": 10, "batch_size": 128}}


def option_flag(config: Any, name: str) -> str:
    """The flag a user typed for field ``name``: its course alias (``--hidden``) if it has one."""
    meta = {f.name: f.metadata for f in dataclasses.fields(config)}[name]
    return (meta.get("aliases") or [flag_name(name)])[0]


def check_sizes(config: Any) -> None:
    """Every ``int`` field of a family config is a size (at least 1), ``dropout`` a probability
    in [0, 1): raise :class:`DivekitError` naming the flag and the value otherwise."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "dropout":
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and 0 <= value < 1
            ):
                raise DivekitError(f"{option_flag(config, f.name)} must be in [0, 1), got {value!r}")
        elif isinstance(f.default, int) and not isinstance(f.default, bool):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DivekitError(
                    f"{option_flag(config, f.name)} must be a positive integer, got {value!r}"
                )


@dataclass(frozen=True)
class Seq2SeqConfig:
    """The sizes of the GRU encoder-decoders, named as :func:`seq2seq`'s arguments; the course's
    flags (``--embed``, ``--hidden``, ``--layers``) are aliases."""

    embed_size: int = option(256, "embedding size of source and target tokens",
                             aliases=["--embed"], metavar="E")
    num_hiddens: int = option(256, "GRU hidden units", aliases=["--hidden"], metavar="H")
    num_layers: int = option(2, "GRU layers in the encoder and in the decoder",
                             aliases=["--layers"], metavar="L")
    dropout: float = option(0.2, "dropout between GRU layers (with --layers 2 or more)")

    def __post_init__(self) -> None:
        check_sizes(self)


def init_seq2seq(module: nn.Module) -> None:
    """The course's initialisation: Xavier-uniform for dense layers and GRU weight matrices."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
    if isinstance(module, nn.GRU):
        for name, param in module.named_parameters():
            if name.startswith("weight"):
                nn.init.xavier_uniform_(param)


class Seq2SeqEncoder(nn.Module):
    """Embedding then a multi-layer GRU: ``(B, T)`` tokens → ``outputs (T, B, H)``, ``state (L, B, H)``."""

    def __init__(self, vocab_size: int, embed_size: int, num_hiddens: int, num_layers: int,
                 dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size, num_hiddens, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.apply(init_seq2seq)

    def forward(self, X: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
        embs = self.embedding(X.t().long())  # (T, B, E)
        return self.rnn(embs)


@dataclass(frozen=True)
class Seq2SeqState:
    """The RNN decoder's state: the fixed context (the encoder's final top-layer output,
    ``(B, H)``) and the GRU's hidden state ``(L, B, H)``. Only ``hidden`` changes a step: the
    context stays the encoder's (in the course's first version it drifted to the decoder's
    own state at inference)."""

    context: Tensor  # (B, H)
    hidden: Tensor  # (L, B, H)

    def index_select(self, index: Tensor) -> Seq2SeqState:
        return Seq2SeqState(self.context.index_select(0, index.to(self.context.device)),
                            self.hidden.index_select(1, index.to(self.hidden.device)))


@dataclass(frozen=True)
class AttentionDecoderState:
    """Bahdanau's decoder state: the encoder's outputs ``(B, T, H)`` (the values), the same
    projected by the attention's ``W_k`` once per source (the keys), their valid lengths, and
    the GRU's hidden state ``(L, B, H)``."""

    enc_outputs: Tensor  # (B, T, H)
    enc_keys: Tensor  # (B, T, h)
    hidden: Tensor  # (L, B, H)
    enc_valid_lens: Tensor | None  # (B,)

    def index_select(self, index: Tensor) -> AttentionDecoderState:
        def pick(t: Tensor, dim: int = 0) -> Tensor:
            return t.index_select(dim, index.to(t.device))

        lens = None if self.enc_valid_lens is None else pick(self.enc_valid_lens)
        return AttentionDecoderState(pick(self.enc_outputs), pick(self.enc_keys),
                                     pick(self.hidden, 1), lens)


class Seq2SeqDecoder(nn.Module):
    """The course's RNN decoder: every step sees its token's embedding concatenated with the
    encoder's final top-layer state (the context); the encoder's final state starts its GRU."""

    def __init__(self, vocab_size: int, embed_size: int, num_hiddens: int, num_layers: int,
                 dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.dense = nn.Linear(num_hiddens, vocab_size)
        self.apply(init_seq2seq)

    def init_state(self, enc_all_outputs: tuple[Tensor, Tensor], *args: Any) -> Seq2SeqState:
        outputs, hidden = enc_all_outputs
        return Seq2SeqState(outputs[-1], hidden)  # the top layer's last output, (L, B, H)

    def forward(self, X: Tensor, state: Seq2SeqState) -> tuple[Tensor, Seq2SeqState]:
        embs = self.embedding(X.t().long())  # (T, B, E)
        ctx = state.context.unsqueeze(0).expand(embs.shape[0], -1, -1)  # (T, B, H)
        outputs, hidden = self.rnn(torch.cat((embs, ctx), dim=-1), state.hidden)
        return self.dense(outputs).swapaxes(0, 1), Seq2SeqState(state.context, hidden)  # (B, T, V)

    def reorder_state(self, state: Seq2SeqState, index: Tensor) -> Seq2SeqState:
        return state.index_select(index)


class Seq2SeqAttentionDecoder(nn.Module):
    """Bahdanau's decoder: at every step the previous top-layer state queries the encoder's
    outputs (additive attention, padding masked by ``src_valid_len``) and the context joins the
    token's embedding. ``attention_weights`` holds the last call's ``(B, T_dec, T_enc)`` weights."""

    def __init__(self, vocab_size: int, embed_size: int, num_hiddens: int, num_layers: int,
                 dropout: float = 0.0):
        super().__init__()
        self.attention = AdditiveAttention(num_hiddens, dropout, key_size=num_hiddens, query_size=num_hiddens)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.dense = nn.Linear(num_hiddens, vocab_size)
        self.attention_weights: Tensor | None = None
        self.apply(init_seq2seq)

    def init_state(self, enc_outputs: tuple[Tensor, Tensor],
                   enc_valid_lens: Tensor | None = None) -> AttentionDecoderState:
        """The encoder's outputs batch-major, and projected into the attention's keys once."""
        outputs, hidden = enc_outputs
        values = outputs.permute(1, 0, 2)  # (B, T, H)
        return AttentionDecoderState(values, self.attention.project_keys(values), hidden,
                                     enc_valid_lens)

    def forward(self, X: Tensor,
                state: AttentionDecoderState) -> tuple[Tensor, AttentionDecoderState]:
        enc_outputs, keys, hidden = state.enc_outputs, state.enc_keys, state.hidden
        enc_valid_lens = state.enc_valid_lens
        embs = self.embedding(X.t().long())  # (T, B, E)
        outputs, weights = [], []
        for x in embs:  # one step at a time: each query is the state the last step left
            query = hidden[-1].unsqueeze(1)  # (B, 1, H)
            context = self.attention.attend(query, keys, enc_outputs, enc_valid_lens)  # (B, 1, H)
            step_in = torch.cat((context, x.unsqueeze(1)), dim=-1).permute(1, 0, 2)  # (1, B, H+E)
            out, hidden = self.rnn(step_in, hidden)
            outputs.append(out)
            weights.append(self.attention.attention_weights)
        self.attention_weights = torch.cat(weights, dim=1)  # (B, T_dec, T_enc)
        logits = self.dense(torch.cat(outputs, dim=0)).swapaxes(0, 1)  # (B, T, V)
        return logits, AttentionDecoderState(enc_outputs, keys, hidden, enc_valid_lens)

    def reorder_state(self, state: AttentionDecoderState, index: Tensor) -> AttentionDecoderState:
        return state.index_select(index)


class EncoderDecoder(nn.Module):
    """An encoder and a decoder with the course's ``forward(enc_X, dec_X, *args)``, plus the
    incremental ``encode`` / ``decode_step`` / ``reorder_state`` that decoding uses."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, enc_X: Tensor, dec_X: Tensor, enc_valid_len: Tensor | None = None) -> Tensor:
        return self.decoder(dec_X, self.encode(enc_X, enc_valid_len))[0]

    def encode(self, enc_X: Tensor, enc_valid_len: Tensor | None = None) -> Any:
        return self.decoder.init_state(self.encoder(enc_X, enc_valid_len), enc_valid_len)

    def decode_step(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        logits, state = self.decoder(tokens.reshape(-1, 1), state)
        return logits[:, -1], state

    def reorder_state(self, state: Any, index: Tensor) -> Any:
        return self.decoder.reorder_state(state, index)


@register_model("seq2seq", input_shape=None, task="translate", config=Seq2SeqConfig,
                recipes=GRU_RECIPES)
def seq2seq(*, src_vocab_size: int, tgt_vocab_size: int, embed_size: int = 256, num_hiddens: int = 256,
            num_layers: int = 2, dropout: float = 0.2) -> EncoderDecoder:
    """RNN encoder-decoder (GRU; the context is the encoder's final state)."""
    return EncoderDecoder(Seq2SeqEncoder(src_vocab_size, embed_size, num_hiddens, num_layers, dropout),
                          Seq2SeqDecoder(tgt_vocab_size, embed_size, num_hiddens, num_layers, dropout))


@register_model("seq2seq_attention", input_shape=None, task="translate", config=Seq2SeqConfig,
                recipes=GRU_RECIPES)
def seq2seq_attention(*, src_vocab_size: int, tgt_vocab_size: int, embed_size: int = 256,
                      num_hiddens: int = 256, num_layers: int = 2, dropout: float = 0.2) -> EncoderDecoder:
    """GRU encoder-decoder with Bahdanau (additive) attention over the source."""
    return EncoderDecoder(
        Seq2SeqEncoder(src_vocab_size, embed_size, num_hiddens, num_layers, dropout),
        Seq2SeqAttentionDecoder(tgt_vocab_size, embed_size, num_hiddens, num_layers, dropout),
    )
