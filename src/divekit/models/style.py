"""VGG-19 as a frozen feature extractor for neural style transfer (d2l 14.12).

The network only *measures* an image: the style layers (the course's 0, 5, 10, 19, 28 —
``conv1_1`` ... ``conv5_1``) spread from bottom to top capture textures at every scale, the
content layer (25, ``conv4_4``) near the top keeps the layout. Layer indices are those of
torchvision's ``vgg19().features`` (37 layers: 16 convs, each followed by a ReLU, and 5
max-pools), whose parameter names our :func:`vgg19_features` shares, so torchvision's weight file
loads as it is.

A tapped convolution is read *after its ReLU* (``relu1_1`` ..., Gatys et al.). That is what the
course's loop gets for all but its topmost layer, since torchvision's ReLUs work in place and
overwrite the conv output it stored; here the ReLUs are not in place and the tap moves one
layer up explicitly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from divekit import weights as weight_files
from divekit.errors import DivekitError

log = logging.getLogger("divekit")

# torchvision's configuration "E": channels per conv, "M" a 2x2 max-pool
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
             512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
VGG19_URL_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's IMAGENET1K_V1 file, as cached by torch.hub
VGG19_DEPTH = 37  # layers of vgg19().features
STYLE_LAYERS = (0, 5, 10, 19, 28)
CONTENT_LAYERS = (25,)


def vgg19_features() -> nn.Sequential:
    """torchvision's ``vgg19().features`` layout (37 layers), without the 120M-parameter
    classifier; ReLUs not in place, so every layer's output stays intact for autograd."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in VGG19_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            in_channels = int(v)
    return nn.Sequential(*layers)


def _features_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``features.N.weight`` (a whole torchvision VGG-19) or ``N.weight`` (features only)."""
    if any(k.startswith("features.") for k in state):
        return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    return state


def load_vgg19_weights(features: nn.Sequential, path: str | os.PathLike[str]) -> None:
    """Load a torchvision VGG-19 weight file into ``features`` with ``weights_only=True`` (the
    file's code is never run); a mismatch is one line naming what differs."""
    path = Path(path)
    # torch.load(weights_only=True) through divekit's loader: a pickle asking for code is
    # refused before any of it runs, every failure one line naming the file
    obj = weight_files.load_state_file(path, "--weights")
    state = _features_state(obj)
    own = features.state_dict()
    missing = [k for k in own if k not in state]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or shapes:
        what = f"missing {', '.join(missing[:3])}" if missing else f"shape of {', '.join(shapes[:3])}"
        raise DivekitError(f"--weights {str(path)!r} is not a VGG-19 weight file ({what})")
    features.load_state_dict({k: state[k] for k in own})


def resolve_vgg19(weights: str | os.PathLike[str] | None) -> tuple[nn.Sequential, str]:
    """VGG-19 features and a description of their weights.

    ``weights``: a weight file; a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``),
    downloaded into the cache by :mod:`divekit.weights` (hash-checked, loaded with
    ``weights_only=True``; the only path here that uses the network); or ``None``: that cached
    file when it is there (checked the same way, never downloaded), else random weights, said
    in one warning line.
    """
    features = vgg19_features()
    if weights is not None and not Path(weights).exists() and str(weights).upper() in (
            "IMAGENET1K_V1", "DEFAULT"):
        from torchvision.models import VGG19_Weights

        state = weight_files.torchvision_state(VGG19_Weights[str(weights).upper()])  # checked, weights_only
        features.load_state_dict(_features_state(state))
        return features, f"torchvision VGG19_Weights.{str(weights).upper()}"
    if weights is not None:
        load_vgg19_weights(features, weights)
        return features, f"VGG-19 weights from {weights}"
    from torchvision.models import VGG19_Weights

    cached = VGG19_Weights.IMAGENET1K_V1
    if weight_files.is_cached(cached):  # hash checked before use, never downloaded here
        state = weight_files.torchvision_state(cached, download_missing=False)
        features.load_state_dict(_features_state(state))
        return features, f"torchvision VGG19_Weights.IMAGENET1K_V1 ({VGG19_URL_FILE}, cached)"
    log.warning("stylize: no VGG-19 weights (pass --weights PATH to torchvision's %s, or "
                "--weights IMAGENET1K_V1 to download it); running with random weights",
                VGG19_URL_FILE)
    return features, "random VGG-19 weights (no --weights given)"


def check_layers(layers: Sequence[int], depth: int, option: str) -> list[int]:
    layers = list(layers)
    if not layers:
        raise DivekitError(f"{option} must name at least one layer")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise DivekitError(f"{option}: {i!r} is not a layer index (0..{depth - 1})")
        if i >= depth:
            raise DivekitError(f"{option}: layer {i} is past the network's end "
                               f"(VGG-19 features has {depth} layers, 0..{depth - 1})")
    return layers


class StyleFeatures(nn.Module):
    """``forward(x) → (contents, styles)``: the feature maps ``(N, C_l, H_l, W_l)`` at the
    content and style layers. Frozen: no parameter requires a gradient, always in eval mode,
    and only the layers up to the topmost tap are kept (the course's truncated ``net``)."""

    def __init__(self, features: nn.Sequential, content_layers: Sequence[int] = CONTENT_LAYERS,
                 style_layers: Sequence[int] = STYLE_LAYERS):
        super().__init__()
        depth = len(features)
        self.content_layers = check_layers(content_layers, depth, "--content-layers")
        self.style_layers = check_layers(style_layers, depth, "--style-layers")

        def tap(i: int) -> int:  # a conv is read after its ReLU
            after_relu = i + 1 < depth and isinstance(features[i], nn.Conv2d) \
                and isinstance(features[i + 1], nn.ReLU)
            return i + 1 if after_relu else i

        self.content_taps = [tap(i) for i in self.content_layers]
        self.style_taps = [tap(i) for i in self.style_layers]
        top = max(self.content_taps + self.style_taps)
        self.net = features[: top + 1]
        self.net.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> StyleFeatures:
        return super().train(False)  # a measuring device: never in training mode

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        outputs: dict[int, Tensor] = {}
        wanted = set(self.content_taps) | set(self.style_taps)
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in wanted:
                outputs[i] = x
        return [outputs[i] for i in self.content_taps], [outputs[i] for i in self.style_taps]
