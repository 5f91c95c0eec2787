"""Attention as the course builds it (d2l chapter 11), with the course's signatures.

Every attention layer maps queries ``(B, Q, d_q)``, keys ``(B, K, d_k)`` and values
``(B, K, d_v)`` to ``(B, Q, d_v')``; ``valid_lens`` (``None``, ``(B,)`` or ``(B, Q)``) hides the
key positions at and after each length (padding), through
:func:`divekit.ops.masking.masked_softmax`.

* :class:`DotProductAttention` — scaled dot product ``softmax(q kᵀ / √d) v``. When its weights
  are not asked for (``record_weights=False``, the default) it calls
  ``torch.nn.functional.scaled_dot_product_attention``, PyTorch's fused kernel (flash /
  memory-efficient attention on GPUs); with ``record_weights=True`` it computes the weights
  explicitly and keeps them in ``attention_weights`` for heat maps, as the course's does.
* :class:`AdditiveAttention` — Bahdanau's ``w_vᵀ tanh(W_q q + W_k k)`` scoring.
* :class:`MultiHeadAttention` — ``num_heads`` scaled dot-product heads over learned projections
  of ``num_hiddens / num_heads`` features each, concatenated and projected by ``W_o``; the
  course's ``transpose_qkv`` / ``transpose_output`` reshapes.
* :class:`PositionalEncoding` — the sinusoidal encoding added to the inputs, then dropout.

Where the course differs: it marks masked scores with ``-1e6``; here they get exactly zero
weight, and a query with no valid key at all (length 0) attends to nothing (zero output)
instead of averaging over padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.errors import DivekitError
from divekit.ops.masking import masked_softmax


def _linear(in_features: int | None, out_features: int, bias: bool) -> nn.Module:
    """``nn.Linear``, or ``nn.LazyLinear`` (the course's choice) when the input size is unknown."""
    if in_features is None:
        return nn.LazyLinear(out_features, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


def _key_mask(valid_lens: Tensor, batch: int, queries: int, keys: int) -> Tensor:
    """``(B, Q, K)`` boolean mask, True where a key may be attended to."""
    if valid_lens.shape not in ((batch,), (batch, queries)):
        raise DivekitError(
            f"valid_lens must have shape ({batch},) or ({batch}, {queries}), got {tuple(valid_lens.shape)}"
        )
    if valid_lens.dim() == 1:
        valid_lens = valid_lens[:, None].expand(batch, queries)
    return torch.arange(keys, device=valid_lens.device) < valid_lens[..., None]


class DotProductAttention(nn.Module):
    """Scaled dot-product attention: ``(B, Q, d), (B, K, d), (B, K, v) → (B, Q, v)``."""

    def __init__(self, dropout: float = 0.0, record_weights: bool = False):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.record_weights = record_weights
        self.attention_weights: Tensor | None = None

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor,
                valid_lens: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        """``mask`` (instead of ``valid_lens``): a boolean mask broadcastable to the scores
        ``(B, [heads,] Q, K)``, True where a key may be attended to, with at least one True
        key per query; a decoder builds it once per source rather than at every step."""
        d = queries.shape[-1]
        if keys.shape[-1] != d or keys.shape[-2] != values.shape[-2]:
            raise DivekitError(
                f"queries {tuple(queries.shape)}, keys {tuple(keys.shape)} and values "
                f"{tuple(values.shape)} do not fit: keys need the queries' feature size and the "
                "values' length"
            )
        if mask is not None and valid_lens is not None:
            raise DivekitError("give valid_lens or mask, not both")
        empty_row = valid_lens is not None and bool((valid_lens == 0).any())
        if not self.record_weights and not empty_row:
            if valid_lens is not None:
                b, q, k = queries.shape[0], queries.shape[-2], keys.shape[-2]
                mask = _key_mask(valid_lens, b, q, k)
                if queries.dim() == 4:  # (B, heads, Q, d): one mask for every head
                    mask = mask.unsqueeze(1)
            p = self.dropout.p if self.training else 0.0
            self.attention_weights = None
            return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=p)
        scores = queries @ keys.transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        else:
            if scores.dim() == 4 and valid_lens is not None and valid_lens.dim() == 2:
                valid_lens = valid_lens[:, None, :].expand(scores.shape[:3])  # same for each head
            weights = masked_softmax(scores, valid_lens)  # (B, [heads,] Q, K)
        self.attention_weights = weights.detach() if self.record_weights else None
        return self.dropout(weights) @ values


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention: score ``w_vᵀ tanh(W_q q + W_k k)``.

    ``key_size`` / ``query_size`` may be left ``None`` for lazily sized projections (the course's
    ``LazyLinear``)."""

    def __init__(self, num_hiddens: int, dropout: float = 0.0, *, key_size: int | None = None,
                 query_size: int | None = None, record_weights: bool = True):
        super().__init__()
        self.W_k = _linear(key_size, num_hiddens, bias=False)
        self.W_q = _linear(query_size, num_hiddens, bias=False)
        self.w_v = nn.Linear(num_hiddens, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.record_weights = record_weights
        self.attention_weights: Tensor | None = None

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor,
                valid_lens: Tensor | None = None) -> Tensor:
        return self.attend(queries, self.project_keys(keys), values, valid_lens)

    def project_keys(self, keys: Tensor) -> Tensor:
        """``W_k k``: ``(B, K, d_k) → (B, K, h)``; a decoder computes it once per source."""
        return self.W_k(keys)

    def attend(self, queries: Tensor, projected_keys: Tensor, values: Tensor,
               valid_lens: Tensor | None = None) -> Tensor:
        """Attention with keys already projected by :meth:`project_keys`."""
        q, k = self.W_q(queries), projected_keys  # (B, Q, h), (B, K, h)
        features = torch.tanh(q.unsqueeze(2) + k.unsqueeze(1))  # (B, Q, K, h)
        scores = self.w_v(features).squeeze(-1)  # (B, Q, K)
        weights = masked_softmax(scores, valid_lens)
        self.attention_weights = weights.detach() if self.record_weights else None
        return self.dropout(weights) @ values


class MultiHeadAttention(nn.Module):
    """Multi-head attention: ``(B, Q, d_q), (B, K, d_k), (B, K, d_v) → (B, Q, num_hiddens)``.

    ``num_hiddens`` must divide by ``num_heads``; each head attends over
    ``num_hiddens / num_heads`` projected features. ``bias=False`` as the course (and
    ``nn.MultiheadAttention(bias=False)``, which this equals given the same weights).
    """

    def __init__(self, num_hiddens: int, num_heads: int, dropout: float = 0.0, bias: bool = False, *,
                 query_size: int | None = None, key_size: int | None = None,
                 value_size: int | None = None, record_weights: bool = False):
        super().__init__()
        if num_heads < 1 or num_hiddens % num_heads:
            raise DivekitError(f"num_hiddens {num_hiddens} must be a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.attention = DotProductAttention(dropout, record_weights=record_weights)
        self.W_q = _linear(query_size, num_hiddens, bias)
        self.W_k = _linear(key_size, num_hiddens, bias)
        self.W_v = _linear(value_size, num_hiddens, bias)
        self.W_o = _linear(num_hiddens, num_hiddens, bias)

    @property
    def attention_weights(self) -> Tensor | None:
        """``(B, heads, Q, K)`` weights of the last call, when ``record_weights`` is on."""
        return self.attention.attention_weights

    def transpose_qkv(self, X: Tensor) -> Tensor:
        """``(B, T, num_hiddens) → (B, heads, T, num_hiddens / heads)``."""
        b, t, _ = X.shape
        return X.reshape(b, t, self.num_heads, -1).transpose(1, 2)

    def transpose_output(self, X: Tensor) -> Tensor:
        """``(B, heads, T, d) → (B, T, heads · d)``: the inverse of :meth:`transpose_qkv`."""
        b, h, t, d = X.shape
        return X.transpose(1, 2).reshape(b, t, h * d)

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor,
                valid_lens: Tensor | None = None) -> Tensor:
        return self.attend(queries, *self.project_kv(keys, values), valid_lens)

    def project_kv(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values projected and split into heads, ``(B, heads, K, num_hiddens / heads)``
        each: what a key/value cache keeps, so each position is projected once."""
        return self.transpose_qkv(self.W_k(keys)), self.transpose_qkv(self.W_v(values))

    def attend(self, queries: Tensor, k: Tensor, v: Tensor,
               valid_lens: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        """Multi-head attention of ``queries (B, Q, d_q)`` over keys and values already
        projected by :meth:`project_kv`: ``(B, Q, num_hiddens)``. ``mask``: see
        :meth:`DotProductAttention.forward` (``(B, 1, 1 or Q, K)`` for every head)."""
        q = self.transpose_qkv(self.W_q(queries))  # (B, heads, Q, d)
        out = self.attention(q, k, v, valid_lens, mask=mask)  # (B, heads, Q, d)
        return self.W_o(self.transpose_output(out))


class PositionalEncoding(nn.Module):
    """Adds the sinusoidal encoding ``P[i, 2j] = sin(i / 10000^(2j/d))``,
    ``P[i, 2j+1] = cos(i / 10000^(2j/d))`` to ``(B, T, d)`` inputs, then dropout.

    ``forward(X, offset)`` encodes positions ``offset … offset + T - 1``: a decoder fed one
    token at a time passes the number of positions it has already decoded."""

    def __init__(self, num_hiddens: int, dropout: float = 0.0, max_len: int = 1000):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.pow(10000, torch.arange(0, num_hiddens, 2, dtype=torch.float32) / num_hiddens)
        P = torch.zeros(1, max_len, num_hiddens)
        P[:, :, 0::2] = torch.sin(position / freq)
        P[:, :, 1::2] = torch.cos(position / freq[: num_hiddens // 2])
        self.register_buffer("P", P, persistent=False)

    def forward(self, X: Tensor, offset: int = 0) -> Tensor:
        t = X.shape[1]
        if offset < 0 or offset + t > self.P.shape[1]:
            raise DivekitError(f"positions {offset}..{offset + t - 1} (a sequence of {t} steps "
                               f"after {offset}) are longer than max_len {self.P.shape[1]}")
        return F.dropout(X + self.P[:, offset:offset + t].to(X.dtype), self.dropout.p, self.training)


# the course's first attention model lives beside the layers (divekit.models.kernel_regression)
from divekit.models.kernel_regression import (  # noqa: E402
    NWKernelRegression,
    average_pooling,
    gaussian_kernel_weights,
    kernel_regression,
    nadaraya_watson,
)

__all__ = ["AdditiveAttention", "DotProductAttention", "MultiHeadAttention", "NWKernelRegression",
           "PositionalEncoding", "average_pooling", "gaussian_kernel_weights",
           "kernel_regression", "nadaraya_watson"]
