"""Fully convolutional network (Long et al. 2015) as the course builds it (d2l 14.11).

A CNN's body keeps the spatial layout; FCN drops the classifier's global pooling and dense
layer, compresses the body's channels to the number of classes with a 1×1 convolution, and
enlarges the map back to the input's height and width with one transposed convolution,
initialised as bilinear upsampling (:func:`~divekit.ops.conv.bilinear_kernel`). A pixel's class
scores live in the channels: ``(N, 3, H, W) → body → (N, C_b, H/s, W/s) → 1×1 conv
→ (N, K, H/s, W/s) → transposed conv → (N, K, H, W)``.

For ResNet-18 the body's stride ``s`` is 32 and the transposed convolution is the course's
kernel 64, padding 16, stride 32; any other body (``backbone``: a registered classifier, whose
``features`` become the body) gets kernel ``2s``, padding ``s/2``, stride ``s`` for its own
stride, measured once on a probe input.

Inputs whose sides are not multiples of ``s`` are zero-padded on the bottom and right and the
scores cropped back, so every pixel of any image gets a score.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.errors import DivekitError
from divekit.models.layout import KeepsNCHW
from divekit.models.registry import create_model, model_info, register_model
from divekit.ops.conv import bilinear_kernel


def probe_body(body: nn.Module, in_channels: int, size: int = 64) -> tuple[int, int]:
    """The body's output channels and stride, from forward passes on ``size × size``,
    ``2size × 2size`` and ``3size × 3size`` probes. A body fits when each map is exactly the
    input over one stride ``s``; one whose map does not follow the input (a classifier
    ending in adaptive pooling, as LeNet's features do, or with unpadded convolutions) gives
    scores that cannot be laid back onto the pixels, and is refused (:class:`UnfitBody`)."""
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            p = next(body.parameters(), None)
            device = p.device if p is not None else None
            sizes = (size, 2 * size, 3 * size)
            ys = [body(torch.zeros(1, in_channels, n, n, device=device)) for n in sizes]
    finally:
        body.train(was_training)
    y = ys[0]
    if y.ndim != 4 or y.shape[-1] < 1:
        raise DivekitError(f"the body must give (N, C, H, W) maps, got {tuple(y.shape)}")
    stride = max(1, round(size / y.shape[-1]))
    if any(tuple(out.shape[-2:]) != (n // stride, n // stride) or n % stride
           for out, n in zip(ys, sizes)):
        got = ", ".join(f"{n}x{n} -> {out.shape[-2]}x{out.shape[-1]}" for out, n in zip(ys, sizes))
        raise UnfitBody(f"its maps do not follow the input size ({got})")
    return int(y.shape[1]), stride


class UnfitBody(DivekitError):
    """A body whose output map is not the input over one stride (see :func:`probe_body`)."""


def check_backbone(name: str) -> None:
    """Refuse, in one line naming the classifiers that fit, a ``--backbone`` whose features
    cannot be an FCN body; probed on the meta device (shapes only), before any run file."""
    info = model_info(name)
    if info.task != "classify":
        raise DivekitError(f"--backbone {name!r} is a {info.task} model; choose a classifier "
                           "(see `divekit models`)")
    try:
        with torch.device("meta"):
            probe_body(create_model(name, num_classes=2, in_channels=3).features, 3)
    except UnfitBody as e:
        raise DivekitError(f"--backbone {name!r} cannot be an FCN body: {e}; choose one of "
                           f"{', '.join(fitting_backbones())}") from None


def fitting_backbones() -> list[str]:
    """The registered classifiers whose ``features`` fit an FCN body, probed on the meta device
    (shapes only, no weights; a few seconds, so only when a refusal names them)."""
    from divekit.models import list_models

    names = []
    for name in list_models():
        if model_info(name).task != "classify":
            continue
        try:
            with torch.device("meta"):
                body = create_model(name, num_classes=2, in_channels=3).features
            probe_body(body, 3)
        except Exception:  # noqa: BLE001 - any failure means: not a body
            continue
        names.append(name)
    return names


class Upsampling(KeepsNCHW, nn.ConvTranspose2d):
    """The FCN's transposed convolution, kept in the contiguous (NCHW) layout on the CPU
    (:class:`~divekit.models.layout.KeepsNCHW`).

    In a model trained in channels_last this layer would store its weight and produce the
    full-resolution class scores, the network's largest tensor, in NHWC. On the CPU that costs
    more than it gains: the loss's ``log_softmax`` over the channels copies NHWC scores to NCHW
    first, the backward pass copies the resulting NCHW gradient back to NHWC for this
    convolution, and its backward converts the KxKx64x64 weight's gradient between layouts.
    Measured, one thread, crop 160x224, batch 8, 21 classes: those were half of the FCN step's
    ``aten::copy_`` time, and this layer with the loss ran 230 ms a step in NCHW against 300 ms
    in NHWC. So the weight stays NCHW, the small input ``(N, K, H/s, W/s)`` is taken to NCHW,
    and the scores and the loss are NCHW. Same parameters and ``state_dict`` as
    :class:`torch.nn.ConvTranspose2d`.
    """

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        return super().forward(self.nchw_input(x), output_size)


class FCN(nn.Module):
    """``features`` (the body) then ``head`` (``final_conv``, ``transpose_conv``): per-pixel logits."""

    def __init__(self, body: nn.Module, num_classes: int, *, in_channels: int = 3):
        super().__init__()
        body_channels, self.stride = probe_body(body, in_channels)
        s = self.stride
        self.features = body
        transpose = Upsampling(num_classes, num_classes, kernel_size=2 * s,
                               padding=s // 2, stride=s)
        with torch.no_grad():
            transpose.weight.copy_(bilinear_kernel(num_classes, num_classes, 2 * s))
            transpose.bias.zero_()
        self.head = nn.Sequential(OrderedDict(
            final_conv=nn.Conv2d(body_channels, num_classes, kernel_size=1),
            transpose_conv=transpose,
        ))
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        s = self.stride
        pad_h, pad_w = -H % s, -W % s
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        y = self.head(self.features(x))  # (N, K, H', W'), H' >= H
        return y[..., :H, :W]


def fcn(backbone: str | nn.Module = "resnet18", *, num_classes: int = 21,
        in_channels: int = 3) -> FCN:
    """An FCN on ``backbone``: a registered classifier's name (its ``features`` are the body) or
    a body module."""
    if isinstance(backbone, str):
        info = model_info(backbone)
        if info.task != "classify":
            raise DivekitError(f"--backbone {backbone!r} is a {info.task} model; choose a classifier "
                               "(see `divekit models`)")
        body = create_model(backbone, num_classes=num_classes, in_channels=in_channels).features
        try:
            return FCN(body, num_classes, in_channels=in_channels)
        except UnfitBody as e:
            raise DivekitError(f"--backbone {backbone!r} cannot be an FCN body: {e}; choose one "
                               f"of {', '.join(fitting_backbones())}") from None
    return FCN(backbone, num_classes, in_channels=in_channels)


RECIPES = {
    # the embedded scenes from scratch: mean IoU ~0.8 in about two CPU minutes (docs/dense.md)
    "shapes-seg": {"optimizer": "adam", "lr": 2e-3, "epochs": 6, "batch_size": 16},
    # the course's settings (d2l 14.11), meant for an ImageNet-trained body (--backbone-weights)
    "voc": {"optimizer": "sgd", "lr": 1e-3, "weight_decay": 1e-3, "epochs": 5, "batch_size": 32},
}


@register_model("fcn_resnet18", input_shape=(3, 320, 480), task="segment", recipes=RECIPES)
def fcn_resnet18(*, num_classes: int = 21, in_channels: int = 3,
                 backbone: str | nn.Module = "resnet18") -> FCN:
    """FCN (Long et al. 2015): ResNet-18 body, 1x1 conv to classes, 32x bilinear transposed conv."""
    return fcn(backbone, num_classes=num_classes, in_channels=in_channels)
