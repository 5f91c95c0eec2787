"""Masks for variable-length sequences (d2l 10.7, 11.3): ``sequence_mask`` and ``masked_softmax``,
and the additive ``key_padding_mask`` that BERT's fused attention takes.

A minibatch of sentences is padded to a common length ``T``; ``valid_len[b]`` says how many of row
``b``'s positions are real. Both functions take the course's arguments and are vectorised: the mask
is one comparison ``arange(T) < valid_len[:, None]``, never a loop over the batch.

Differences from the course, on purpose:

* ``sequence_mask`` returns a new tensor; the course's writes into ``X`` in place.
* ``masked_softmax`` gives masked positions probability exactly 0 (the course fills their scores
  with ``-1e6``, which leaves them ``exp(-1e6 - max)``: 0 in practice, but not by construction).
* A row with valid length 0 (nothing to attend to) gets all-zero weights, so an attention output
  there is the zero vector. The course's ``-1e6`` trick makes such a row uniform, ``1 / K``, which
  attends to padding. Neither choice gives NaN, in the forward or the backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from divekit.errors import DivekitError

__all__ = ["key_padding_mask", "length_mask", "masked_softmax", "sequence_mask"]


def _as_lengths(valid_len: Tensor | Sequence[float], name: str, device: torch.device) -> Tensor:
    """``valid_len`` as a real tensor on ``device``; a ``DivekitError`` for anything else."""
    if not isinstance(valid_len, Tensor):
        try:
            valid_len = torch.as_tensor(valid_len)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DivekitError(
                f"{name} must be a tensor of lengths, got {type(valid_len).__name__}"
            ) from err
    if valid_len.dtype == torch.bool or valid_len.is_complex():
        raise DivekitError(f"{name} must hold integer or real lengths, got dtype {valid_len.dtype}")
    return valid_len.to(device)


def _check_nonnegative(lengths: Tensor, name: str) -> int | float:
    """The smallest length (one device sync); a ``DivekitError`` when it is negative or NaN."""
    if lengths.numel() == 0:
        return 0
    smallest = lengths.min().item()
    if not smallest >= 0:  # also catches NaN
        raise DivekitError(f"{name} must be >= 0, got a length of {smallest}")
    return smallest


def length_mask(lengths: Tensor, size: int) -> Tensor:
    """``lengths (...)`` -> bool mask ``(..., size)``, on ``lengths``'s device: position ``t``
    is kept (True) when ``t < length``. One comparison, no loop and no device sync."""
    return torch.arange(size, device=lengths.device) < lengths.unsqueeze(-1)


def key_padding_mask(valid_lens: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """The additive attention mask ``(B, 1, 1, size)`` of a padded batch, for
    ``scaled_dot_product_attention``'s ``attn_mask``: 0 at keys ``t < valid_lens[b]``, the
    dtype's most negative number at padding.

    One row per sequence that broadcasts over heads and queries: a ``(B, heads, T, T)`` mask is
    never materialised. A finite minimum (not ``-inf``) keeps a length-0 row finite. Built from
    tensor operations only (no Python branch on the lengths' values), so ``torch.export`` and
    ``torch.compile`` trace it with the lengths as a graph input, and the meta device
    (``--batch-size auto``'s memory estimate) sees the same shapes as a real run."""
    keep = length_mask(valid_lens, size)  # (B, T)
    mask = torch.zeros(keep.shape, dtype=dtype, device=valid_lens.device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]  # (B, 1, 1, T)


def sequence_mask(X: Tensor, valid_len: Tensor, value: float = 0.0) -> Tensor:
    """Set the padding of each sequence to ``value``: ``X[b, t, ...] = value`` for ``t >= valid_len[b]``.

    ``X`` is ``(B, T)`` or ``(B, T, ...)`` (any device and dtype); ``valid_len`` is ``(B,)``,
    integer or real (as in the course, position ``t`` is kept when ``t < valid_len[b]``; lengths
    above ``T`` keep the whole row). Returns a new tensor of ``X``'s shape, dtype and device;
    unlike the course's version, ``X`` itself is left untouched.
    """
    if not isinstance(X, Tensor) or X.dim() < 2:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise DivekitError(f"X must be a tensor of shape (B, T) or (B, T, ...), got {shape}")
    lengths = _as_lengths(valid_len, "valid_len", X.device)
    if lengths.shape != X.shape[:1]:
        raise DivekitError(
            f"valid_len must have shape ({X.shape[0]},), one length per row of X "
            f"{tuple(X.shape)}, got {tuple(lengths.shape)}"
        )
    _check_nonnegative(lengths, "valid_len")
    keep = length_mask(lengths, X.shape[1])  # (B, T)
    keep = keep.reshape(keep.shape + (1,) * (X.dim() - 2))  # (B, T, 1, ...)
    return X.masked_fill(~keep, value)


def masked_softmax(X: Tensor, valid_lens: Tensor | None) -> Tensor:
    """Softmax over the last axis of scores ``X (B, Q, K)``, ignoring keys past each valid length.

    ``valid_lens`` is ``None`` (plain softmax), ``(B,)`` (one length for all ``Q`` queries of a
    batch element, the course's usual case) or ``(B, Q)`` (a length per query). More generally
    ``X`` may be ``(B, ..., K)`` with ``valid_lens`` ``(B,)`` or ``X.shape[:-1]``.

    Returns attention weights of ``X``'s shape: in row ``(b, q)`` the first ``valid_len`` keys
    share probability 1 and the others get exactly 0 (their scores are replaced with ``-inf``,
    so padding never leaks in, even NaN padding). A row with valid length 0 is all zeros (the
    course's version makes it uniform); it is never NaN, in the forward or the backward pass.
    Differentiable; under autocast the softmax runs at the precision autocast picks for it.
    """
    if not isinstance(X, Tensor) or X.dim() < 2:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise DivekitError(f"X must be a tensor of scores (B, Q, K), got {shape}")
    if not X.is_floating_point():
        raise DivekitError(f"X must hold floating-point scores, got dtype {X.dtype}")
    if valid_lens is None:
        return F.softmax(X, dim=-1)
    lengths = _as_lengths(valid_lens, "valid_lens", X.device)
    if lengths.shape == X.shape[:1]:
        lengths = lengths.reshape(lengths.shape + (1,) * (X.dim() - 2))  # (B, 1, ...)
    elif lengths.shape != X.shape[:-1]:
        raise DivekitError(
            f"valid_lens must have shape ({X.shape[0]},) or {tuple(X.shape[:-1])} for scores "
            f"{tuple(X.shape)}, got {tuple(lengths.shape)}"
        )
    smallest = _check_nonnegative(lengths, "valid_lens")
    keep = length_mask(lengths, X.shape[-1])  # (B, 1 or Q, K)
    # exp(-inf) is exactly 0: masked keys get no weight, whatever their (padding) scores were.
    scores = X.masked_fill(~keep, float("-inf"))
    if smallest > 0:
        return F.softmax(scores, dim=-1)
    # A row with nothing valid would be all -inf, i.e. NaN. Give it finite scores (0) so the
    # softmax and its backward stay finite, then zero its weights (so its gradient is zero too).
    empty = (lengths <= 0).unsqueeze(-1)  # (B, 1 or Q, 1)
    weights = F.softmax(scores.masked_fill(empty, 0.0), dim=-1)
    return weights.masked_fill(~keep, 0.0)
