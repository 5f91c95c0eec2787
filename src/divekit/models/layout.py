"""Layers that stay in the contiguous (NCHW) memory layout on the CPU inside a channels_last model.

The Trainer stores a convolutional model in channels_last (NHWC): oneDNN's convolutions run
faster on NHWC activations, most of all where the maps are large. It is not a gain
everywhere, and the step pays for the layout in copies (``aten::copy_`` in a profile):

* every NHWC convolution weight is converted twice a step on the CPU: the convolution's
  backward computes the weight's gradient in NCHW and copies it to NHWC (``aten::to`` inside
  ``convolution_backward``), and the fused SGD kernel, which walks a tensor as one flat
  buffer, copies each NHWC gradient to NCHW (``aten::contiguous`` inside ``_fused_sgd_``).
  The cost follows the weights, not the batch: ResNet-18's 11 M weights cost about 20 ms a
  step, which is why a tiny batch (4 images) trains 15% slower in NHWC;
* a layer's NHWC output feeding an op that needs NCHW (a softmax over the channels) is
  copied, and the gradient coming back is copied again.

A module built with :class:`KeepsNCHW` keeps its 4-D weights contiguous through
``model.to(memory_format=torch.channels_last)`` on the CPU, and its ``forward`` takes the
input to NCHW (:meth:`KeepsNCHW.nchw_input`), so the layer runs as in a plain NCHW model
while the rest of the network stays NHWC. It is chosen per layer from measurements, one
thread, medians of interleaved rounds on this project's 2-core CPU (see the classes that use
it: :class:`divekit.models.resnet.Residual` with 512 channels, the FCN's
:class:`divekit.models.fcn.Upsampling`).

Why at conversion time and not per call: the layout of a weight must be settled before the
optimizer keeps state for it. ``torch.optim.SGD(fused=True)`` reads a parameter, its gradient
and its momentum as flat buffers in memory order, so a momentum buffer in another layout than
its weight gives wrong updates, silently. Weights keep their layout from then on, so their
gradients and every state the optimizer makes from them share it.

On CUDA nothing changes: cuDNN prefers NHWC throughout (tensor cores), and the measurements
above are the CPU's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def nchw_strides(t: Tensor) -> tuple[int, ...]:
    """The strides of ``t``'s shape laid out NCHW. Compared in full, not with
    ``is_contiguous()``: that ignores the strides of size-1 dimensions, so a 1x1 convolution's
    NHWC weight passes as contiguous, and oneDNN, which reads the strides, would still take it
    (and the layer's input and output) as NHWC."""
    strides, n = [], 1
    for size in reversed(t.shape):
        strides.append(n)
        n *= size
    return tuple(reversed(strides))


class KeepsNCHW(nn.Module):
    """Mixin (before the ``nn.Module`` class): 4-D weights stay contiguous on the CPU.

    ``_apply`` is the hook every ``Module.to``/``cpu``/``cuda``/``half`` goes through; after
    the conversion the module's 4-D parameters (its submodules' included) on the CPU are made
    contiguous again, in place of their ``.data``: the ``Parameter`` objects, their names and
    the ``state_dict`` are unchanged, only the memory order differs. A subclass that keeps
    NCHW only in some configurations sets ``keeps_nchw`` (an instance attribute) to False in
    the others, where the module then behaves as a plain one.
    """

    keeps_nchw: bool = True

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        module = super()._apply(fn, *args, **kwargs)
        if self.keeps_nchw:
            for p in self.parameters():
                if p.dim() == 4 and p.device.type == "cpu" and p.stride() != nchw_strides(p):
                    p.data = p.data.clone(memory_format=torch.contiguous_format)
        return module

    def nchw_input(self, x: Tensor) -> Tensor:
        """``x`` in NCHW where this module keeps NCHW weights (an NHWC input would make oneDNN
        convert them back to NHWC on every call); ``x`` itself otherwise (on CUDA too)."""
        if not self.keeps_nchw or x.device.type != "cpu" or x.stride() == nchw_strides(x):
            return x
        return x.clone(memory_format=torch.contiguous_format)
