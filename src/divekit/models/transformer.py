"""The Transformer (Vaswani et al. 2017) as the course builds it (d2l 11.7), post-norm.

Blocks: :class:`PositionWiseFFN` (two dense layers, ReLU), :class:`AddNorm` (residual +
layer norm, dropout on the branch), :class:`TransformerEncoderBlock` (self-attention, FFN) and
:class:`TransformerDecoderBlock` (masked self-attention, encoder-decoder attention, FFN). The
encoder and decoder scale embeddings by √d and add the sinusoidal positional encoding.

The decoder works two ways. Given a whole target sequence (teacher forcing) each position
attends to itself and the positions before it (the causal mask). Fed one token at a time
(``decode_step``), each block caches the representations it has seen so far in the state
(``state[2][i]``), so a step attends to the whole prefix without recomputing it; both give the
same logits (tested). The course switches between the two by ``self.training``, which lets a
teacher-forced pass in evaluation mode see the future; here the switch is whether a cache exists.

``use_bias=True`` makes every block exactly ``torch.nn.TransformerEncoderLayer`` /
``TransformerDecoderLayer`` (post-norm, ReLU) given the same weights (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from divekit.config import option
from divekit.errors import DivekitError
from divekit.models.attention import MultiHeadAttention, PositionalEncoding
from divekit.models.registry import register_model
from divekit.models.seq2seq import EncoderDecoder, check_sizes


def scaled_embedding(vocab_size: int, num_hiddens: int) -> nn.Embedding:
    """An embedding initialised N(0, 1/d), so that after the √d scaling its vectors are O(1),
    the scale of the positional encoding (Vaswani et al.; fairseq). The course keeps PyTorch's
    N(0, 1), which the √d scaling makes √d times larger than the encoding: at d = 256 the
    positions are a whisper, and on numbers-fr the model swapped thousands and hundreds."""
    embedding = nn.Embedding(vocab_size, num_hiddens)
    nn.init.normal_(embedding.weight, mean=0.0, std=num_hiddens ** -0.5)
    return embedding


class PositionWiseFFN(nn.Module):
    """``dense2(relu(dense1(X)))`` applied at every position: ``(B, T, d) → (B, T, d_out)``."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, ffn_num_outputs: int | None = None):
        super().__init__()
        self.dense1 = nn.Linear(num_hiddens, ffn_num_hiddens)
        self.relu = nn.ReLU()
        self.dense2 = nn.Linear(ffn_num_hiddens, ffn_num_outputs or num_hiddens)

    def forward(self, X: Tensor) -> Tensor:
        return self.dense2(self.relu(self.dense1(X)))


class AddNorm(nn.Module):
    """``LayerNorm(X + dropout(Y))``: the residual connection and layer normalisation."""

    def __init__(self, norm_shape: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(norm_shape)

    def forward(self, X: Tensor, Y: Tensor) -> Tensor:
        return self.ln(X + self.dropout(Y))


def _mha(num_hiddens: int, num_heads: int, dropout: float, use_bias: bool) -> MultiHeadAttention:
    return MultiHeadAttention(num_hiddens, num_heads, dropout, use_bias, query_size=num_hiddens,
                              key_size=num_hiddens, value_size=num_hiddens, record_weights=False)


class TransformerEncoderBlock(nn.Module):
    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, num_heads: int, dropout: float = 0.0,
                 use_bias: bool = False):
        super().__init__()
        self.attention = _mha(num_hiddens, num_heads, dropout, use_bias)
        self.addnorm1 = AddNorm(num_hiddens, dropout)
        self.ffn = PositionWiseFFN(num_hiddens, ffn_num_hiddens)
        self.addnorm2 = AddNorm(num_hiddens, dropout)

    def forward(self, X: Tensor, valid_lens: Tensor | None = None) -> Tensor:
        Y = self.addnorm1(X, self.attention(X, X, X, valid_lens))
        return self.addnorm2(Y, self.ffn(Y))


class TransformerEncoder(nn.Module):
    """Embedding × √d + positional encoding, then ``num_blks`` encoder blocks: ``(B, T) → (B, T, d)``."""

    def __init__(self, vocab_size: int, num_hiddens: int, ffn_num_hiddens: int, num_heads: int,
                 num_blks: int, dropout: float = 0.0, use_bias: bool = False, max_len: int = 1000):
        super().__init__()
        self.num_hiddens = num_hiddens
        self.embedding = scaled_embedding(vocab_size, num_hiddens)
        self.pos_encoding = PositionalEncoding(num_hiddens, dropout, max_len)
        self.blks = nn.ModuleList(
            TransformerEncoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout, use_bias)
            for _ in range(num_blks)
        )

    def forward(self, X: Tensor, valid_lens: Tensor | None = None) -> Tensor:
        X = self.pos_encoding(self.embedding(X.long()) * math.sqrt(self.num_hiddens))
        for blk in self.blks:
            X = blk(X, valid_lens)
        return X

    def record_attention(self, on: bool = True) -> None:
        """Keep every block's ``(B, heads, T, T)`` weights in ``blk.attention.attention_weights``."""
        for blk in self.blks:
            blk.attention.attention.record_weights = on


class TransformerDecoderBlock(nn.Module):
    """Masked self-attention, attention over the encoder's outputs, FFN; the ``i``-th block."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, num_heads: int, dropout: float, i: int,
                 use_bias: bool = False):
        super().__init__()
        self.i = i
        self.attention1 = _mha(num_hiddens, num_heads, dropout, use_bias)
        self.addnorm1 = AddNorm(num_hiddens, dropout)
        self.attention2 = _mha(num_hiddens, num_heads, dropout, use_bias)
        self.addnorm2 = AddNorm(num_hiddens, dropout)
        self.ffn = PositionWiseFFN(num_hiddens, ffn_num_hiddens)
        self.addnorm3 = AddNorm(num_hiddens, dropout)

    def forward(self, X: Tensor, state: list) -> tuple[Tensor, list]:
        enc_outputs, enc_valid_lens, cache = state
        past = cache[self.i]
        if past is None:  # the whole target at once: position t sees positions 1..t
            key_values = X
            b, t, _ = X.shape
            dec_valid_lens = torch.arange(1, t + 1, device=X.device).expand(b, t)
        else:  # one more step: it sees everything cached plus itself
            key_values = torch.cat((past, X), dim=1)
            dec_valid_lens = None
        cache[self.i] = key_values
        Y = self.addnorm1(X, self.attention1(X, key_values, key_values, dec_valid_lens))
        Z = self.addnorm2(Y, self.attention2(Y, enc_outputs, enc_outputs, enc_valid_lens))
        return self.addnorm3(Z, self.ffn(Z)), state


class TransformerDecoder(nn.Module):
    def __init__(self, vocab_size: int, num_hiddens: int, ffn_num_hiddens: int, num_heads: int,
                 num_blks: int, dropout: float = 0.0, use_bias: bool = False, max_len: int = 1000):
        super().__init__()
        self.num_hiddens, self.num_blks = num_hiddens, num_blks
        self.embedding = scaled_embedding(vocab_size, num_hiddens)
        self.pos_encoding = PositionalEncoding(num_hiddens, dropout, max_len)
        self.blks = nn.ModuleList(
            TransformerDecoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout, i, use_bias)
            for i in range(num_blks)
        )
        self.dense = nn.Linear(num_hiddens, vocab_size)

    def init_state(self, enc_outputs: Tensor, enc_valid_lens: Tensor | None = None) -> list:
        return [enc_outputs, enc_valid_lens, [None] * self.num_blks]

    def forward(self, X: Tensor, state: list) -> tuple[Tensor, list]:
        cache = state[2][0]
        offset = 0 if cache is None else cache.shape[1]  # positions already decoded
        emb = self.embedding(X.long()) * math.sqrt(self.num_hiddens)
        pe = self.pos_encoding
        X = pe.dropout(emb + pe.P[:, offset:offset + X.shape[1]].to(emb.dtype))
        for blk in self.blks:
            X, state = blk(X, state)
        return self.dense(X), state

    def reorder_state(self, state: list, index: Tensor) -> list:
        enc_outputs, lens, cache = state
        return [enc_outputs.index_select(0, index), None if lens is None else lens.index_select(0, index),
                [None if c is None else c.index_select(0, index) for c in cache]]

    def record_attention(self, on: bool = True) -> None:
        """Keep each block's self- and encoder-decoder attention weights."""
        for blk in self.blks:
            blk.attention1.attention.record_weights = on
            blk.attention2.attention.record_weights = on


class Transformer(EncoderDecoder):
    """A Transformer encoder-decoder; ``encode`` / ``decode_step`` as every seq2seq model."""


@dataclass(frozen=True)
class TransformerConfig:
    """The Transformer's sizes, named as :func:`transformer`'s arguments; the course's flags
    (``--hidden``, ``--ffn``, ``--heads``, ``--layers``) are aliases. The heads split the width
    ``d`` evenly (``d / heads`` each), so ``num_hiddens`` must be a multiple of ``num_heads``."""

    num_hiddens: int = option(256, "model width d: embeddings, attention and block outputs",
                              aliases=["--hidden"], metavar="H")
    ffn_num_hiddens: int = option(64, "hidden units of the position-wise feed-forward network",
                                  aliases=["--ffn"], metavar="N")
    num_heads: int = option(4, "attention heads", aliases=["--heads"], metavar="N")
    num_blks: int = option(2, "blocks in the encoder and in the decoder", aliases=["--layers"],
                           metavar="L")
    dropout: float = option(0.2, "dropout")
    use_bias: bool = option(False, "biases in the attention projections (every block then equals "
                            "torch.nn's Transformer layers)")

    def __post_init__(self) -> None:
        check_sizes(self)
        if self.num_hiddens % self.num_heads:
            raise DivekitError(f"--hidden {self.num_hiddens} must be a multiple of --heads "
                               f"{self.num_heads}")


# the course's recipe (d2l 11.7): Adam at 0.0015, 10 epochs of 128 pairs
TRANSFORMER_RECIPES = {"*": {"optimizer": "adam", "lr": 0.0015, "epochs": 10, "batch_size": 128}}


@register_model("transformer", input_shape=None, task="translate", config=TransformerConfig,
                recipes=TRANSFORMER_RECIPES)
def transformer(*, src_vocab_size: int, tgt_vocab_size: int, num_hiddens: int = 256,
                ffn_num_hiddens: int = 64, num_heads: int = 4, num_blks: int = 2, dropout: float = 0.2,
                use_bias: bool = False) -> Transformer:
    """Transformer encoder-decoder (multi-head attention, post-norm blocks, sinusoidal positions)."""
    return Transformer(
        TransformerEncoder(src_vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout, use_bias),
        TransformerDecoder(tgt_vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout, use_bias),
    )
