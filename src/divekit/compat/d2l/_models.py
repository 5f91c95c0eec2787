"""The book's networks (ResNet blocks, RNN language models, encoder-decoders, attention, the
Transformer encoder, BERT) with its constructors and call protocols, over divekit's modules.

Each class here is a subclass of (or a call into) divekit's own implementation in
:mod:`divekit.models` and :mod:`divekit.ops`; the adapter maps the book's arguments onto
divekit's constructor and keeps the book's ``forward`` signature and return shapes:

* ``Residual`` / ``resnet18``: :class:`divekit.models.resnet.Residual` and ``resnet_stage``
  (``resnet18`` is the multiple-GPU section's variant: a 3x3 stem, no max-pool).
* ``RNNModel``: :class:`divekit.models.rnn.RNNLM` around the given ``nn.RNN``/``GRU``/``LSTM``,
  returning the book's time-major ``(T * B, V)`` logits. ``RNNModelScratch`` is the book's call
  protocol around the learner's own functions (``net(X, state)``, ``begin_state``,
  ``net.params``); it is not an ``nn.Module``, as the book's training loop expects.
* ``Encoder`` / ``Decoder`` / ``AttentionDecoder``: the interfaces the chapters subclass;
  ``EncoderDecoder`` is :class:`divekit.models.seq2seq.EncoderDecoder` with the book's
  ``forward`` (it returns the decoder's ``(output, state)``), so divekit's ``encode`` /
  ``decode_step`` work on the chapters' models too. ``Seq2SeqEncoder`` is divekit's.
* ``sequence_mask`` / ``masked_softmax``: :mod:`divekit.ops.masking`.
* ``AdditiveAttention`` / ``DotProductAttention`` / ``MultiHeadAttention`` /
  ``PositionalEncoding``: :mod:`divekit.models.attention`, always keeping ``attention_weights``
  (the book's heat maps read them), ``MultiHeadAttention``'s in the book's ``(B * heads, Q, K)``
  layout.
* ``PositionWiseFFN`` / ``AddNorm`` / ``EncoderBlock`` / ``TransformerEncoder``:
  :mod:`divekit.models.transformer`.
* ``BERTEncoder`` / ``MaskLM`` / ``NextSentencePred`` / ``BERTModel``: :mod:`divekit.models.bert`
  with the book's sizes (ReLU, LayerNorm eps 1e-5, no embedding LayerNorm), so the book's
  pretrained ``bert.small`` / ``bert.base`` parameters load with ``load_state_dict``.

Differences from the book:

* ``sequence_mask`` returns a new tensor and leaves ``X`` as it was; the book's also writes into
  ``X``. (Every use in the book takes the returned tensor.)
* ``masked_softmax`` (and every attention here) gives masked keys exactly zero weight, and a
  query with valid length 0 all-zero weights (a zero output); the book fills masked scores with
  ``-1e6``, which makes such a row uniform over the padding.
* ``attention_weights`` are detached from the autograd graph (they are for looking at).
* ``Residual`` and ``resnet18``: convolutions followed by BatchNorm have no bias (the
  normalisation cancels it), so their state dicts lack those ``bias`` entries.
* ``RNNModel``'s submodules are registered as ``cell`` and ``output`` (divekit's ``RNNLM``);
  ``net.rnn`` and ``net.linear`` are the same modules under the book's names, but state-dict
  keys are ``cell.*`` / ``output.*``.
* ``Seq2SeqEncoder`` is Xavier-initialised when built (the book does it in ``train_seq2seq``)
  and gives its GRU no dropout with one layer (the book's makes PyTorch warn).
* ``TransformerEncoder``: the token embedding starts at N(0, 1/d) rather than N(0, 1), so that
  after the ``sqrt(d)`` scaling it is as large as the positional encoding (with N(0, 1) the
  positions are drowned out); its blocks are ``blks.0``, ``blks.1``, ... (the book's
  ``blks.block0``, ...).
* ``PositionalEncoding.P`` is a (non-saved) buffer, so it follows ``.to(device)``; positions past
  ``max_len`` raise a ``DivekitError`` instead of a broadcasting error.
* BERT: the position embedding is a ``(max_len, num_hiddens)`` parameter that trains (the
  book's is ``(1, max_len, num_hiddens)`` and added through ``.data``, so it never learns);
  the book's ``(1, max_len, num_hiddens)`` checkpoints still load. The summed embeddings get
  dropout; ``BERTModel`` starts from BERT's N(0, 0.02) initialisation. Sizes that every block
  needs equal to ``num_hiddens`` (``norm_shape``, ``ffn_num_input``, ``key_size``, ...) are
  checked when the model is built, with one clear error, rather than failing inside ``forward``.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.errors import DivekitError
from divekit.models import attention as _attention
from divekit.models import bert as _bert
from divekit.models import resnet as _resnet
from divekit.models import rnn as _rnn
from divekit.models import seq2seq as _seq2seq
from divekit.models import transformer as _transformer
from divekit.ops import masking as _masking

__all__ = [
    "Residual", "resnet18", "corr2d",
    "RNNModelScratch", "RNNModel",
    "Encoder", "Decoder", "AttentionDecoder", "EncoderDecoder", "Seq2SeqEncoder",
    "sequence_mask", "masked_softmax", "MaskedSoftmaxCELoss",
    "AdditiveAttention", "DotProductAttention", "MultiHeadAttention",
    "transpose_qkv", "transpose_output", "PositionalEncoding",
    "PositionWiseFFN", "AddNorm", "EncoderBlock", "TransformerEncoder",
    "get_tokens_and_segments", "BERTEncoder", "MaskLM", "NextSentencePred", "BERTModel",
]


def _no_kwargs(owner: str, kwargs: dict[str, Any]) -> None:
    """The book forwards ``**kwargs`` to ``nn.Module.__init__``, which takes none: refuse alike."""
    if kwargs:
        raise TypeError(f"{owner}() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")


# ------------------------------------------------------------------------------ CNNs


class Residual(_resnet.Residual):
    """The residual block: two 3x3 convs with BatchNorm, and a 1x1 conv shortcut when
    ``use_1x1conv`` (divekit's :class:`~divekit.models.resnet.Residual`)."""

    def __init__(self, input_channels: int, num_channels: int, use_1x1conv: bool = False,
                 strides: int = 1):
        super().__init__(input_channels, num_channels, use_1x1conv=use_1x1conv, strides=strides)


def resnet18(num_classes: int, in_channels: int = 1) -> nn.Sequential:
    """ResNet-18 for small images: a 3x3 stride-1 stem (no max-pool), four stages of two
    residual blocks (64, 128, 256, 512 channels; divekit's ``resnet_stage``), global average
    pooling and one dense layer. Module names are the book's (``resnet_block1`` ... ``fc``)."""
    net = nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(64), nn.ReLU())
    channels = 64
    for i, num_channels in enumerate((64, 128, 256, 512), start=1):
        net.add_module(f"resnet_block{i}", _resnet.resnet_stage(
            Residual, channels, num_channels, 2, first_block=i == 1))
        channels = num_channels
    net.add_module("global_avg_pool", nn.AdaptiveAvgPool2d((1, 1)))
    net.add_module("fc", nn.Sequential(nn.Flatten(), nn.Linear(channels, num_classes)))
    return net


def corr2d(X: Tensor, K: Tensor) -> Tensor:
    """The 2-D cross-correlation of ``X (H, W)`` with the kernel ``K (h, w)``:
    ``Y[i, j] = sum(X[i:i+h, j:j+w] * K)``, shape ``(H - h + 1, W - w + 1)``; differentiable in
    both (it is ``F.conv2d``, which is a cross-correlation)."""
    if not (isinstance(X, Tensor) and isinstance(K, Tensor)) or X.dim() != 2 or K.dim() != 2:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in (X, K)]
        raise DivekitError(f"corr2d takes a 2-D X and a 2-D kernel K, got {shapes[0]} and {shapes[1]}")
    if K.shape[0] > X.shape[0] or K.shape[1] > X.shape[1]:
        raise DivekitError(f"kernel {tuple(K.shape)} is larger than X {tuple(X.shape)}")
    dtype = torch.promote_types(X.dtype, K.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return F.conv2d(X.to(dtype)[None, None], K.to(dtype)[None, None])[0, 0]


# ------------------------------------------------------------------------------ RNN language models


class RNNModelScratch:
    """A recurrent language model from the learner's own functions.

    ``get_params(vocab_size, num_hiddens, device)`` returns the parameter tensors (kept in
    ``params``), ``init_state(batch_size, num_hiddens, device)`` the initial state, and
    ``forward_fn(inputs, state, params)`` runs the network over the one-hot, time-major
    ``inputs (T, B, V)`` and returns ``(outputs (T * B, V), state)``. ``net(X, state)`` with
    token ids ``X (B, T)`` returns what ``forward_fn`` returns. Not an ``nn.Module``: the book's
    training loop updates ``net.params`` with its own SGD."""

    def __init__(self, vocab_size: int, num_hiddens: int, device: Any,
                 get_params: Callable[..., Any], init_state: Callable[..., Any],
                 forward_fn: Callable[..., Any]):
        self.vocab_size, self.num_hiddens = vocab_size, num_hiddens
        self.params = get_params(vocab_size, num_hiddens, device)
        self.init_state, self.forward_fn = init_state, forward_fn

    def __call__(self, X: Tensor, state: Any) -> Any:
        inputs = F.one_hot(X.T.long(), self.vocab_size).to(torch.float32)  # (T, B, V)
        return self.forward_fn(inputs, state, self.params)

    def begin_state(self, batch_size: int, device: Any) -> Any:
        return self.init_state(batch_size, self.num_hiddens, device)


class RNNModel(_rnn.RNNLM):
    """A language model on an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` layer (one-hot inputs, a dense
    output layer; bidirectional layers too): divekit's :class:`~divekit.models.rnn.RNNLM`.

    ``forward(inputs (B, T), state)`` returns ``(logits (T * B, V), state)``, time-major as the
    book's; ``begin_state(device, batch_size=1)`` the zero state (a pair for an LSTM)."""

    def __init__(self, rnn_layer: nn.RNNBase, vocab_size: int, **kwargs: Any):
        _no_kwargs("RNNModel", kwargs)
        super().__init__(rnn_layer, vocab_size)
        self.num_hiddens = rnn_layer.hidden_size
        self.num_directions = 2 if rnn_layer.bidirectional else 1

    @property
    def rnn(self) -> nn.Module:
        """The recurrent layer (the book's name for divekit's ``cell``)."""
        return self.cell

    @property
    def linear(self) -> nn.Linear:
        """The output layer (the book's name for divekit's ``output``)."""
        return self.output

    def forward(self, inputs: Tensor, state: Any) -> tuple[Tensor, Any]:  # type: ignore[override]
        if state is None:
            state = self.begin_state(inputs.device, inputs.shape[0])
        logits, state = super().forward(inputs.long(), state)  # (B, T, V)
        # back to time-major, one row per (step, sequence): a view of the dense layer's output
        return logits.transpose(0, 1).reshape(-1, logits.shape[-1]), state

    def begin_state(self, device: Any, batch_size: int = 1) -> Any:  # type: ignore[override]
        return _rnn.begin_state(self.cell, batch_size, device)


# ------------------------------------------------------------------------------ encoder-decoder


class Encoder(nn.Module):
    """The encoder interface: ``forward(X, *args)`` returns what the decoder's ``init_state``
    takes. The chapters subclass it."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)

    def forward(self, X: Any, *args: Any) -> Any:
        raise NotImplementedError


class Decoder(nn.Module):
    """The decoder interface: ``init_state(enc_outputs, *args)`` turns the encoder's outputs
    into a state, ``forward(X, state)`` returns ``(output, state)``. The chapters subclass it."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)

    def init_state(self, enc_outputs: Any, *args: Any) -> Any:
        raise NotImplementedError

    def forward(self, X: Any, state: Any) -> Any:
        raise NotImplementedError


class AttentionDecoder(Decoder):
    """A decoder with attention: subclasses give ``attention_weights`` (a property)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)

    @property
    def attention_weights(self) -> Any:
        raise NotImplementedError


class EncoderDecoder(_seq2seq.EncoderDecoder):
    """An encoder and a decoder: ``forward(enc_X, dec_X, *args)`` runs ``encoder(enc_X, *args)``,
    ``decoder.init_state(enc_outputs, *args)`` and returns ``decoder(dec_X, state)``, the
    decoder's ``(output, state)``. Being divekit's
    :class:`~divekit.models.seq2seq.EncoderDecoder`, it also has ``encode`` / ``decode_step``
    (what divekit's greedy and beam search drive)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, **kwargs: Any):
        _no_kwargs("EncoderDecoder", kwargs)
        super().__init__(encoder, decoder)

    def forward(self, enc_X: Any, dec_X: Any, *args: Any) -> Any:  # type: ignore[override]
        enc_outputs = self.encoder(enc_X, *args)
        dec_state = self.decoder.init_state(enc_outputs, *args)
        return self.decoder(dec_X, dec_state)


class Seq2SeqEncoder(_seq2seq.Seq2SeqEncoder, Encoder):
    """Embedding and a multi-layer GRU: tokens ``(B, T)`` → ``(outputs (T, B, H), state (L, B, H))``
    (divekit's :class:`~divekit.models.seq2seq.Seq2SeqEncoder`)."""

    def __init__(self, vocab_size: int, embed_size: int, num_hiddens: int, num_layers: int,
                 dropout: float = 0, **kwargs: Any):
        _no_kwargs("Seq2SeqEncoder", kwargs)
        super().__init__(vocab_size, embed_size, num_hiddens, num_layers, dropout)


# ------------------------------------------------------------------------------ masks and the loss

sequence_mask = _masking.sequence_mask
masked_softmax = _masking.masked_softmax


class MaskedSoftmaxCELoss(nn.CrossEntropyLoss):
    """Softmax cross-entropy that ignores padding: ``forward(pred (B, T, V), label (B, T),
    valid_len (B,))`` returns each sequence's loss ``(B,)``, the mean over its ``T`` steps of the
    per-token losses, with the steps at and after ``valid_len`` counted as 0.

    The per-token losses are computed on ``pred`` viewed as ``(B * T, V)`` rows, the same values
    as the book's ``cross_entropy(pred.permute(0, 2, 1), label)``: over a permuted ``(B, V, T)``
    tensor the softmax walks the vocabulary with a stride of ``T``, which made the loss and its
    backward about 5x slower on a CPU (64 x 10 tokens, 200 words), a sixth of a small
    translation model's step."""

    def forward(self, pred: Tensor, label: Tensor, valid_len: Tensor) -> Tensor:  # type: ignore[override]
        weights = sequence_mask(torch.ones_like(label, dtype=pred.dtype), valid_len)  # (B, T)
        per_token = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), label.reshape(-1),
                                    weight=self.weight, ignore_index=self.ignore_index,
                                    reduction="none", label_smoothing=self.label_smoothing)
        return (per_token.reshape(label.shape) * weights).mean(dim=1)


# ------------------------------------------------------------------------------ attention


class AdditiveAttention(_attention.AdditiveAttention):
    """Additive attention, score ``w_vᵀ tanh(W_q q + W_k k)``; ``attention_weights`` ``(B, Q, K)``
    after each call (divekit's :class:`~divekit.models.attention.AdditiveAttention`)."""

    def __init__(self, key_size: int, query_size: int, num_hiddens: int, dropout: float,
                 **kwargs: Any):
        _no_kwargs("AdditiveAttention", kwargs)
        super().__init__(num_hiddens, dropout, key_size=key_size, query_size=query_size,
                         record_weights=True)

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor,  # type: ignore[override]
                valid_lens: Tensor | None) -> Tensor:
        return super().forward(queries, keys, values, valid_lens)


class DotProductAttention(_attention.DotProductAttention):
    """Scaled dot-product attention ``softmax(q kᵀ / sqrt(d)) v``; ``attention_weights``
    ``(B, Q, K)`` after each call (divekit's
    :class:`~divekit.models.attention.DotProductAttention`)."""

    def __init__(self, dropout: float, **kwargs: Any):
        _no_kwargs("DotProductAttention", kwargs)
        super().__init__(dropout, record_weights=True)

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor,  # type: ignore[override]
                valid_lens: Tensor | None = None) -> Tensor:
        return super().forward(queries, keys, values, valid_lens)


class MultiHeadAttention(_attention.MultiHeadAttention):
    """Multi-head attention (divekit's :class:`~divekit.models.attention.MultiHeadAttention`):
    ``num_heads`` scaled dot-product heads over projections ``W_q``, ``W_k``, ``W_v`` of
    ``num_hiddens / num_heads`` features each, joined by ``W_o``. After each call
    ``attention.attention_weights`` holds the ``(B * num_heads, Q, K)`` weights, row
    ``b * num_heads + h`` for head ``h`` of sequence ``b``, as the book's."""

    def __init__(self, key_size: int, query_size: int, value_size: int, num_hiddens: int,
                 num_heads: int, dropout: float, bias: bool = False, **kwargs: Any):
        _no_kwargs("MultiHeadAttention", kwargs)
        super().__init__(num_hiddens, num_heads, dropout, bias, query_size=query_size,
                         key_size=key_size, value_size=value_size, record_weights=True)

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor,  # type: ignore[override]
                valid_lens: Tensor | None) -> Tensor:
        out = super().forward(queries, keys, values, valid_lens)
        weights = self.attention.attention_weights  # (B, heads, Q, K)
        if weights is not None and weights.dim() == 4:
            self.attention.attention_weights = weights.reshape(-1, *weights.shape[2:])
        return out


def transpose_qkv(X: Tensor, num_heads: int) -> Tensor:
    """``(B, T, num_hiddens) → (B * num_heads, T, num_hiddens / num_heads)``: the heads of
    divekit's ``MultiHeadAttention.transpose_qkv``, folded into the batch."""
    heads = _attention.MultiHeadAttention.transpose_qkv(
        types.SimpleNamespace(num_heads=num_heads), X)  # type: ignore[arg-type]  # (B, h, T, d)
    return heads.reshape(-1, *heads.shape[2:])


def transpose_output(X: Tensor, num_heads: int) -> Tensor:
    """``(B * num_heads, T, d) → (B, T, num_heads * d)``: the inverse of :func:`transpose_qkv`."""
    return _attention.MultiHeadAttention.transpose_output(
        None, X.reshape(-1, num_heads, *X.shape[1:]))  # type: ignore[arg-type]


class PositionalEncoding(_attention.PositionalEncoding):
    """Adds the sinusoidal encoding ``P (1, max_len, num_hiddens)`` to ``X (B, T, num_hiddens)``,
    then dropout (divekit's :class:`~divekit.models.attention.PositionalEncoding`)."""

    def __init__(self, num_hiddens: int, dropout: float, max_len: int = 1000):
        super().__init__(num_hiddens, dropout, max_len)

    def forward(self, X: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(X)


# ------------------------------------------------------------------------------ Transformer encoder


class PositionWiseFFN(_transformer.PositionWiseFFN):
    """``dense2(relu(dense1(X)))`` at every position (divekit's
    :class:`~divekit.models.transformer.PositionWiseFFN`)."""

    def __init__(self, ffn_num_input: int, ffn_num_hiddens: int, ffn_num_outputs: int,
                 **kwargs: Any):
        _no_kwargs("PositionWiseFFN", kwargs)
        super().__init__(ffn_num_input, ffn_num_hiddens, ffn_num_outputs)


class AddNorm(_transformer.AddNorm):
    """``LayerNorm(X + dropout(Y))`` over the trailing ``normalized_shape`` (divekit's
    :class:`~divekit.models.transformer.AddNorm`)."""

    def __init__(self, normalized_shape: int | Sequence[int], dropout: float, **kwargs: Any):
        _no_kwargs("AddNorm", kwargs)
        super().__init__(normalized_shape, dropout)  # type: ignore[arg-type]


class EncoderBlock(_transformer.TransformerEncoderBlock):
    """A Transformer encoder block of the book's sizes: multi-head self-attention and the FFN,
    each followed by :class:`AddNorm`. Its ``forward`` is divekit's
    :class:`~divekit.models.transformer.TransformerEncoderBlock`'s; the sublayers are built here
    from the book's arguments (divekit's constructor ties them all to ``num_hiddens``)."""

    def __init__(self, key_size: int, query_size: int, value_size: int, num_hiddens: int,
                 norm_shape: int | Sequence[int], ffn_num_input: int, ffn_num_hiddens: int,
                 num_heads: int, dropout: float, use_bias: bool = False, **kwargs: Any):
        nn.Module.__init__(self, **kwargs)  # the sublayers below are the parent's, book-sized
        self.attention = MultiHeadAttention(key_size, query_size, value_size, num_hiddens,
                                            num_heads, dropout, use_bias)
        self.addnorm1 = AddNorm(norm_shape, dropout)
        self.ffn = PositionWiseFFN(ffn_num_input, ffn_num_hiddens, num_hiddens)
        self.addnorm2 = AddNorm(norm_shape, dropout)

    def forward(self, X: Tensor, valid_lens: Tensor | None) -> Tensor:  # type: ignore[override]
        return super().forward(X, valid_lens)


class TransformerEncoder(_transformer.TransformerEncoder, Encoder):
    """Token embedding times ``sqrt(num_hiddens)`` plus the positional encoding, then
    ``num_layers`` :class:`EncoderBlock` s (divekit's
    :class:`~divekit.models.transformer.TransformerEncoder`). After each call
    ``attention_weights[i]`` is block ``i``'s ``(B * num_heads, T, T)`` self-attention."""

    def __init__(self, vocab_size: int, key_size: int, query_size: int, value_size: int,
                 num_hiddens: int, norm_shape: int | Sequence[int], ffn_num_input: int,
                 ffn_num_hiddens: int, num_heads: int, num_layers: int, dropout: float,
                 use_bias: bool = False, **kwargs: Any):
        _no_kwargs("TransformerEncoder", kwargs)
        # divekit's embedding and positional encoding, no blocks yet: the book's sizes follow
        super().__init__(vocab_size, num_hiddens, ffn_num_hiddens, num_heads, 0, dropout, use_bias)
        self.blks.extend(
            EncoderBlock(key_size, query_size, value_size, num_hiddens, norm_shape, ffn_num_input,
                         ffn_num_hiddens, num_heads, dropout, use_bias)
            for _ in range(num_layers))
        self.attention_weights: list[Tensor | None] = [None] * num_layers

    def forward(self, X: Tensor, valid_lens: Tensor | None, *args: Any) -> Tensor:  # type: ignore[override]
        out = super().forward(X, valid_lens)
        self.attention_weights = [blk.attention.attention.attention_weights for blk in self.blks]
        return out


# ------------------------------------------------------------------------------ BERT


def get_tokens_and_segments(tokens_a: list[Any],
                            tokens_b: list[Any] | None = None) -> tuple[list[Any], list[int]]:
    """``['<cls>', *tokens_a, '<sep>']`` (segment 0), then ``[*tokens_b, '<sep>']`` (segment 1)."""
    return _bert.get_tokens_and_segments(tokens_a, tokens_b)


def _bert_config(vocab_size: int, num_hiddens: int, ffn_num_hiddens: int | None = None,
                 num_heads: int = 1, num_layers: int = 1, dropout: float = 0.0,
                 max_len: int = 1000) -> _bert.BertConfig:
    """divekit's BERT with the book's choices: ReLU, PyTorch's LayerNorm eps, no embedding norm."""
    return _bert.BertConfig(vocab_size=vocab_size, num_layers=num_layers, num_hiddens=num_hiddens,
                            num_heads=num_heads, ffn_num_hiddens=ffn_num_hiddens or num_hiddens,
                            max_len=max_len, dropout=dropout, layer_norm_eps=1e-5,
                            activation="relu", embed_norm=False)


def _check_sizes(owner: str, num_hiddens: int, norm_shape: Any, **sizes: int) -> None:
    """Every block reads and writes ``num_hiddens`` features: the book's separate sizes must agree."""
    shape = (norm_shape,) if isinstance(norm_shape, int) else tuple(norm_shape)
    if shape != (num_hiddens,):
        raise DivekitError(f"{owner}: norm_shape {norm_shape!r} must be [{num_hiddens}] "
                           f"(= [num_hiddens])")
    for name, value in sizes.items():
        if value != num_hiddens:
            raise DivekitError(f"{owner}: {name} {value!r} must equal num_hiddens {num_hiddens} "
                               "(every block reads and writes num_hiddens features)")


def _book_pos_embedding(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                        *args: Any) -> None:
    """Load hook: the book's ``pos_embedding`` is ``(1, max_len, H)``, divekit's ``(max_len, H)``."""
    key = prefix + "pos_embedding"
    value = state_dict.get(key)
    if isinstance(value, Tensor) and value.dim() == 3 and value.shape[0] == 1:
        state_dict[key] = value[0]


class BERTEncoder(_bert.BertEncoder):
    """Token, segment and position embeddings, then ``num_layers`` encoder blocks:
    ``forward(tokens (B, T), segments (B, T), valid_lens (B,) or None) → (B, T, num_hiddens)``
    (divekit's :class:`~divekit.models.bert.BertEncoder`)."""

    def __init__(self, vocab_size: int, num_hiddens: int, norm_shape: int | Sequence[int],
                 ffn_num_input: int, ffn_num_hiddens: int, num_heads: int, num_layers: int,
                 dropout: float, max_len: int = 1000, key_size: int = 768, query_size: int = 768,
                 value_size: int = 768, **kwargs: Any):
        _no_kwargs("BERTEncoder", kwargs)
        _check_sizes("BERTEncoder", num_hiddens, norm_shape, ffn_num_input=ffn_num_input,
                     key_size=key_size, query_size=query_size, value_size=value_size)
        super().__init__(_bert_config(vocab_size, num_hiddens, ffn_num_hiddens, num_heads,
                                      num_layers, dropout, max_len))
        nn.init.normal_(self.pos_embedding, std=0.02)  # divekit's BERTModel initialises it there
        self.register_load_state_dict_pre_hook(_book_pos_embedding)

    def forward(self, tokens: Tensor, segments: Tensor,  # type: ignore[override]
                valid_lens: Tensor | None) -> Tensor:
        return super().forward(tokens, segments, valid_lens)


class MaskLM(_bert.MaskLM):
    """The masked-language-model head: ``forward(X (B, T, num_inputs), pred_positions (B, P))``
    → ``(B, P, vocab_size)`` logits (divekit's :class:`~divekit.models.bert.MaskLM`)."""

    def __init__(self, vocab_size: int, num_hiddens: int, num_inputs: int = 768, **kwargs: Any):
        _no_kwargs("MaskLM", kwargs)
        super().__init__(_bert_config(vocab_size, num_hiddens))
        if num_inputs != num_hiddens:  # the first layer reads num_inputs features
            self.mlp[0] = nn.Linear(num_inputs, num_hiddens)

    def forward(self, X: Tensor, pred_positions: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(X, pred_positions)


class NextSentencePred(_bert.NextSentencePred):
    """The next-sentence head: ``(B, num_inputs) → (B, 2)`` logits (divekit's
    :class:`~divekit.models.bert.NextSentencePred`)."""

    def __init__(self, num_inputs: int, **kwargs: Any):
        _no_kwargs("NextSentencePred", kwargs)
        super().__init__(num_inputs)


class BERTModel(_bert.BertModel):
    """BERT with both pretraining heads (divekit's :class:`~divekit.models.bert.BertModel`):
    ``forward(tokens, segments, valid_lens=None, pred_positions=None)`` returns
    ``(encoded_X (B, T, H), mlm_Y_hat (B, P, V) or None, nsp_Y_hat (B, 2))``; ``encoder``,
    ``hidden`` (the ``[CLS]`` pooler), ``mlm`` and ``nsp`` are its parts. The book's saved
    parameters load with ``load_state_dict``."""

    def __init__(self, vocab_size: int, num_hiddens: int, norm_shape: int | Sequence[int],
                 ffn_num_input: int, ffn_num_hiddens: int, num_heads: int, num_layers: int,
                 dropout: float, max_len: int = 1000, key_size: int = 768, query_size: int = 768,
                 value_size: int = 768, hid_in_features: int = 768, mlm_in_features: int = 768,
                 nsp_in_features: int = 768):
        _check_sizes("BERTModel", num_hiddens, norm_shape, ffn_num_input=ffn_num_input,
                     key_size=key_size, query_size=query_size, value_size=value_size,
                     hid_in_features=hid_in_features, mlm_in_features=mlm_in_features,
                     nsp_in_features=nsp_in_features)
        super().__init__(_bert_config(vocab_size, num_hiddens, ffn_num_hiddens, num_heads,
                                      num_layers, dropout, max_len))
        self.encoder.register_load_state_dict_pre_hook(_book_pos_embedding)

    def forward(self, tokens: Tensor, segments: Tensor,  # type: ignore[override]
                valid_lens: Tensor | None = None,
                pred_positions: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        return super().forward(tokens, segments, valid_lens, pred_positions)
