"""Transposed convolution (d2l 14.10) and the matrix view of convolution.

A convolution shrinks height and width; a transposed convolution grows them. With a ``h × w``
kernel ``K``, every input element scatters a scaled copy of the kernel into the output::

    Y[i·s : i·s + h, j·s : j·s + w] += X[i, j] · K          (stride s)

then ``padding`` p removes p rows and columns from each border of the result, so the output is
``(H - 1)·s + h - 2p`` high. If a convolution is the matrix product ``y = V x`` (``V`` built by
:func:`conv_matrix`), the transposed convolution is ``x' = Vᵀ y``: it maps shapes back, which is
why FCN uses it to enlarge feature maps to the input's size. :func:`bilinear_kernel` is the
course's initial kernel for that enlargement: a transposed convolution with it *is* bilinear
upsampling.

Kernels use PyTorch's layouts: ``F.conv2d`` weights are ``(C_out, C_in, h, w)``, and the same
tensor, read as ``F.conv_transpose2d`` weights, is ``(C_in', C_out', h, w)`` with the roles of
the channels swapped (that is the transpose). A 2-D kernel stands for one channel in and out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from divekit.errors import DivekitError

__all__ = ["bilinear_kernel", "conv_matrix", "trans_conv"]


def as_4d(x: Any, what: str) -> Any:
    """``x`` (a tensor or an array) as ``(N, C, H, W)``: ``(H, W)`` gains two leading axes,
    ``(C, H, W)`` one; any other rank is refused in one line naming ``what``."""
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[None]
    if x.ndim != 4:
        raise DivekitError(f"{what} must be (H, W), (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    return x


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DivekitError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _as_4d_kernel(K: Tensor) -> Tensor:
    if K.ndim == 2:
        return K[None, None]
    if K.ndim != 4:
        raise DivekitError(f"kernel must be (h, w) or 4-D (channels, channels, h, w), got {tuple(K.shape)}")
    return K


def trans_conv(X: Tensor, K: Tensor, *, stride: int = 1, padding: int = 0) -> Tensor:
    """The transposed convolution of ``X`` with ``K``, written from its definition.

    ``X``: ``(H, W)``, ``(C_in, H, W)`` or ``(N, C_in, H, W)``; ``K``: ``(h, w)`` or
    ``(C_in, C_out, h, w)`` (``F.conv_transpose2d``'s layout). Returns ``(N, C_out, H', W')``
    (``(C_out, H', W')`` for an unbatched ``X``; ``(H', W')`` when ``X`` and ``K`` are 2-D) with
    ``H' = (H - 1)·stride + h - 2·padding``; equal to
    ``F.conv_transpose2d(X, K, stride=stride, padding=padding)``.

    The course loops over input elements, ``Y[i:i+h, j:j+w] += X[i, j] · K``. Summing the same
    terms grouped by kernel element instead, ``K[a, b]`` adds ``X`` (mixed across channels by
    ``K[:, :, a, b]``) to the strided window of ``Y`` starting at ``(a, b)``: ``h·w`` tensor
    operations rather than ``H·W`` Python steps, the same sum.
    """
    _positive("stride", stride)
    _positive("padding", padding, 0)
    squeeze = X.ndim
    X = as_4d(X, "X")
    kernel_2d = K.ndim == 2
    K = _as_4d_kernel(K)
    n, c_in, H, W = X.shape
    if K.shape[0] != c_in:
        raise DivekitError(f"kernel takes {K.shape[0]} input channels but X has {c_in}")
    c_out, h, w = K.shape[1], K.shape[2], K.shape[3]
    full_h, full_w = (H - 1) * stride + h, (W - 1) * stride + w
    if full_h - 2 * padding < 1 or full_w - 2 * padding < 1:
        raise DivekitError(f"padding {padding} removes the whole {full_h}x{full_w} output")
    Y = X.new_zeros((n, c_out, full_h, full_w))
    span_h, span_w = (H - 1) * stride + 1, (W - 1) * stride + 1
    for a in range(h):
        for b in range(w):
            # (N, C_in, H, W) mixed by K[:, :, a, b] (C_in, C_out) → (N, C_out, H, W)
            contribution = torch.einsum("nihw,io->nohw", X, K[:, :, a, b])
            Y[:, :, a : a + span_h : stride, b : b + span_w : stride] += contribution
    Y = Y[:, :, padding : full_h - padding, padding : full_w - padding]
    if squeeze == 2:
        return Y[0, 0] if kernel_2d else Y[0]
    return Y[0] if squeeze == 3 else Y


def conv_matrix(K: Tensor, input_shape: tuple[int, ...], *, stride: int = 1,
                padding: int = 0) -> Tensor:
    """The matrix ``V`` with ``V @ x.flatten() == F.conv2d(x, K, stride, padding).flatten()``.

    ``K``: ``(h, w)`` or ``(C_out, C_in, h, w)``; ``input_shape``: ``(H, W)`` or ``(C_in, H, W)``.
    ``V`` is ``(C_out·H_o·W_o, C_in·H·W)``: row ``(o, y, x)`` holds the kernel's weights at the
    input positions the output pixel ``(y, x)`` of channel ``o`` reads (the course's
    ``kernel2matrix``, for any size, stride, padding and channels; positions in the zero
    padding are simply absent). Then ``V.T @ y.flatten()`` is the transposed convolution
    ``F.conv_transpose2d(y, K, stride, padding, output_padding)`` with the output padding that
    gives back ``(C_in, H, W)``.
    """
    _positive("stride", stride)
    _positive("padding", padding, 0)
    K = _as_4d_kernel(K)
    shape = tuple(input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DivekitError(f"input_shape must be (H, W) or (C, H, W) of positive sizes, got {input_shape!r}")
    c_in, H, W = shape
    c_out, k_in, h, w = K.shape
    if k_in != c_in:
        raise DivekitError(f"kernel takes {k_in} input channels but input_shape has {c_in}")
    Ho, Wo = (H + 2 * padding - h) // stride + 1, (W + 2 * padding - w) // stride + 1
    if Ho < 1 or Wo < 1:
        raise DivekitError(f"kernel {h}x{w} is larger than the padded input {H}x{W} (padding {padding})")
    # every (o, i, y, x, a, b): output pixel (y, x) reads input (y·s - p + a, x·s - p + b)
    o, i, y, x, a, b = torch.meshgrid(
        *(torch.arange(n) for n in (c_out, c_in, Ho, Wo, h, w)), indexing="ij")
    rows_in, cols_in = y * stride - padding + a, x * stride - padding + b
    inside = (rows_in >= 0) & (rows_in < H) & (cols_in >= 0) & (cols_in < W)
    row = ((o * Ho + y) * Wo + x)[inside]
    col = ((i * H + rows_in) * W + cols_in)[inside]
    V = K.new_zeros((c_out * Ho * Wo, c_in * H * W))
    V[row, col] = K[o[inside], i[inside], a[inside], b[inside]]
    return V


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> Tensor:
    """The course's bilinear-interpolation kernel ``(in_channels, out_channels, k, k)``.

    With ``factor = ⌈k / 2⌉`` and centre ``c`` (``factor - 1`` for odd ``k``, ``factor - 0.5``
    for even), ``filt[u, v] = (1 - |u - c| / factor) · (1 - |v - c| / factor)``, placed on the
    diagonal: channel ``i`` is upsampled into channel ``i`` alone. A transposed convolution with
    ``k = 2s``, stride ``s`` and padding ``s / 2`` then equals bilinear upsampling by ``s``
    (``F.interpolate(..., mode="bilinear", align_corners=False)``) away from the borders.
    """
    _positive("in_channels", in_channels)
    _positive("out_channels", out_channels)
    _positive("kernel_size", kernel_size)
    if in_channels != out_channels:
        raise DivekitError(f"a bilinear kernel maps each channel to itself: in_channels "
                           f"({in_channels}) must equal out_channels ({out_channels})")
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32)
    line = 1 - (og - center).abs() / factor  # (k,)
    filt = line[:, None] * line[None, :]  # (k, k)
    weight = torch.zeros((in_channels, out_channels, kernel_size, kernel_size))
    idx = torch.arange(in_channels)
    weight[idx, idx] = filt
    return weight
