"""Region-of-interest max pooling, the Fast R-CNN layer (d2l 14.8).

Each region of interest is cut into an ``m × n`` grid and every cell gives its maximum, so regions
of any size come out ``m × n``. The rounding is that of ``torchvision.ops.roi_pool``'s kernel, so
the two agree exactly:

* region corners are scaled by ``spatial_scale`` and rounded half away from zero (C's
  ``round``), giving ``start`` and ``end``; the region spans ``max(end - start + 1, 1)`` cells;
* with ``bin = span / pooled``, cell ``p`` covers ``[floor(p·bin), ceil((p + 1)·bin))`` after
  ``start``, clipped to the feature map; an empty cell is 0;
* the maximum starts from ``-FLT_MAX`` and skips NaN, as the kernel's ``if (x > max)`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from divekit.errors import DivekitError
from divekit.ops.boxes import validate_boxes

__all__ = ["roi_pool"]

_FLT_MAX = torch.finfo(torch.float32).max  # the kernel's -FLT_MAX start, whatever the dtype


def _round_half_away(x: Tensor) -> Tensor:
    """C's ``round``: halves go away from zero (``torch.round`` sends them to even)."""
    trunc = torch.trunc(x)
    is_half = (x - trunc).abs() == 0.5
    return torch.where(is_half, trunc + torch.sign(x), torch.round(x)).long()


def _as_rois(boxes: Tensor | Sequence[Tensor], input: Tensor) -> Tensor:
    """``(K, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` from either accepted box layout."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise DivekitError(
                f"boxes must have shape (K, 5) [batch_index, x1, y1, x2, y2] or be a list of (Ki, 4) "
                f"tensors, got {tuple(boxes.shape)}"
            )
        rois = boxes
    elif isinstance(boxes, list | tuple):
        if not boxes:
            raise DivekitError("boxes is an empty list; give one (Ki, 4) tensor per image")
        parts = []
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise DivekitError(
                    f"boxes[{i}] must have shape (Ki, 4) [x1, y1, x2, y2], got {shape}"
                )
            index = torch.full_like(b[:, :1], i, dtype=input.dtype, device=input.device)
            parts.append(torch.cat((index, b.to(device=input.device, dtype=input.dtype)), dim=1))
        rois = torch.cat(parts)
    else:
        raise DivekitError(
            f"boxes must be a (K, 5) tensor or a list of (Ki, 4) tensors, got {type(boxes).__name__}"
        )
    rois = rois.to(device=input.device, dtype=input.dtype)
    batch_index = rois[:, 0]
    bad = (
        (batch_index != torch.round(batch_index))
        | (batch_index < 0)
        | (batch_index >= input.shape[0])
    )
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise DivekitError(
            f"boxes[{k}] has batch index {float(batch_index[k]):g}; expected a whole number in "
            f"0..{input.shape[0] - 1}"
        )
    validate_boxes(rois[:, 1:], "boxes")
    return rois


def _cell_edges(
    start: Tensor, span: Tensor, pooled: int, limit: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Cell bounds along one axis for every region: ``(K,)`` starts and spans -> ``(K, pooled)`` x2."""
    bin_size = span.to(dtype) / torch.tensor(pooled, dtype=dtype, device=span.device)  # (K,)
    p = torch.arange(pooled, dtype=dtype, device=span.device)  # (pooled,)
    lo = torch.floor(p * bin_size[:, None]).long() + start[:, None]
    hi = torch.ceil((p + 1) * bin_size[:, None]).long() + start[:, None]
    return lo.clamp(0, limit), hi.clamp(0, limit)


def roi_pool(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """RoI max pooling: features ``(N, C, H, W)`` and regions -> ``(K, C, out_h, out_w)``.

    ``boxes`` is a ``(K, 5)`` tensor of rows ``[batch_index, x1, y1, x2, y2]`` or a list of
    ``(Ki, 4)`` corner boxes, one tensor per image, in input-image coordinates;
    ``spatial_scale`` maps them onto the feature map (e.g. 1/16 after four halvings). Equal to
    ``torchvision.ops.roi_pool``. Differentiable through the maxima.
    """
    if not isinstance(input, Tensor) or input.dim() != 4 or not input.is_floating_point():
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise DivekitError(f"input must be a floating-point (N, C, H, W) tensor, got {shape}")
    out_h, out_w = (
        (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    )
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in (out_h, out_w)):
        raise DivekitError(
            f"output_size must be a positive int or (height, width), got {output_size!r}"
        )
    if (
        isinstance(spatial_scale, bool)
        or not isinstance(spatial_scale, int | float)
        or not spatial_scale > 0
    ):
        raise DivekitError(f"spatial_scale must be a positive number, got {spatial_scale!r}")
    rois = _as_rois(boxes, input)
    _, channels, height, width = input.shape
    num_rois = rois.shape[0]
    if num_rois == 0:
        return input.new_zeros(num_rois, channels, out_h, out_w)

    # Coordinates in the input's precision, as the kernel's T (float for half types).
    dtype = input.dtype if input.dtype == torch.float64 else torch.float32
    corners = rois[:, 1:].to(dtype) * torch.tensor(spatial_scale, dtype=dtype, device=input.device)
    start, end = _round_half_away(corners[:, :2]), _round_half_away(corners[:, 2:])  # (K, 2) [x, y]
    span = (end - start + 1).clamp(min=1)  # malformed regions become 1 x 1
    h_lo, h_hi = _cell_edges(start[:, 1], span[:, 1], out_h, height, dtype)  # (K, out_h)
    w_lo, w_hi = _cell_edges(start[:, 0], span[:, 0], out_w, width, dtype)  # (K, out_w)

    # Gather every cell as a window of the largest cell's size, masking what lies outside it.
    win_h = max(int((h_hi - h_lo).max()), 1)
    win_w = max(int((w_hi - w_lo).max()), 1)
    ys = h_lo[..., None] + torch.arange(win_h, device=input.device)  # (K, out_h, win_h)
    xs = w_lo[..., None] + torch.arange(win_w, device=input.device)  # (K, out_w, win_w)
    inside_y, inside_x = ys < h_hi[..., None], xs < w_hi[..., None]
    ys, xs = ys.clamp(max=height - 1), xs.clamp(max=width - 1)
    image = rois[:, 0].long()
    features = input.permute(0, 2, 3, 1)  # (N, H, W, C): a cell's values for all channels at once
    values = features[
        image[:, None, None, None, None],
        ys[:, :, None, :, None],
        xs[:, None, :, None, :],
    ]  # (K, out_h, out_w, win_h, win_w, C)
    inside = (
        inside_y[:, :, None, :, None] & inside_x[:, None, :, None, :]
    )  # (K, out_h, out_w, win_h, win_w)
    values = values.masked_fill(~inside[..., None] | values.isnan(), float("-inf"))
    pooled = values.amax(dim=(3, 4)).clamp(min=-_FLT_MAX)  # (K, out_h, out_w, C)
    empty = (h_hi <= h_lo)[:, :, None] | (w_hi <= w_lo)[:, None, :]  # (K, out_h, out_w)
    pooled = pooled.masked_fill(empty[..., None], 0.0)
    return pooled.permute(0, 3, 1, 2).contiguous()  # (K, C, out_h, out_w)
