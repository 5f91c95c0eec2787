"""Semantic-segmentation datasets (d2l 14.9): every pixel has a class.

Images are kept as decoded ``(3, H, W)`` uint8 tensors and labels as ``(H, W)`` uint8 class
maps (255 = the ignore index, VOC's object borders), one pair per sample, decoded and mapped
from colours to classes *once*. The course maps a label image's colours to classes in every
``__getitem__``; here a training batch is index → crop → stack.

* ``voc``: Pascal VOC 2012's layout (``JPEGImages/*.jpg``, ``SegmentationClass/*.png``,
  ``ImageSets/Segmentation/{train,val}.txt``) from ``--data-dir`` or the hub (``--download``).
  Label PNGs are palette images whose indices are the classes; a PNG in another mode is mapped
  through :data:`VOC_COLORMAP`, and a colour outside the map is an error naming the file.
* ``shapes-seg``: generated offline — the detection set's squares, discs and triangles on crops
  of scikit-image's photos (:func:`divekit.data.detection.make_shapes`), each object's instance
  mask painted with its class: exact per-pixel labels.

A label is never interpolated: crops slice image and label with the same window
(:func:`random_crop`, :func:`crop_batch`), and geometric augmentation moves labels with
``BatchAugment``'s nearest-neighbour masks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from divekit.data.registry import register_dataset
from divekit.errors import DataNotFoundError, DivekitError

log = logging.getLogger("divekit")

IGNORE_INDEX = 255
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa",
    "train", "tv/monitor",
]
# The course's VOC_COLORMAP: class i is drawn in colour VOC_COLORMAP[i].
VOC_COLORMAP = [
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
    (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128),
    (192, 0, 128), (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0),
    (128, 192, 0), (0, 64, 128),
]
VOC_BORDER = (224, 224, 192)  # the 255 (ignore) pixels around objects
VOC_CROP = (320, 480)  # the course's training crop
SHAPES_SEG_CLASSES = ["background", "square", "disc", "triangle"]


@dataclass
class SegmentationData:
    """Images ``(3, H_i, W_i)`` uint8 and labels ``(H_i, W_i)`` uint8 (255 = ignore) per sample."""

    train_images: list[Tensor]
    train_labels: list[Tensor]
    val_images: list[Tensor]
    val_labels: list[Tensor]
    classes: list[str]
    colormap: list[tuple[int, int, int]]
    name: str
    dropped: dict[str, int] = field(default_factory=dict)  # images smaller than the crop

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def filter_by_crop(self, crop: tuple[int, int]) -> SegmentationData:
        """Drop training images smaller than ``crop`` (as the course does); a log line counts
        them. Raises when no image is large enough."""
        keep = [i for i, x in enumerate(self.train_images)
                if x.shape[1] >= crop[0] and x.shape[2] >= crop[1]]
        if not keep:
            largest = max((tuple(x.shape[1:]) for x in self.train_images), key=lambda s: s[0] * s[1])
            raise DivekitError(f"--crop {crop[0]}x{crop[1]} is larger than every training image of "
                               f"{self.name} (largest {largest[0]}x{largest[1]}); choose a smaller crop")
        dropped = len(self.train_images) - len(keep)
        if dropped:
            log.warning("%s: dropped %d of %d training images smaller than the %dx%d crop",
                        self.name, dropped, len(self.train_images), *crop)
        self.train_images = [self.train_images[i] for i in keep]
        self.train_labels = [self.train_labels[i] for i in keep]
        self.dropped = {**self.dropped, "train": dropped}
        return self


# ----------------------------------------------------------------------------- colour maps
def _codes(colours: Tensor) -> Tensor:
    """``(..., 3)`` uint8 RGB → ``(...,)`` int64 codes ``r·65536 + g·256 + b``."""
    c = colours.long()
    return (c[..., 0] * 256 + c[..., 1]) * 256 + c[..., 2]


def colormap_to_label(rgb: Tensor, colormap: Sequence[tuple[int, int, int]] = VOC_COLORMAP,
                      border: tuple[int, int, int] | None = VOC_BORDER, *, what: str = "label") -> Tensor:
    """``(3, H, W)`` uint8 colour label → ``(H, W)`` uint8 class indices (``border`` → 255).

    The course's ``voc_label_indices`` with a sorted lookup instead of a 256³ table; a colour
    outside the map raises a :class:`DivekitError` naming ``what``, the colour and a pixel.
    """
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise DivekitError(f"{what}: expected a (3, H, W) colour image, got {tuple(rgb.shape)}")
    table = list(colormap) + ([border] if border is not None else [])
    values = torch.tensor(list(range(len(colormap))) + ([IGNORE_INDEX] if border else []))
    keys = _codes(torch.tensor(table))
    order = keys.argsort()
    keys, values = keys[order], values[order]
    codes = _codes(rgb.permute(1, 2, 0))  # (H, W)
    pos = torch.searchsorted(keys, codes).clamp_(max=len(keys) - 1)
    bad = keys[pos] != codes
    if bad.any():
        y, x = (int(v) for v in bad.nonzero()[0])
        colour = tuple(int(v) for v in rgb[:, y, x])
        raise DivekitError(f"{what}: colour {colour} at pixel (x={x}, y={y}) is not in the "
                           f"{len(colormap)}-class colour map ({int(bad.sum())} such pixels)")
    return values[pos].to(torch.uint8)


def label_to_colormap(label: Tensor, colormap: Sequence[tuple[int, int, int]] = VOC_COLORMAP,
                      border: tuple[int, int, int] = VOC_BORDER) -> Tensor:
    """``(H, W)`` class indices → ``(3, H, W)`` uint8 colours; 255 → ``border``."""
    palette = torch.zeros(256, 3, dtype=torch.uint8)
    palette[: len(colormap)] = torch.tensor(list(colormap), dtype=torch.uint8)
    palette[IGNORE_INDEX] = torch.tensor(border, dtype=torch.uint8)
    return palette[label.long()].permute(2, 0, 1).contiguous()


def read_label_png(path: str | os.PathLike[str], colormap: Sequence[tuple[int, int, int]] = VOC_COLORMAP,
                   border: tuple[int, int, int] = VOC_BORDER) -> Tensor:
    """A VOC label PNG → ``(H, W)`` uint8 classes.

    A palette PNG whose used entries are the colour map's (VOC's own files) gives its indices
    directly; any other PNG is read as RGB and mapped colour by colour.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":
                idx = np.array(img, dtype=np.uint8)
                pal = np.zeros((256, 3), dtype=np.uint8)
                flat = np.array(img.getpalette() or [], dtype=np.uint8)[: 256 * 3]
                pal[: len(flat) // 3] = flat[: len(flat) // 3 * 3].reshape(-1, 3)
                wanted = {**dict(enumerate(colormap)), IGNORE_INDEX: border}
                if all(tuple(pal[u]) == tuple(wanted.get(int(u), (-1,))) for u in np.unique(idx)):
                    return torch.from_numpy(idx)
            rgb = np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DivekitError(f"cannot read label image {str(path)!r}: {e}") from None
    return colormap_to_label(torch.from_numpy(rgb).permute(2, 0, 1), colormap, border, what=str(path))


def read_image_uint8(path: str | os.PathLike[str]) -> Tensor:
    """An image file as ``(3, H, W)`` uint8 RGB; one clear line when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DivekitError(f"cannot read image {str(path)!r}: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- crops
def random_crop(image: Tensor, label: Tensor, size: tuple[int, int],
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One random ``size`` window, cut from ``image`` ``(C, H, W)`` and ``label`` ``(H, W)``
    alike (the course's ``voc_rand_crop``)."""
    (h, w), (H, W) = size, image.shape[-2:]
    if label.shape[-2:] != (H, W):
        raise DivekitError(f"label {tuple(label.shape)} and image {tuple(image.shape)} differ in size")
    if h > H or w > W:
        raise DivekitError(f"crop {h}x{w} is larger than the {H}x{W} image")
    top = int(torch.randint(H - h + 1, (1,), generator=generator))
    left = int(torch.randint(W - w + 1, (1,), generator=generator))
    return image[..., top : top + h, left : left + w], label[..., top : top + h, left : left + w]


def crop_batch(images: Sequence[Tensor], labels: Sequence[Tensor], index: Sequence[int],
               size: tuple[int, int] | None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The training batch of samples ``index``: one random ``size`` window per sample (or the
    whole images when ``size`` is None), stacked → ``(B, 3, h, w)`` uint8, ``(B, h, w)`` uint8."""
    index = [int(i) for i in index]
    if size is None:
        return torch.stack([images[i] for i in index]), torch.stack([labels[i] for i in index])
    h, w = size
    tops = (torch.rand(len(index), generator=generator, dtype=torch.float64)
            * torch.tensor([images[i].shape[1] - h + 1 for i in index])).long().tolist()
    lefts = (torch.rand(len(index), generator=generator, dtype=torch.float64)
             * torch.tensor([images[i].shape[2] - w + 1 for i in index])).long().tolist()
    xs = [images[i][:, t : t + h, s : s + w] for i, t, s in zip(index, tops, lefts)]
    ys = [labels[i][t : t + h, s : s + w] for i, t, s in zip(index, tops, lefts)]
    return torch.stack(xs), torch.stack(ys)


def pad_batch(images: Sequence[Tensor], labels: Sequence[Tensor], index: Sequence[int],
              multiple: int = 32) -> tuple[Tensor, Tensor]:
    """Whole images of different sizes in one batch: zero-padded at the bottom and right to the
    largest (rounded up to ``multiple``), labels padded with the ignore index."""
    index = [int(i) for i in index]
    H = max(images[i].shape[1] for i in index)
    W = max(images[i].shape[2] for i in index)
    H, W = -(-H // multiple) * multiple, -(-W // multiple) * multiple
    x = torch.zeros(len(index), 3, H, W, dtype=torch.uint8)
    y = torch.full((len(index), H, W), IGNORE_INDEX, dtype=torch.uint8)
    for k, i in enumerate(index):
        h, w = images[i].shape[1:]
        x[k, :, :h, :w] = images[i]
        y[k, :h, :w] = labels[i]
    return x, y


# ----------------------------------------------------------------------------- shapes-seg
def shapes_seg(num_images: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``num_images`` scenes ``(N, 3, size, size)`` uint8 and class maps ``(N, size, size)``
    uint8: 0 background, ``1 + class`` on each object's painted pixels (the detection
    generator's instance masks; objects never overlap)."""
    from divekit.data.detection import make_shapes

    images, boxes, masks = make_shapes(num_images, size, seed, with_masks=True)
    cls = (boxes[..., 0] + 1).clamp(min=0).to(torch.uint8)  # (N, G): 0 on padding rows
    labels = (masks * cls[:, :, None, None]).amax(dim=1)  # (N, size, size)
    return images.mul(255).round_().to(torch.uint8), labels


# --limit N keeps N training images and N/5 validation ones, but never fewer than this: a mean
# IoU over one image (--limit 8 gave one) says nothing about the model
MIN_VAL_UNDER_LIMIT = 16


def val_under_limit(limit: int) -> int:
    """The validation images a ``--limit`` run keeps: a fifth of ``limit``, at least
    :data:`MIN_VAL_UNDER_LIMIT` (or the whole split, when it is smaller)."""
    return max(MIN_VAL_UNDER_LIMIT, limit // 5)


@register_dataset("shapes-seg", task="segment", offline=True)
def load_shapes_seg(data_dir: str | None = None, download: bool = False, seed: int = 0, *,
                    size: int = 128, num_train: int = 1000, num_val: int = 200,
                    limit: int | None = None, **_: object) -> SegmentationData:
    """Generated scenes: squares, discs and triangles on photo crops, exact per-pixel labels (offline)."""
    if size < 32:
        raise DivekitError(f"shapes-seg: image size must be at least 32, got {size}")
    num_train = min(num_train, limit) if limit is not None else num_train
    num_val = min(num_val, val_under_limit(limit)) if limit is not None else num_val
    # Fixed streams: the dataset is the same whatever the training seed.
    tx, ty = shapes_seg(num_train, size, seed=31000 + 1)
    vx, vy = shapes_seg(num_val, size, seed=31000 + 2)
    return SegmentationData(list(tx), list(ty), list(vx), list(vy), list(SHAPES_SEG_CLASSES),
                            VOC_COLORMAP[: len(SHAPES_SEG_CLASSES)], "shapes-seg")


# ----------------------------------------------------------------------------- voc
def read_voc_split(root: Path, split: str, limit: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """The images and class maps listed in ``ImageSets/Segmentation/<split>.txt``."""
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataNotFoundError(f"voc: no {listing}")
    names = [n.strip() for n in listing.read_text().splitlines() if n.strip()]
    if limit is not None:
        names = names[:limit]
    images, labels = [], []
    for name in tqdm(names, desc=f"voc {split}", unit="img", leave=False, disable=len(names) < 50):
        x = read_image_uint8(root / "JPEGImages" / f"{name}.jpg")
        y = read_label_png(root / "SegmentationClass" / f"{name}.png")
        if y.shape != x.shape[1:]:
            raise DivekitError(f"voc: label {name}.png is {tuple(y.shape)}, its image {tuple(x.shape[1:])}")
        images.append(x)
        labels.append(y)
    return images, labels


def find_voc_root(data_dir: str | os.PathLike[str] | None, download: bool) -> Path:
    """``VOC2012`` in ``--data-dir`` (itself, or ``VOCdevkit/VOC2012`` under it), the cache, or
    downloaded (the course's ``download_extract('voc2012', 'VOCdevkit/VOC2012')``)."""
    from divekit import hub

    roots = ([Path(data_dir)] if data_dir is not None else []) + [hub.data_home() / "voc2012"]
    candidates = [r / sub for r in roots for sub in ("", "VOC2012", "VOCdevkit/VOC2012")]
    mark = Path("ImageSets") / "Segmentation" / "train.txt"
    root = next((c for c in candidates if (c / mark).is_file()), None)
    if root is None and download:
        root = hub.download_extract("voc2012", "VOCdevkit/VOC2012", cache_dir=hub.data_home() / "voc2012")
    if root is None:
        looked = ", ".join(str(c) for c in candidates)
        raise DataNotFoundError(
            f"voc: no {mark} (looked in {looked}); pass --download, or --data-dir DIR holding "
            f"VOCdevkit/VOC2012 ({hub.DATA_HUB['voc2012'][0]})")
    return root


@register_dataset("voc", task="segment", offline=False)
def load_voc(data_dir: str | None = None, download: bool = False, seed: int = 0, *,
             limit: int | None = None, **_: object) -> SegmentationData:
    """Pascal VOC 2012 segmentation: 1,464 train / 1,449 val images, 21 classes (VOC layout)."""
    root = find_voc_root(data_dir, download)
    train = read_voc_split(root, "train", limit)
    val = read_voc_split(root, "val", None if limit is None else val_under_limit(limit))
    if not train[0]:
        raise DivekitError(f"voc: {root}/ImageSets/Segmentation/train.txt lists no images")
    return SegmentationData(*train, *val, list(VOC_CLASSES), list(VOC_COLORMAP), "voc")
