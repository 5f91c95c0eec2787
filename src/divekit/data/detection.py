"""Object-detection datasets in the course's banana format.

Every loader returns :class:`DetectionData`: images ``(N, 3, H, W)`` float32 in [0, 1], decoded
once, and labels ``(N, max_objects, 5)`` with rows ``[class, x1, y1, x2, y2]`` (corner,
normalised by width and height), padding rows all -1 (d2l 14.6).

* ``shapes``: generated offline — squares, discs and triangles of random size, aspect and
  place pasted on random crops of scikit-image's bundled photos; the boxes are exact, and
  ``load_shapes`` also gives each object's instance mask (its painted pixels).
* ``banana``: the course's banana-detection set (``bananas_train/label.csv`` + ``images/``).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

from divekit.data.registry import register_dataset
from divekit.data.vision import load_image_file, resize_images
from divekit.errors import DataNotFoundError, DivekitError


@dataclass
class DetectionData:
    train_images: Tensor  # (N, 3, H, W) float32 in [0, 1]
    train_labels: Tensor  # (N, G, 5) rows [class, x1, y1, x2, y2], padding -1
    val_images: Tensor
    val_labels: Tensor
    classes: list[str]
    name: str
    train_masks: Tensor | None = None  # (N, G, H, W) uint8 instance masks, one per label row
    val_masks: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[-2:])  # type: ignore[return-value]

    def resized(self, size: int) -> DetectionData:
        """Images resized to ``size × size``; normalised boxes are unchanged."""
        if self.image_size == (size, size):
            return self
        return DetectionData(resize_images(self.train_images, size), self.train_labels,
                             resize_images(self.val_images, size), self.val_labels,
                             self.classes, self.name,
                             _resize_masks(self.train_masks, size), _resize_masks(self.val_masks, size))


def _resize_masks(masks: Tensor | None, size: int) -> Tensor | None:
    """Nearest-neighbour resize of ``(N, G, H, W)`` masks (labels stay binary)."""
    if masks is None or tuple(masks.shape[-2:]) == (size, size):
        return masks
    out = torch.nn.functional.interpolate(masks.float(), size=(size, size), mode="nearest")
    return out.to(masks.dtype)


# ----------------------------------------------------------------------------- shapes

SHAPE_CLASSES = ["square", "disc", "triangle"]
SHAPE_COLOURS = np.array([[0.95, 0.15, 0.1], [0.1, 0.85, 0.2], [0.15, 0.35, 1.0]], dtype=np.float32)
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina"]
MAX_OBJECTS = 3


@functools.lru_cache(maxsize=1)
def _photos() -> list[np.ndarray]:
    """scikit-image's bundled RGB photos as float32 (H, W, 3) arrays in [0, 1]."""
    try:
        import skimage.data
    except ImportError:
        raise DivekitError(
            "the shapes dataset draws on scikit-image's bundled photos: pip install scikit-image "
            "(or divekit[dev])"
        ) from None
    return [getattr(skimage.data, name)()[..., :3].astype(np.float32) / 255 for name in PHOTOS]


def _background(photos: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (at least half the photo's short side) resized to size × size."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = torch.from_numpy(np.ascontiguousarray(photo[y : y + side, x : x + side])).permute(2, 0, 1)
    return resize_images(crop, size).permute(1, 2, 0).numpy().copy()


def _shape_mask(kind: int, h: int, w: int) -> np.ndarray:
    """(h, w) boolean mask of a shape drawn in an h × w box (pixel centres inside it)."""
    ys, xs = (np.arange(h, dtype=np.float32) + 0.5) / h, (np.arange(w, dtype=np.float32) + 0.5) / w
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    if kind == 0:  # square (a rectangle when the aspect is not 1)
        mask = np.ones((h, w), dtype=bool)
    elif kind == 1:  # disc (an ellipse inscribed in the box)
        mask = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25
    else:  # triangle: apex at the top centre, base along the bottom
        mask = np.abs(xx - 0.5) <= 0.5 * yy
    return mask


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < b[2] and b[0] < x2 and y1 < b[3] and b[1] < y2 for b in placed)


@overload
def make_shapes(num_images: int, size: int, seed: int, *, with_masks: Literal[False] = False,
                objects: tuple[int, int] = ...) -> tuple[Tensor, Tensor]: ...


@overload
def make_shapes(num_images: int, size: int, seed: int, *, with_masks: Literal[True],
                objects: tuple[int, int] = ...) -> tuple[Tensor, Tensor, Tensor]: ...


def make_shapes(num_images: int, size: int, seed: int, *, with_masks: bool = False,
                objects: tuple[int, int] = (0, MAX_OBJECTS),
                ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """``num_images`` scenes ``(N, 3, size, size)`` and labels ``(N, 3, 5)`` from ``seed``.

    Each scene holds 0–3 non-overlapping objects; each object is a square, disc or triangle in
    its class's colour, 12–45 % of the image wide, aspect 0.6–1.6, and its box is the exact
    pixel extent of the shape, in normalised corner coordinates.

    With ``with_masks`` a third tensor ``(N, 3, size, size)`` uint8 holds each label row's
    instance mask: 1 exactly on the pixels painted for that object (so the mask's bounding box
    is the row's box), all zeros on padding rows. Images and labels are the same either way.

    ``objects`` ``(low, high)`` draws each scene's number of objects from ``low..high``
    (at most 3; the default ``(0, 3)``); ``(1, 1)`` gives exactly one object per scene.
    """
    low, high = objects
    if not 0 <= low <= high <= MAX_OBJECTS:
        raise DivekitError(f"objects must be (low, high) with 0 <= low <= high <= {MAX_OBJECTS}, got {objects}")
    rng = np.random.default_rng(seed)
    photos = _photos()
    images = np.empty((num_images, size, size, 3), dtype=np.float32)
    labels = np.full((num_images, MAX_OBJECTS, 5), -1.0, dtype=np.float32)
    masks = np.zeros((num_images, MAX_OBJECTS, size, size), dtype=np.uint8) if with_masks else None
    for i in range(num_images):
        canvas = _background(photos, size, rng)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(low, high + 1))):
            kind = int(rng.integers(len(SHAPE_CLASSES)))
            for _attempt in range(20):
                w = int(round(size * rng.uniform(0.12, 0.45)))
                h = int(np.clip(round(w * rng.uniform(0.6, 1.6)), 4, size))
                x1, y1 = int(rng.integers(size - w + 1)), int(rng.integers(size - h + 1))
                box = (x1, y1, x1 + w, y1 + h)
                if not _overlaps(box, placed):
                    break
            else:
                continue
            mask = _shape_mask(kind, h, w)
            canvas[y1 : y1 + h, x1 : x1 + w][mask] = SHAPE_COLOURS[kind]
            if masks is not None:
                masks[i, len(placed), y1 : y1 + h, x1 : x1 + w] = mask
            rows, cols = mask.any(1).nonzero()[0], mask.any(0).nonzero()[0]
            # the box is the painted pixels' exact extent
            tight = (x1 + cols[0], y1 + rows[0], x1 + cols[-1] + 1, y1 + rows[-1] + 1)
            labels[i, len(placed)] = [kind, *(np.array(tight, dtype=np.float32) / size)]
            placed.append(box)
        images[i] = canvas
    out = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
    return out if masks is None else (*out, torch.from_numpy(masks))


@register_dataset("shapes", task="detect", offline=True)
def load_shapes(data_dir: str | None = None, download: bool = False, seed: int = 0, *,
                size: int = 256, num_train: int = 1000, num_val: int = 200,
                limit: int | None = None, **_: object) -> DetectionData:
    """Generated scenes: squares, discs and triangles on photo crops, exact boxes and masks (offline)."""
    if size < 32:
        raise DivekitError(f"shapes: image size must be at least 32, got {size}")
    num_train = min(num_train, limit) if limit is not None else num_train
    # Fixed streams: the dataset is the same whatever the training seed.
    train_x, train_y, train_m = make_shapes(num_train, size, seed=20240 + 1, with_masks=True)
    val_x, val_y, val_m = make_shapes(num_val, size, seed=20240 + 2, with_masks=True)
    return DetectionData(train_x, train_y, val_x, val_y, list(SHAPE_CLASSES), "shapes", train_m, val_m)


# ----------------------------------------------------------------------------- banana


def read_banana_split(folder: Path, size: int = 256, *,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``folder/label.csv`` (img_name,label,xmin,ymin,xmax,ymax in pixels of ``size``) and
    ``folder/images/`` → images ``(N, 3, H, W)`` and labels ``(N, 1, 5)`` normalised.

    Images are float32 in [0, 1], or with ``dtype=torch.uint8`` the pixels 0..255 (a quarter
    of the memory)."""
    path = folder / "label.csv"
    if not path.is_file():
        raise DataNotFoundError(f"banana: no {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ["img_name", "label", "xmin", "ymin", "xmax", "ymax"]
    if not rows or any(k not in rows[0] for k in need):
        raise DivekitError(f"{path}: expected a header {','.join(need)} and at least one row")
    images, labels = [], []
    for line, row in enumerate(rows, start=2):
        try:
            values = [float(row[k]) for k in need[1:]]
        except (TypeError, ValueError):
            raise DivekitError(f"{path}, line {line}: non-numeric label or box {row}") from None
        if values[0] < 0 or values[0] != int(values[0]):
            raise DivekitError(f"{path}, line {line}: class {row['label']!r} must be a whole number >= 0")
        image = load_image_file(folder / "images" / row["img_name"], 3, (size, size))
        images.append(image.mul_(255).round_().to(torch.uint8) if dtype == torch.uint8 else image)
        labels.append([values[0]] + [v / size for v in values[1:]])
    return torch.stack(images), torch.tensor(labels, dtype=torch.float32)[:, None, :]


@register_dataset("banana", task="detect", offline=False)
def load_banana(data_dir: str | None = None, download: bool = False, seed: int = 0, *,
                limit: int | None = None, **_: object) -> DetectionData:
    """The course's banana detection set: 1000 + 100 images of 256×256, one banana each."""
    from divekit import hub

    roots = ([Path(data_dir)] if data_dir is not None else []) + [hub.data_home() / "banana"]
    candidates = [r / sub for r in roots for sub in ("", "banana-detection")]
    root = next((c for c in candidates if (c / "bananas_train" / "label.csv").is_file()), None)
    if root is None and download:
        root = hub.download_extract("banana-detection", cache_dir=hub.data_home() / "banana")
    if root is None:
        looked = ", ".join(str(c) for c in candidates)
        raise DataNotFoundError(
            f"banana: no bananas_train/label.csv (looked in {looked}); pass --download, or "
            f"--data-dir DIR holding bananas_train/ and bananas_val/ ({hub.DATA_HUB['banana-detection'][0]})"
        )
    train_x, train_y = read_banana_split(root / "bananas_train")
    val_x, val_y = read_banana_split(root / "bananas_val")
    if limit is not None:
        train_x, train_y = train_x[:limit], train_y[:limit]
    num_classes = int(max(train_y[..., 0].max(), val_y[..., 0].max())) + 1
    classes = ["banana"] if num_classes == 1 else [f"class{c}" for c in range(num_classes)]
    return DetectionData(train_x, train_y, val_x, val_y, classes, "banana")
