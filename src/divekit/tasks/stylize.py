"""Neural style transfer (Gatys et al. 2016; d2l 14.12): train the *image*, not the network.

::

    from divekit.tasks.stylize import stylize
    result = stylize("astronaut", "chelsea", out="astronaut-cat.png", steps=300)

The synthesised image ``X`` starts as the content image and is the only parameter. A frozen
VGG-19 (:class:`~divekit.models.style.StyleFeatures`) measures it; the loss is

    L = w_c · Σ_l mean((F_l(X) - F_l(C))²)                      content (layers near the top)
      + w_s · Σ_l mean((G(F_l(X)) - G(F_l(S)))²)                 style (bottom to top)
      + w_tv · ½ (mean|X[i+1, j] - X[i, j]| + mean|X[i, j+1] - X[i, j]|)   total variation

with the normalised Gram matrix ``G(Y) = Y Yᵀ / (c · hw)`` of a ``(c, hw)`` feature map. The
targets ``F_l(C)`` and ``G(F_l(S))`` are computed once, without gradients. Adam (lr 0.3) with the
rate × 0.8 every 50 steps, as the course. It is an optimisation loop over one image, so it is a
plain function, not a Trainer job.
"""

from __future__ import annotations

import glob
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from divekit.config import option
from divekit.data.segmentation import read_image_uint8
from divekit.data.vision import resize_images
from divekit.engine.device import resolve_device
from divekit.errors import DivekitError
from divekit.io import atomic_write_bytes, check_output
from divekit.models.style import (
    CONTENT_LAYERS,
    STYLE_LAYERS,
    VGG19_DEPTH,
    StyleFeatures,
    check_layers,
    resolve_vgg19,
)

RGB_MEAN = (0.485, 0.456, 0.406)  # the ImageNet statistics VGG-19 was trained with
RGB_STD = (0.229, 0.224, 0.225)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "immunohistochemistry",
          "retina", "hubble_deep_field", "coins", "moon")  # scikit-image's bundled images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- losses
def gram(Y: Tensor) -> Tensor:
    """``(N, c, h, w)`` → ``(N, c, c)``: ``Y Yᵀ / (c · hw)``, the course's normalised Gram."""
    n, c, h, w = Y.shape
    flat = Y.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def content_loss(Y_hat: Tensor, Y: Tensor) -> Tensor:
    return F.mse_loss(Y_hat, Y.detach())


def style_loss(Y_hat: Tensor, gram_Y: Tensor) -> Tensor:
    return F.mse_loss(gram(Y_hat), gram_Y.detach())


def tv_loss(Y_hat: Tensor) -> Tensor:
    """Total variation: ½ (mean |vertical differences| + mean |horizontal differences|)."""
    return 0.5 * ((Y_hat[:, :, 1:, :] - Y_hat[:, :, :-1, :]).abs().mean()
                  + (Y_hat[:, :, :, 1:] - Y_hat[:, :, :, :-1]).abs().mean())


# ----------------------------------------------------------------------------- images
def parse_size(size: int | str | Sequence[int]) -> tuple[int, int]:
    """``300x450``, ``300,450``, ``(300, 450)`` or one side for a square → ``(H, W)``."""
    if isinstance(size, str):
        parts = size.lower().replace(",", "x").split("x")
        try:
            size = [int(p) for p in parts]
        except ValueError:
            size = []
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or not all(isinstance(s, int) and 8 <= s <= 4096 for s in hw):
        raise DivekitError(f"--size must be HxW with sides in 8..4096 (e.g. 300x450), got {size!r}")
    return hw  # type: ignore[return-value]


def load_input(image: str | Path | Tensor) -> Tensor:
    """A file, an embedded photo's name (scikit-image's ``astronaut``, ``chelsea``, ...) or a
    ``(3, H, W)`` tensor in [0, 1] → ``(3, H, W)`` float in [0, 1]."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise DivekitError(f"an image tensor must be (3, H, W), got {tuple(image.shape)}")
        return image.detach().float().cpu()
    path = Path(image)
    if not path.exists() and str(image) in PHOTOS:
        import skimage.data

        photo = np.asarray(getattr(skimage.data, str(image))())
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
        return torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1).float() / 255
    if not path.exists():
        raise DivekitError(f"cannot read image {str(image)!r}: no such file (or one of the "
                           f"embedded photos: {', '.join(PHOTOS)})")
    return read_image_uint8(path).float() / 255


def preprocess(image: Tensor, size: tuple[int, int], device: torch.device) -> Tensor:
    """``(3, H, W)`` in [0, 1] → ``(1, 3, h, w)`` resized and standardised (the course's)."""
    x = resize_images(image, size)[None].to(device)
    mean = torch.tensor(RGB_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(RGB_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def postprocess(x: Tensor) -> Tensor:
    """``(1, 3, h, w)`` standardised → ``(3, h, w)`` in [0, 1] on the CPU."""
    mean = torch.tensor(RGB_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(RGB_STD, device=x.device).view(1, 3, 1, 1)
    return (x.detach() * std + mean).clamp(0, 1)[0].cpu()


def write_image(image: Tensor, path: Path) -> Path:
    """``(3, h, w)`` in [0, 1] → an image file (format from the suffix), written atomically."""
    from PIL import Image

    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    Image.fromarray(pixels).save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------- the loop
@dataclass(frozen=True)
class StylizeOptions:
    """``divekit stylize``'s options (and :func:`stylize`'s keyword arguments)."""

    size: str = option("300x450", "height x width of the result (the course's 300x450)", metavar="HxW")
    steps: int = option(500, "optimisation steps", metavar="N")
    lr: float = option(0.3, "Adam's learning rate (x 0.8 every 50 steps)")
    content_weight: float = option(1.0, "weight of the content loss")
    style_weight: float = option(1e3, "weight of the style loss")
    tv_weight: float = option(10.0, "weight of the total-variation loss")
    style_layers: str = option("0,5,10,19,28", "VGG-19 feature layers of the style loss", metavar="LIST")
    content_layers: str = option("25", "VGG-19 feature layers of the content loss", metavar="LIST")
    weights: str | None = option(
        None, "torchvision VGG-19 weight file (vgg19-dcbb9e9d.pth, loaded with weights_only=True), "
        "or IMAGENET1K_V1 to download it; default: torchvision's cached file if present, else "
        "random weights (with a warning)", metavar="PATH")
    save_every: int | None = option(None, "also write the image every K steps", metavar="K")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")


@dataclass
class StylizeResult:
    image: Tensor  # (3, H, W) in [0, 1]
    history: dict[str, list[float]]  # weighted content, style, tv and total loss per step
    weights: str  # which weights measured the image
    seconds_per_step: float
    files: dict[str, str] = field(default_factory=dict)


def _layers(value: str | Sequence[int], option: str) -> list[int]:
    if isinstance(value, str):
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise DivekitError(f"{option} must be comma-separated layer indices, got {value!r}") from None
    return [int(v) for v in value]


def _check(name: str, value: float, ok: bool) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and ok):
        raise DivekitError(f"--{name.replace('_', '-')} has a bad value {value!r}")


def stylize(content: str | Path | Tensor, style: str | Path | Tensor, *,
            size: int | str | Sequence[int] = (300, 450), steps: int = 500, lr: float = 0.3,
            content_weight: float = 1.0, style_weight: float = 1e3, tv_weight: float = 10.0,
            style_layers: str | Sequence[int] = STYLE_LAYERS,
            content_layers: str | Sequence[int] = CONTENT_LAYERS,
            weights: str | Path | None = None, save_every: int | None = None,
            out: str | Path | None = None, device: str = "auto", lr_decay_every: int = 50,
            lr_decay: float = 0.8, progress: bool = False, net: StyleFeatures | None = None,
            overwrite: bool = False) -> StylizeResult:
    """Synthesise an image with ``content``'s layout and ``style``'s textures.

    ``content``/``style``: image files, embedded photo names or ``(3, H, W)`` tensors. With
    ``out`` it writes the result, ``<out>.losses.png`` (the three weighted losses and the
    total) and, with ``save_every`` K, ``<out>.stepNNNN.png`` every K steps. ``net`` reuses a
    built extractor (its layers then win over ``style_layers``/``content_layers``). No file
    it writes is an input; one that exists is replaced only with ``overwrite``.
    """
    hw = parse_size(size)
    _check("steps", steps, isinstance(steps, int) and steps >= 1)
    _check("lr", lr, lr > 0)
    for name, w in (("content_weight", content_weight), ("style_weight", style_weight),
                    ("tv_weight", tv_weight)):
        _check(name, w, w >= 0)
    if save_every is not None:
        _check("save_every", save_every, isinstance(save_every, int) and save_every >= 1)
    content_ids = check_layers(_layers(content_layers, "--content-layers"), VGG19_DEPTH, "--content-layers")
    style_ids = check_layers(_layers(style_layers, "--style-layers"), VGG19_DEPTH, "--style-layers")
    out_path = _output_path(out, (content, style), overwrite, snapshots=bool(save_every))
    dev = resolve_device(device)
    content_img, style_img = load_input(content), load_input(style)  # errors before any work
    described = "the given extractor"
    if net is None:
        features, described = resolve_vgg19(weights)
        net = StyleFeatures(features, content_ids, style_ids)
    net = net.to(dev)

    content_x, style_x = preprocess(content_img, hw, dev), preprocess(style_img, hw, dev)
    with torch.no_grad():  # the targets: computed once, never differentiated
        contents_Y, _ = net(content_x)
        _, styles_Y = net(style_x)
        styles_Y_gram = [gram(Y) for Y in styles_Y]
    X = content_x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([X], lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, lr_decay_every, lr_decay)
    history: dict[str, list[float]] = {"content": [], "style": [], "tv": [], "total": []}
    files: dict[str, str] = {}
    t0 = time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc="stylize", unit="step", disable=not progress):
        optimizer.zero_grad(set_to_none=True)
        contents_hat, styles_hat = net(X)
        c = content_weight * sum(content_loss(a, b) for a, b in zip(contents_hat, contents_Y))
        s = style_weight * sum(style_loss(a, g) for a, g in zip(styles_hat, styles_Y_gram))
        t = tv_weight * tv_loss(X)
        total = c + s + t
        total.backward()
        optimizer.step()
        scheduler.step()
        for key, value in zip(history, torch.stack([c, s, t, total]).detach().cpu().tolist()):
            history[key].append(value)
        if not math.isfinite(history["total"][-1]):
            raise DivekitError(f"the loss became {history['total'][-1]} at step {step}; "
                               f"lower --lr (now {lr}) or the loss weights")
        if out_path is not None and save_every and step % save_every == 0 and step < steps:
            snap = out_path.with_name(f"{out_path.stem}.step{step:04d}{out_path.suffix}")
            files[f"step{step}"] = str(write_image(postprocess(X), snap))
    per_step = (time.perf_counter() - t0) / steps
    image = postprocess(X)
    if out_path is not None:
        from divekit.viz_dense import plot_loss_curves, plot_side_by_side

        files["image"] = str(write_image(image, out_path))
        files["losses"] = str(plot_loss_curves(
            history, out_path.with_name(f"{out_path.stem}.losses.png"),
            title=f"style transfer: weighted losses ({described})"))
        files["panel"] = str(plot_side_by_side(
            [resize_images(content_img, hw), resize_images(style_img, hw), image],
            ["content", "style", f"result ({steps} steps)"],
            out_path.with_name(f"{out_path.stem}.panel.png"), suptitle=described))
    return StylizeResult(image, history, described, per_step, files)


def _output_path(out: str | Path | None, inputs: Sequence[Any], overwrite: bool = False,
                 snapshots: bool = False) -> Path | None:
    """``out`` checked: an image suffix, not a folder; it and the files named after it
    (``.losses.png``, ``.panel.png``, ``.stepNNNN``) never one of the input files, and not
    existing files unless ``overwrite`` (:func:`divekit.io.check_output`)."""
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DivekitError(f"-o {str(out)!r} must end in an image suffix ({', '.join(IMAGE_SUFFIXES)})")
    if path.is_dir():
        raise DivekitError(f"-o {str(out)!r} is a folder; give a file name such as out.png")
    steps = sorted(path.parent.glob(f"{glob.escape(path.stem)}.step[0-9]*{path.suffix}")) \
        if snapshots else []
    for name in (path, path.with_name(f"{path.stem}.losses.png"),
                 path.with_name(f"{path.stem}.panel.png"), *steps):
        check_output(name, inputs, overwrite=overwrite)
    return path
