"""Convolution as a matrix product (im2col), the way a systolic array runs it.

For an input (B, C_in, H, W) and a weight (C_out, C_in/g, kh, kw) with stride s, padding p,
dilation d and g groups, PyTorch's output size is

    H_out = floor((H + 2·p_h - d_h·(kh - 1) - 1) / s_h) + 1      (and likewise W_out)

im2col gathers, for every output pixel, the input window it reads into one row, so each group
becomes the product

    (M × K) · (K × N),   M = B·H_out·W_out,  K = (C_in/g)·kh·kw,  N = C_out/g

and the g groups are g independent products (a depthwise convolution, g = C_in, is C_in products
with K = kh·kw and N = C_out/C_in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from divekit.errors import DivekitError

Pair = tuple[int, int]


@dataclass(frozen=True)
class GemmShape:
    """``groups`` independent products ``(M×K)·(K×N)``."""

    m: int
    n: int
    k: int
    groups: int = 1

    @property
    def macs(self) -> int:
        return self.groups * self.m * self.n * self.k

    def __str__(self) -> str:
        g = f"{self.groups}x " if self.groups > 1 else ""
        return f"{g}{self.m}x{self.k}·{self.k}x{self.n}"


def pair(v: int | tuple[int, ...]) -> Pair:
    """``3`` → ``(3, 3)``; ``(3, 1)`` → ``(3, 1)``."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                     dilation: int = 1) -> int:
    """PyTorch's ``floor((size + 2p - d(k-1) - 1)/s) + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def im2col(x: torch.Tensor, kernel: Pair, stride: Pair = (1, 1), padding: Pair = (0, 0),
           dilation: Pair = (1, 1)) -> torch.Tensor:
    """(B, C, H, W) → (B·H_out·W_out, C·kh·kw): one row per output pixel, columns ordered
    (channel, kernel row, kernel column) like a flattened ``conv2d`` weight."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho = conv_output_size(h, kh, sh, ph, dh)
    wo = conv_output_size(w, kw, sw, pw, dw)
    if ho <= 0 or wo <= 0:
        raise DivekitError(f"a {kh}x{kw} kernel (dilation {dh},{dw}) does not fit a "
                           f"{h}x{w} input with padding {ph},{pw}")
    xp = F.pad(x, (pw, pw, ph, ph))  # (B, C, H+2ph, W+2pw)
    patches = [
        xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
        for i in range(kh) for j in range(kw)
    ]  # kh·kw tensors of (B, C, Ho, Wo)
    cols = torch.stack(patches, dim=2)  # (B, C, kh·kw, Ho, Wo)
    return cols.reshape(b, c * kh * kw, ho * wo).transpose(1, 2).reshape(b * ho * wo, -1)


def conv2d_gemm_shape(in_shape: tuple[int, int, int, int], out_channels: int, kernel: Pair,
                      stride: Pair = (1, 1), padding: Pair = (0, 0), dilation: Pair = (1, 1),
                      groups: int = 1) -> GemmShape:
    """The products a conv2d lowers to (formulas: module docstring)."""
    b, c, h, w = in_shape
    ho = conv_output_size(h, kernel[0], stride[0], padding[0], dilation[0])
    wo = conv_output_size(w, kernel[1], stride[1], padding[1], dilation[1])
    return GemmShape(m=b * ho * wo, n=out_channels // groups,
                     k=(c // groups) * kernel[0] * kernel[1], groups=groups)


Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def conv2d_im2col(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride: int | Pair = 1, padding: int | Pair = 0, dilation: int | Pair = 1,
                  groups: int = 1, matmul: Matmul = torch.matmul) -> torch.Tensor:
    """``F.conv2d`` computed as ``groups`` im2col products, each by ``matmul`` (the systolic
    simulator, or ``torch.matmul``). x (B, C_in, H, W), weight (C_out, C_in/g, kh, kw)."""
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    b, c, _, _ = x.shape
    c_out, c_g, kh, kw = weight.shape
    if c % groups or c_out % groups or c // groups != c_g:
        raise DivekitError(f"groups={groups} does not divide input channels {c} and output "
                           f"channels {c_out} (weight expects {c_g} per group)")
    n_g = c_out // groups
    outs = []
    for g in range(groups):
        cols = im2col(x[:, g * c_g:(g + 1) * c_g], (kh, kw), stride, padding, dilation)  # (M, K)
        w_g = weight[g * n_g:(g + 1) * n_g].reshape(n_g, -1).T  # (K, N)
        outs.append(matmul(cols, w_g))  # (M, N)
    ho = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    y = torch.cat(outs, dim=1).reshape(b, ho, wo, c_out).permute(0, 3, 1, 2)  # (B, C_out, Ho, Wo)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.contiguous()
