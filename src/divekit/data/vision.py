"""Image-classification datasets, decoded and resized once into in-memory tensors.

``digits`` is scikit-learn's bundled 8×8 handwritten digits (no files needed); ``mnist`` and
``fashion-mnist`` read the four official IDX files from ``--data-dir`` or the cache, or download
them with ``--download``. Every loader returns an :class:`ImageClassificationData` whose images
are ``(N, C, H, W)`` float32 in [0, 1]. :func:`resize_images` and :func:`load_image_file` are the
one path from pixels to model input, shared by training and by ``divekit predict``
(:func:`load_image_batch` for a classifier's batch of files).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from divekit import hub
from divekit.data.idx import read_idx_pair
from divekit.data.registry import register_dataset
from divekit.errors import DivekitError

Size = int | tuple[int, int]

# The course's get_fashion_mnist_labels.
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_RESIZE_BUDGET = 1 << 24  # output elements per interpolate call, to bound peak memory


@dataclass
class ImageClassificationData:
    """Train and validation images ``(N, C, H, W)`` float32 in [0, 1] with int64 labels."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    classes: list[str]
    name: str
    mean: tuple[float, ...]  # per channel, over the training images
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------- pixels


def _as_size(size: Size) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s >= 1 for s in hw):
        raise DivekitError(f"image size must be a positive int or (height, width), got {size!r}")
    return hw  # type: ignore[return-value]


def resize_images(x: Tensor, size: Size) -> Tensor:
    """Resize ``(N, C, H, W)`` (or one ``(C, H, W)``) images to ``size``: bilinear, antialiased.

    uint8 input is scaled to [0, 1] first; the result is float32 in [0, 1]. Work is done in
    chunks, each written into the preallocated result (and each chunk of uint8 input scaled
    on its own), so that resizing 60,000 images holds the result and a few tens of MB more:
    not a float copy of the input, nor the resized chunks and their concatenation side by side
    (two copies of the result, 4.4 GB for MNIST at 96×96).
    """
    hw = _as_size(size)
    if x.ndim == 3:
        return resize_images(x[None], hw)[0]
    if x.ndim != 4:
        raise DivekitError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")

    def as_float(part: Tensor) -> Tensor:
        return part.float().div_(255) if part.dtype == torch.uint8 else part.float()

    if tuple(x.shape[-2:]) == hw:
        return as_float(x)
    chunk = max(1, _RESIZE_BUDGET // (x.shape[1] * hw[0] * hw[1]))
    out = x.new_empty((len(x), x.shape[1], *hw), dtype=torch.float32)
    for i in range(0, len(x), chunk):
        out[i : i + chunk] = F.interpolate(as_float(x[i : i + chunk]), size=hw, mode="bilinear",
                                           align_corners=False, antialias=True).clamp_(0, 1)
    return out


def load_image_file(path: str | os.PathLike[str], in_channels: int, size: Size | None = None) -> Tensor:
    """One image file of any mode as ``(C, H, W)`` float32 in [0, 1], resized as in training.

    Palette and alpha images are flattened (alpha dropped); ``in_channels`` 1 gives grayscale
    ('L'), 3 gives 'RGB'.
    """
    from PIL import Image, UnidentifiedImageError

    if in_channels not in (1, 3):
        raise DivekitError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels}")
    try:
        with Image.open(path) as opened:
            opened.load()
            # palette transparency must go through RGBA to convert cleanly
            img = opened.convert("RGBA") if opened.mode == "P" else opened
            img = img.convert("L" if in_channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DivekitError(f"cannot read image {str(path)!r}: {e}") from None
    x = torch.from_numpy(np.array(img, dtype=np.uint8))
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
    x = x.float().div_(255)
    return resize_images(x, size) if size is not None else x


def load_image_batch(
    paths: Sequence[str | os.PathLike[str]], in_channels: int, size: Size
) -> Tensor:
    """Image files as one batch ``(N, C, H, W)`` float32 in [0, 1], each read and resized by
    :func:`load_image_file` (what ``divekit predict`` gives a classifier); no files is an error."""
    if not paths:
        raise DivekitError("no image files given")
    return torch.stack([load_image_file(p, in_channels, size) for p in paths])


# ----------------------------------------------------------------------------- building the data


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = x.mean(dim=(0, 2, 3), dtype=torch.float64)
    std = x.double().std(dim=(0, 2, 3)) if len(x) else torch.ones(x.shape[1], dtype=torch.float64)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant images: no division by 0
    return tuple(mean.tolist()), tuple(std.tolist())


def _check_limit(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise DivekitError(f"limit must be a positive number of samples, got {n!r}")


def build_data(
    name: str,
    classes: Sequence[str],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    scale: float = 255.0,
    resize: Size | None = None,
    limit: int | None = None,
) -> ImageClassificationData:
    """Turn ``(N, H, W)`` or ``(N, H, W, C)`` pixel arrays (0..``scale``) into the data object.

    ``limit`` keeps the first ``limit`` training and ``limit // 5`` (at least 1) validation
    samples, before any conversion, so quick runs stay quick.
    """
    (tx, ty), (vx, vy) = train, val
    if limit is not None:
        _check_limit(limit)
        n_val = max(1, limit // 5)
        tx, ty, vx, vy = tx[:limit], ty[:limit], vx[:n_val], vy[:n_val]
    for labels in (ty, vy):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DivekitError(
                f"{name}: labels must lie in 0..{len(classes) - 1}, found {labels.min()}..{labels.max()}"
            )
    images = [_to_tensor(a, scale, resize) for a in (tx, vx)]
    mean, std = _channel_stats(images[0])
    return ImageClassificationData(
        train_images=images[0], train_labels=torch.as_tensor(ty, dtype=torch.int64),
        val_images=images[1], val_labels=torch.as_tensor(vy, dtype=torch.int64),
        classes=list(classes), name=name, mean=mean, std=std,
    )


def _to_tensor(a: np.ndarray, scale: float, resize: Size | None) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(a))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    x = x.to(torch.float32).div_(scale).contiguous()
    return resize_images(x, resize) if resize is not None else x


# ----------------------------------------------------------------------------- datasets


@register_dataset("digits", task="classify", offline=True)
def load_digits(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    resize: Size | None = None,
    limit: int | None = None,
    val_fraction: float = 0.2,
    **_: object,
) -> ImageClassificationData:
    """Handwritten digits, 8×8 grayscale, 1,797 images bundled with scikit-learn (no download)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise DivekitError(f"val_fraction must be in (0, 1), got {val_fraction}")
    digits = sk_digits()
    x, y = digits.images.astype(np.float32), digits.target.astype(np.int64)  # (1797, 8, 8), 0..16
    tx, vx, ty, vy = train_test_split(x, y, test_size=val_fraction, stratify=y, random_state=seed)
    return build_data("digits", DIGIT_CLASSES, (tx, ty), (vx, vy), scale=16.0, resize=resize, limit=limit)


def load_idx_dataset(
    name: str,
    classes: Sequence[str],
    *,
    subdirs: Sequence[str],
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    resize: Size | None = None,
    limit: int | None = None,
) -> ImageClassificationData:
    """An MNIST-format dataset: the four IDX files; the test split serves as validation.

    Files given by the user are trusted as they are; only downloads are hash-checked.
    """
    paths = hub.locate(
        IDX_FILES, name=name, data_dir=data_dir, download=download, subdirs=subdirs,
        suffixes=(".gz", ""), sources={f: f"{name}/{f}.gz" for f in IDX_FILES},
    )
    train = read_idx_pair(paths[0], paths[1])
    val = read_idx_pair(paths[2], paths[3])
    return build_data(name, classes, train, val, resize=resize, limit=limit)


def _idx_loader(
    name: str, classes: Sequence[str], subdirs: Sequence[str], doc: str
) -> Callable[..., ImageClassificationData]:
    """Register the IDX dataset ``name``: a loader of the registry's form whose files are looked
    for in ``subdirs`` of ``--data-dir`` (the layouts torchvision and the publishers use)."""

    def load(
        *,
        data_dir: str | os.PathLike[str] | None = None,
        download: bool = False,
        seed: int = 0,
        resize: Size | None = None,
        limit: int | None = None,
        **_: object,
    ) -> ImageClassificationData:
        return load_idx_dataset(
            name, classes, subdirs=subdirs, data_dir=data_dir, download=download, resize=resize,
            limit=limit,
        )

    load.__name__ = load.__qualname__ = f"load_{name.replace('-', '_')}"
    load.__doc__ = doc
    return register_dataset(name, task="classify", offline=False)(load)


load_mnist = _idx_loader(
    "mnist", DIGIT_CLASSES, ("", "raw", "MNIST/raw", "mnist"),
    "MNIST handwritten digits, 28×28 grayscale, 60,000 train / 10,000 test (IDX files).",
)
load_fashion_mnist = _idx_loader(
    "fashion-mnist", FASHION_MNIST_CLASSES,
    ("", "raw", "FashionMNIST/raw", "fashion-mnist", "data/fashion"),
    "Fashion-MNIST clothing images, 28×28 grayscale, 60,000 train / 10,000 test (IDX files).",
)

