"""The Transformer (Vaswani et al. 2017) as the course builds it (d2l 11.7), post-norm.

Blocks: :class:`PositionWiseFFN` (two dense layers, ReLU), :class:`AddNorm` (residual +
layer norm, dropout on the branch), :class:`TransformerEncoderBlock` (self-attention, FFN) and
:class:`TransformerDecoderBlock` (masked self-attention, encoder-decoder attention, FFN). The
encoder and decoder scale embeddings by √d and add the sinusoidal positional encoding.

The decoder works two ways with one code path. Given a whole target sequence (teacher forcing)
each position attends to itself and the positions before it (the causal mask). Fed one token at
a time (``decode_step``), each block keeps a key/value cache (:class:`BlockCache` in the typed,
immutable :class:`TransformerDecoderState`): its self-attention's keys and values, projected
once per position (one new row a step), and the encoder's outputs projected once per source
sentence, as Hugging Face's ``past_key_value`` and nanoGPT do. A step then costs one position,
not the whole prefix; both ways give the same logits (tested). The course caches the blocks'
*inputs* and re-projects every cached position, and the encoder outputs, at every step; it
also switches between the two ways by ``self.training``, which lets a teacher-forced pass in
evaluation mode see the future.

``use_bias=True`` makes every block exactly ``torch.nn.TransformerEncoderLayer`` /
``TransformerDecoderLayer`` (post-norm, ReLU) given the same weights (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
        # F.dropout, not the module: one call less a step, which counts when decoding one token
        return self.ln(X + F.dropout(Y, self.dropout.p, self.training))


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


class KVStorage:
    """Preallocated self-attention keys and values ``(B, heads, capacity, d/heads)`` that a chain
    of decoder states shares, so that a step writes its new row in place instead of copying the
    whole cache (``torch.cat``): ``filled`` rows are taken. Each state views only its own first
    rows, which no later step writes: a step from a state that is not the chain's last
    (``offset < filled``: the same state stepped twice) writes into a fresh copy."""

    __slots__ = ("k", "v", "filled")

    def __init__(self, k: Tensor, v: Tensor, filled: int):
        self.k, self.v, self.filled = k, v, filled  # (B, heads, capacity, d/heads) each

    def index_select(self, index: Tensor) -> KVStorage:
        return KVStorage(self.k.index_select(0, index), self.v.index_select(0, index), self.filled)


def append_kv(cache: BlockCache, k_new: Tensor, v_new: Tensor) -> KVStorage:
    """The storage holding ``cache``'s ``t`` rows followed by the ``T`` new ones: written in
    place after them when ``cache`` is its chain's last state and there is room; otherwise a
    new storage of twice the rows (amortised O(1) a step). Teacher forcing (``t = 0, T > 1``)
    keeps the new rows as they are, and so does anything that autograd records (no in-place
    writes into tensors a backward pass needs)."""
    past, T = cache.self_k.shape[2], k_new.shape[2]
    storage = cache.storage
    if (past == 0 and T > 1) or (torch.is_grad_enabled() and k_new.requires_grad):
        k = torch.cat((cache.self_k, k_new), dim=2) if past else k_new  # (B, h, t + T, dh)
        v = torch.cat((cache.self_v, v_new), dim=2) if past else v_new
        return KVStorage(k, v, past + T)
    if storage is None or storage.filled != past or past + T > storage.k.shape[2]:
        b, h, _, dh = k_new.shape
        capacity = max(2 * (past + T), 16)
        storage = KVStorage(k_new.new_empty(b, h, capacity, dh), v_new.new_empty(b, h, capacity, dh),
                            past)
        storage.k[:, :, :past] = cache.self_k
        storage.v[:, :, :past] = cache.self_v
    storage.k[:, :, past:past + T] = k_new
    storage.v[:, :, past:past + T] = v_new
    storage.filled = past + T
    return storage


@dataclass(frozen=True)
class BlockCache:
    """What one decoder block keeps between steps, in heads layout ``(B, heads, ·, d / heads)``:
    its self-attention's projected keys and values of every position decoded so far (one new
    row a step; views of the first ``t`` rows of ``storage``), and the encoder outputs
    projected for its encoder-decoder attention (once per source)."""

    self_k: Tensor  # (B, heads, t, d/heads)
    self_v: Tensor  # (B, heads, t, d/heads)
    enc_k: Tensor  # (B, heads, T_src, d/heads)
    enc_v: Tensor  # (B, heads, T_src, d/heads)
    storage: KVStorage | None = None  # what self_k and self_v view, with room to grow

    def index_select(self, index: Tensor) -> BlockCache:
        """The cache of the hypotheses ``index`` (beam search's reordering)."""
        t = self.self_k.shape[2]
        enc_k, enc_v = self.enc_k.index_select(0, index), self.enc_v.index_select(0, index)
        if self.storage is None:
            return BlockCache(self.self_k.index_select(0, index),
                              self.self_v.index_select(0, index), enc_k, enc_v)
        storage = self.storage.index_select(index)
        storage.filled = t
        return BlockCache(storage.k[:, :, :t], storage.v[:, :, :t], enc_k, enc_v, storage)


@dataclass(frozen=True)
class TransformerDecoderState:
    """The decoder's state: the encoder's outputs and valid lengths, one :class:`BlockCache`
    per block, ``offset``, the number of target positions decoded so far, and ``cross``, the
    masking arguments of the encoder-decoder attention built once per source
    (:func:`source_masking`). Immutable: a step returns a new state (no list is changed in
    place)."""

    enc_outputs: Tensor  # (B, T_src, d)
    enc_valid_lens: Tensor | None  # (B,)
    blocks: tuple[BlockCache, ...]
    offset: int
    cross: tuple[Tensor | None, Tensor | None]  # (valid_lens (B,), mask (B, 1, 1, T_src))

    def index_select(self, index: Tensor) -> TransformerDecoderState:
        """The state of the hypotheses ``index`` (beam search's reordering)."""
        index = index.to(self.enc_outputs.device)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, index)

        return TransformerDecoderState(self.enc_outputs.index_select(0, index),
                                       pick(self.enc_valid_lens),
                                       tuple(c.index_select(index) for c in self.blocks),
                                       self.offset, (pick(self.cross[0]), pick(self.cross[1])))


def source_masking(enc_valid_lens: Tensor | None,
                   src_steps: int) -> tuple[Tensor | None, Tensor | None]:
    """``(valid_lens, mask)`` for the encoder-decoder attention, once per source batch (one
    host sync) instead of every step: ``(None, None)`` when no source is padded, ``(None,
    mask)`` with ``mask (B, 1, 1, T_src)`` True on the real positions (every head and query)
    when some are, and ``(valid_lens, None)`` when a source is empty (it attends to nothing:
    a zero context, as :class:`~divekit.models.attention.DotProductAttention` does)."""
    if enc_valid_lens is None:
        return None, None
    if enc_valid_lens.dim() != 1 or not bool((enc_valid_lens > 0).all()):
        return enc_valid_lens, None
    if bool((enc_valid_lens >= src_steps).all()):
        return None, None
    positions = torch.arange(src_steps, device=enc_valid_lens.device)
    return None, (positions < enc_valid_lens[:, None])[:, None, None, :]


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

    def init_cache(self, enc_outputs: Tensor) -> BlockCache:
        """An empty self-attention cache and the encoder outputs projected once."""
        enc_k, enc_v = self.attention2.project_kv(enc_outputs, enc_outputs)  # (B, h, T_src, dh)
        empty = enc_k.new_zeros(enc_k.shape[0], enc_k.shape[1], 0, enc_k.shape[3])
        return BlockCache(empty, empty, enc_k, enc_v)

    def forward(self, X: Tensor, cache: BlockCache, enc_valid_lens: Tensor | None = None,
                enc_mask: Tensor | None = None) -> tuple[Tensor, BlockCache]:
        """``X (B, T, d)`` holds the positions after the ``t`` in ``cache``: position ``t + j``
        attends to positions ``1 … t + j`` (the causal mask; none when ``T = 1``). Teacher
        forcing is the case ``t = 0``, one decoding step the case ``T = 1``; both project
        each new position's key and value once and append them to the cache. The
        encoder-decoder attention masks by ``enc_valid_lens`` or by ``enc_mask``, a key mask
        built once per source (:func:`source_masking`)."""
        k_new, v_new = self.attention1.project_kv(X, X)  # (B, h, T, dh)
        storage = append_kv(cache, k_new, v_new)
        b, t = X.shape[0], X.shape[1]
        past = cache.self_k.shape[2]
        k, v = storage.k[:, :, :past + t], storage.v[:, :, :past + t]  # (B, h, t + T, dh)
        dec_valid_lens = None
        if t > 1:
            dec_valid_lens = torch.arange(past + 1, past + t + 1, device=X.device).expand(b, t)
        Y = self.addnorm1(X, self.attention1.attend(X, k, v, dec_valid_lens))
        Z = self.addnorm2(Y, self.attention2.attend(Y, cache.enc_k, cache.enc_v, enc_valid_lens,
                                                    mask=enc_mask))
        return self.addnorm3(Z, self.ffn(Z)), BlockCache(k, v, cache.enc_k, cache.enc_v, storage)


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

    def init_state(self, enc_outputs: Tensor,
                   enc_valid_lens: Tensor | None = None) -> TransformerDecoderState:
        """Each block projects the encoder's outputs into its keys and values here, once."""
        blocks = tuple(blk.init_cache(enc_outputs) for blk in self.blks)
        return TransformerDecoderState(enc_outputs, enc_valid_lens, blocks, 0,
                                       source_masking(enc_valid_lens, enc_outputs.shape[1]))

    def forward(self, X: Tensor,
                state: TransformerDecoderState) -> tuple[Tensor, TransformerDecoderState]:
        """``X (B, T)`` tokens after the ``state.offset`` already decoded → logits
        ``(B, T, V)`` and the state with their keys and values cached."""
        emb = self.embedding(X.long()) * math.sqrt(self.num_hiddens)
        H = self.pos_encoding(emb, offset=state.offset)  # (B, T, d)
        caches = []
        for blk, cache in zip(self.blks, state.blocks):
            H, cache = blk(H, cache, *state.cross)
            caches.append(cache)
        new_state = TransformerDecoderState(state.enc_outputs, state.enc_valid_lens,
                                            tuple(caches), state.offset + X.shape[1],
                                            state.cross)
        return self.dense(H), new_state

    def reorder_state(self, state: TransformerDecoderState,
                      index: Tensor) -> TransformerDecoderState:
        return state.index_select(index)

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
