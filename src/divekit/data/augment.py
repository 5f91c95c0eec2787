"""Image augmentation on ``torchvision.transforms.v2``: one pipeline moves boxes and masks with
the image, so classification, detection and segmentation share it.

The course: augmentation makes existing data more diverse, is drawn online and at random during
training, *never at test time*, and is chosen from the deployment scenario (do not flip digits).

A pipeline is a preset (``none``, ``flip``, ``standard``, ``strong``) or a comma-separated list
of operations with ``:``-separated parameters, ranges written ``low-high``::

    aug = Augment("hflip,crop:0.5-1,jitter:0.5")        # train=True: random
    image = aug(image)                                   # (C, H, W) float in [0, 1]
    image, boxes, masks, labels = aug(image, boxes=b, masks=m, labels=l)
    Augment("strong", train=False)(image)                # test time: the image, unchanged

Boxes are ``(N, 4)`` corner boxes ``x1, y1, x2, y2`` in pixels; masks ``(H, W)`` or ``(K, H, W)``.
Under the hood they become ``tv_tensors.BoundingBoxes`` and ``tv_tensors.Mask``; code that
already holds tv_tensors can call ``aug.transform(...)`` (a ``v2.Compose``) directly.

Multi-image and batch-level augmentations live beside the pipeline: :func:`mosaic` (four images
tiled into one, boxes and masks carried along), :func:`mixup` and :func:`cutmix` (soft targets),
and :class:`BatchMix`, which applies one of them to each training batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from divekit.errors import DivekitError

Range = tuple[float, float]


class Sample(NamedTuple):
    """An augmented image with its (optional) corner boxes, masks and box labels."""

    image: Tensor
    boxes: Tensor | None
    masks: Tensor | None
    labels: Tensor | None


# ----------------------------------------------------------------------------- size-aware ops
class ResizedCrop(v2.RandomResizedCrop):
    """RandomResizedCrop (random area ``scale`` and aspect ``ratio``) back to the input's size."""

    def __init__(self, scale: Range, ratio: Range):
        super().__init__(size=1, scale=scale, ratio=ratio, antialias=True)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {**super().make_params(flat_inputs), "size": list(v2.query_size(flat_inputs))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resized_crop, inpt, **params, interpolation=self.interpolation,
                                 antialias=self.antialias)


class Blur(v2.GaussianBlur):
    """Gaussian blur whose kernel (≈ 6σ) shrinks to fit small images."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        h, w = TF.get_size(inpt)
        fit = max(1, 2 * (min(h, w) // 2) - 1)  # reflect padding k // 2 must stay below the side
        k = [min(k, fit) for k in self.kernel_size]
        return self._call_kernel(TF.gaussian_blur, inpt, k, **params)


class Elastic(v2.ElasticTransform):
    """Elastic deformation; the smoothing σ shrinks on small images so its kernel (8σ) fits."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        full = self.sigma
        self.sigma = [min(s, (min(h, w) - 1) / 8) for s in full]
        try:
            return super().make_params(flat_inputs)
        finally:
            self.sigma = full


class Erase(v2.RandomErasing):
    """Random erasing (occlusion): pixels only; boxes and masks pass through unchanged."""

    def forward(self, *inputs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*passing through inputs of type")
            return super().forward(*inputs)


# ----------------------------------------------------------------------------- the op table
@dataclass(frozen=True)
class Param:
    name: str
    default: Any  # float, or a (low, high) range; None: "same as the first parameter"
    low: float
    high: float
    is_range: bool = False
    is_int: bool = False


@dataclass(frozen=True)
class Op:
    name: str
    params: tuple[Param, ...]
    build: Callable[..., v2.Transform]
    help: str

    def usage(self) -> str:
        return ":".join([self.name, *(p.name for p in self.params)])


def _p(p: float = 0.5) -> Param:
    return Param("p", p, 0.0, 1.0)


def _maybe(t: v2.Transform, p: float) -> v2.Transform:
    return t if p >= 1 else v2.RandomApply([t], p=p)


def _jitter(brightness: float, contrast: float | None, saturation: float | None, hue: float) -> v2.Transform:
    c = brightness if contrast is None else contrast
    s = brightness if saturation is None else saturation
    return v2.ColorJitter(brightness=brightness, contrast=c, saturation=s, hue=hue)


OPS: dict[str, Op] = {op.name: op for op in [
    Op("hflip", (_p(),), lambda p: v2.RandomHorizontalFlip(p), "horizontal flip with probability p"),
    Op("vflip", (_p(),), lambda p: v2.RandomVerticalFlip(p), "vertical flip with probability p"),
    Op("crop", (Param("scale", (0.08, 1.0), 0.01, 1.0, True), Param("ratio", (3 / 4, 4 / 3), 0.05, 20.0, True)),
       lambda scale, ratio: ResizedCrop(scale, ratio),
       "random area fraction (scale) and aspect ratio, resized back to the image's size"),
    Op("rotate", (Param("degrees", 15.0, 0.0, 180.0),), lambda degrees: v2.RandomRotation(degrees),
       "rotate by up to ±degrees (boxes: the enclosing axis-aligned box)"),
    Op("jitter", (Param("brightness", 0.4, 0.0, 10.0), Param("contrast", None, 0.0, 10.0),
                  Param("saturation", None, 0.0, 10.0), Param("hue", 0.0, 0.0, 0.5)), _jitter,
       "colour jitter; contrast and saturation default to the brightness value"),
    Op("blur", (Param("sigma", (0.1, 2.0), 0.01, 20.0, True), _p()),
       lambda sigma, p: _maybe(Blur(2 * round(3 * sigma[1]) + 1, sigma), p), "Gaussian blur, σ drawn from the range"),
    Op("sharpness", (Param("factor", 2.0, 0.0, 20.0), _p()),
       lambda factor, p: v2.RandomAdjustSharpness(factor, p), "sharpen (factor > 1) or soften (< 1)"),
    Op("elastic", (Param("alpha", 50.0, 0.0, 1000.0), Param("sigma", 5.0, 0.01, 100.0), _p()),
       lambda alpha, sigma, p: _maybe(Elastic(alpha, sigma), p), "elastic deformation (displacement α, smoothness σ)"),
    Op("posterize", (Param("bits", 4, 1, 8, is_int=True), _p()),
       lambda bits, p: v2.RandomPosterize(bits, p), "keep only the top bits of each channel"),
    Op("solarize", (Param("threshold", 0.5, 0.0, 1.0), _p()),
       lambda threshold, p: v2.RandomSolarize(threshold, p), "invert pixels above the threshold"),
    Op("gray", (_p(0.1),), lambda p: v2.RandomGrayscale(p), "grayscale (channels kept) with probability p"),
    Op("erase", (_p(), Param("scale", (0.02, 0.33), 0.0, 1.0, True)),
       lambda p, scale: Erase(p, scale=scale), "random erasing: occlude a rectangle of area fraction scale"),
]}

PRESETS: dict[str, str] = {
    "none": "",
    "flip": "hflip",
    "standard": "hflip,crop:0.3-1,jitter:0.4",
    "strong": "hflip,crop:0.2-1,rotate:15,jitter:0.4:0.4:0.4:0.1,blur:0.1-1.5:0.3,sharpness:2:0.3,"
              "elastic:40:4:0.25,gray:0.1,erase:0.25",
}
BATCH_LEVEL = {"mixup": "--mixup ALPHA", "cutmix": "--cutmix ALPHA", "mosaic": "divekit.data.augment.mosaic"}


def describe_ops() -> str:
    """One line per operation and preset, for ``--help`` and error messages."""
    ops = "; ".join(f"{op.usage()} ({op.help})" for op in OPS.values())
    presets = "; ".join(f"{k} = {v or 'identity'}" for k, v in PRESETS.items())
    return f"operations: {ops}. presets: {presets}"


def _number(text: str, param: Param, op: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DivekitError(f"augmentation {op!r}: {param.name} must be a number, got {text!r}") from None
    if not param.low <= value <= param.high:
        raise DivekitError(
            f"augmentation {op!r}: {param.name} must be in [{param.low:g}, {param.high:g}], got {value:g}"
        )
    if param.is_int:
        if value != int(value):
            raise DivekitError(f"augmentation {op!r}: {param.name} must be an integer, got {text!r}")
        return int(value)
    return value


def _parse_param(text: str, param: Param, op: str) -> Any:
    if not param.is_range:
        return _number(text, param, op)
    low, sep, high = text.partition("-")
    if not sep:
        raise DivekitError(f"augmentation {op!r}: {param.name} is a range like 0.5-1, got {text!r}")
    lo, hi = _number(low, param, op), _number(high, param, op)
    if lo > hi:
        raise DivekitError(f"augmentation {op!r}: {param.name} range {text!r} has low > high")
    return (lo, hi)


def parse_item(item: str) -> tuple[str, list[Any]]:
    """``'crop:0.5-1'`` → ``('crop', [(0.5, 1.0), (0.75, 1.333)])``: the operation's name and all
    its parameter values (defaults filled in), with errors that name the valid choices."""
    name, *args = item.strip().split(":")
    if name in BATCH_LEVEL:
        raise DivekitError(f"{name!r} is a batch-level augmentation; use {BATCH_LEVEL[name]}")
    if name not in OPS:
        raise DivekitError(
            f"unknown augmentation {name!r}; choose presets {', '.join(PRESETS)} "
            f"or operations {', '.join(OPS)}"
        )
    op = OPS[name]
    if len(args) > len(op.params):
        raise DivekitError(f"augmentation {name!r} takes at most {len(op.params)} parameter(s): {op.usage()}")
    values = [_parse_param(a, p, name) for a, p in zip(args, op.params)]
    return name, values + [p.default for p in op.params[len(values):]]


def parse_spec(spec: str | None) -> list[tuple[str, list[Any]]]:
    """A preset name or a comma-separated operation list → ``[(name, values), ...]``."""
    spec = (spec or "none").strip()
    spec = PRESETS.get(spec, spec)
    return [parse_item(item) for item in spec.split(",") if item.strip()]


def parse_op(item: str) -> v2.Transform:
    """``'crop:0.5-1'`` → the v2 transform."""
    name, values = parse_item(item)
    return OPS[name].build(*values)


def build_transforms(spec: str | None) -> list[v2.Transform]:
    """A preset name or a comma-separated operation list → the list of v2 transforms."""
    return [OPS[name].build(*values) for name, values in parse_spec(spec)]


# ----------------------------------------------------------------------------- the direct image path
ImageStep = Callable[[Tensor], Tensor]


def _direct_step(t: v2.Transform) -> ImageStep | None:
    """One v2 transform as a function of a plain ``(C, H, W)`` image tensor that draws the same
    random numbers in the same order as ``t(image)`` and calls the same kernel, without v2's
    per-call machinery (input flattening, type dispatch, the ``tv_tensors.Image`` subclass whose
    every operator goes through ``__torch_function__``). None where ``t`` has no such form."""
    if isinstance(t, v2.RandomHorizontalFlip | v2.RandomVerticalFlip):
        flip = TF.horizontal_flip_image if isinstance(t, v2.RandomHorizontalFlip) else TF.vertical_flip_image
        p = t.p

        def flip_step(x: Tensor) -> Tensor:
            return x if torch.rand(1) >= p else flip(x)  # v2's _RandomApplyTransform draw

        return flip_step
    if type(t) is ResizedCrop:
        crop = t

        def crop_step(x: Tensor) -> Tensor:
            params = crop.make_params([x])
            return TF.resized_crop_image(x, **params, interpolation=crop.interpolation,
                                         antialias=crop.antialias)

        return crop_step
    if type(t) is v2.ColorJitter:
        jitter = t
        kernels = {0: ("brightness_factor", TF.adjust_brightness_image),
                   1: ("contrast_factor", TF.adjust_contrast_image),
                   2: ("saturation_factor", TF.adjust_saturation_image),
                   3: ("hue_factor", TF.adjust_hue_image)}

        def jitter_step(x: Tensor) -> Tensor:
            params = jitter.make_params([x])
            for fn_id in params["fn_idx"].tolist():  # v2's random order of the four
                name, kernel = kernels[fn_id]
                if params[name] is not None:
                    x = kernel(x, params[name])
            return x

        return jitter_step
    return None


def direct_plan(transforms: Sequence[v2.Transform]) -> list[ImageStep] | None:
    """The image-only fast path of a pipeline (:func:`_direct_step` for each transform), or
    None when some transform has none (rotation, blur, ...: those run through v2)."""
    steps = [_direct_step(t) for t in transforms]
    return None if any(s is None for s in steps) else steps  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the pipeline
class Augment:
    """A training pipeline (``train=True``) or the test one, which never augments.

    ``aug(image)`` returns the image; with ``boxes``, ``masks`` or ``labels`` it returns a
    :class:`Sample`. With ``labels``, boxes pushed out of the image (width or height under one
    pixel) are dropped together with their labels.
    """

    def __init__(self, spec: str | None = "none", *, train: bool = True):
        ops = build_transforms(spec)  # parsed even at test time, so a typo fails early
        self.spec, self.train = spec or "none", train
        self.transform = v2.Compose(ops) if train and ops else v2.Identity()
        # an image alone (the classification case) skips v2's dispatch where every op allows
        self.direct = direct_plan(ops) if train and ops else None

    def __repr__(self) -> str:
        return f"Augment({self.spec!r}, train={self.train})"

    @property
    def is_identity(self) -> bool:
        return isinstance(self.transform, v2.Identity)

    def __call__(self, image: Tensor, boxes: Tensor | None = None, masks: Tensor | None = None,
                 labels: Tensor | None = None) -> Tensor | Sample:
        if image.ndim != 3:
            raise DivekitError(f"expected one image (C, H, W), got shape {tuple(image.shape)}")
        if boxes is None and masks is None and labels is None:
            if self.direct is not None and type(image) is Tensor:
                for step in self.direct:  # the same draws and kernels as self.transform
                    image = step(image)
                return image
            return self.transform(tv_tensors.Image(image)).as_subclass(Tensor)
        sample: dict[str, Any] = {"image": tv_tensors.Image(image)}
        if boxes is not None:
            sample["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:])
        if masks is not None:
            sample["masks"] = tv_tensors.Mask(masks)
        if labels is not None:
            sample["labels"] = labels
        out = self.transform(sample)
        if boxes is not None:
            out["boxes"] = TF.clamp_bounding_boxes(out["boxes"])
            if labels is not None:
                out = v2.SanitizeBoundingBoxes(labels_getter=lambda s: s["labels"])(out)
        plain = {k: (v.as_subclass(Tensor) if isinstance(v, Tensor) else v) for k, v in out.items()}
        return Sample(plain["image"], plain.get("boxes"), plain.get("masks"), plain.get("labels"))


class SampleTransform:
    """``(image, label) → (aug(image), label)``: a picklable per-sample transform for loaders."""

    def __init__(self, augment: Augment):
        self.augment = augment

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        return self.augment(image), label  # type: ignore[return-value]


# ----------------------------------------------------------------------------- mosaic
def mosaic(
    images: Sequence[Tensor],
    boxes: Sequence[Tensor] | None = None,
    masks: Sequence[Tensor] | None = None,
    labels: Sequence[Tensor] | None = None,
    *,
    size: tuple[int, int] | None = None,
    center: tuple[float, float] | None = None,
) -> Sample:
    """Four images tiled into one (YOLOv4's mosaic), boxes and masks carried along.

    A centre ``(cx, cy)`` (fractions of the output, drawn from ``U(0.25, 0.75)`` unless given)
    splits the ``size`` canvas (default: the first image's) into top-left, top-right,
    bottom-left and bottom-right quadrants; image ``k`` is resized into quadrant ``k``, its
    boxes scaled by the same factors and shifted by the quadrant's corner. Masks are ``(H, W)``
    label maps (resized by nearest neighbour).
    """
    if len(images) != 4:
        raise DivekitError(f"mosaic takes exactly 4 images, got {len(images)}")
    c = images[0].shape[0]
    if any(im.ndim != 3 or im.shape[0] != c for im in images):
        raise DivekitError("mosaic images must all be (C, H, W) with the same number of channels")
    h, w = size or tuple(images[0].shape[-2:])
    fx, fy = center if center is not None else (0.25 + 0.5 * torch.rand(2)).tolist()
    xs, ys = [0, max(1, min(w - 1, round(fx * w))), w], [0, max(1, min(h - 1, round(fy * h))), h]
    canvas = images[0].new_zeros((c, h, w))
    canvas_masks = masks[0].new_zeros((h, w)) if masks is not None else None
    out_boxes: list[Tensor] = []
    for k in range(4):
        x0, x1, y0, y1 = xs[k % 2], xs[k % 2 + 1], ys[k // 2], ys[k // 2 + 1]
        canvas[:, y0:y1, x0:x1] = TF.resize(images[k], [y1 - y0, x1 - x0], antialias=True)
        if canvas_masks is not None:
            tile = TF.resize(tv_tensors.Mask(masks[k][None]), [y1 - y0, x1 - x0])  # nearest
            canvas_masks[y0:y1, x0:x1] = tile[0]
        if boxes is not None:
            ih, iw = images[k].shape[-2:]
            scale = boxes[k].new_tensor([(x1 - x0) / iw, (y1 - y0) / ih] * 2)
            out_boxes.append(boxes[k] * scale + boxes[k].new_tensor([x0, y0, x0, y0]))
    return Sample(
        canvas,
        torch.cat(out_boxes) if boxes is not None else None,
        canvas_masks,
        torch.cat(list(labels)) if labels is not None else None,
    )


# ----------------------------------------------------------------------------- mixup and cutmix
def soft_targets(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """One-hot rows ``(N, K)``, optionally label-smoothed: ``(1 - ε) one_hot + ε / K``."""
    if y.is_floating_point():  # already soft
        return y
    t = torch.nn.functional.one_hot(y, num_classes).float()
    return t * (1 - smoothing) + smoothing / num_classes if smoothing else t


def sample_lambda(alpha: float) -> float:
    """The mixing weight ``λ ~ Beta(α, α)`` (torch's global generator)."""
    if alpha <= 0:
        raise DivekitError(f"the mixing Beta(α, α) needs α > 0, got {alpha}")
    a = torch.tensor(float(alpha))
    return float(torch.distributions.Beta(a, a).sample())


def mixup(x: Tensor, y: Tensor, num_classes: int, alpha: float = 0.2, *,
          lam: float | None = None) -> tuple[Tensor, Tensor, float]:
    """mixup (Zhang et al. 2018): ``x̃ = λ x_i + (1 - λ) x_j``, ``ỹ = λ y_i + (1 - λ) y_j``.

    ``j`` is a random permutation of the batch and ``λ ~ Beta(α, α)``. Returns the mixed
    ``(N, C, H, W)`` batch, soft targets ``(N, K)`` whose rows sum to 1, and ``λ``.
    """
    lam = sample_lambda(alpha) if lam is None else lam
    perm = torch.randperm(len(x), device=x.device)
    t = soft_targets(y, num_classes)
    return lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm], lam


def cutmix(x: Tensor, y: Tensor, num_classes: int, alpha: float = 1.0, *,
           lam: float | None = None) -> tuple[Tensor, Tensor, float]:
    """CutMix (Yun et al. 2019): paste a box of area ``≈ (1 - λ) H W`` from ``x_j`` into ``x_i``.

    The box is centred uniformly and clipped at the border; ``λ`` is then re-measured as the
    fraction of pixels kept, so ``ỹ = λ y_i + (1 - λ) y_j`` matches the pixels exactly.
    """
    lam = sample_lambda(alpha) if lam is None else lam
    h, w = x.shape[-2:]
    cut = (1 - lam) ** 0.5
    ch, cw = round(h * cut), round(w * cut)
    cy, cx = (torch.rand(2) * torch.tensor([h, w])).long().tolist()
    y0, y1 = max(cy - ch // 2, 0), min(cy + (ch - ch // 2), h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + (cw - cw // 2), w)
    perm = torch.randperm(len(x), device=x.device)
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    kept = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    t = soft_targets(y, num_classes)
    return mixed, kept * t + (1 - kept) * t[perm], kept


class BatchMix:
    """Applied to each training batch: mixup, cutmix, or (both on) one of them at random."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        for name, a in (("--mixup", mixup_alpha), ("--cutmix", cutmix_alpha)):
            if a < 0:
                raise DivekitError(f"{name} takes the Beta(α, α) parameter α ≥ 0 (0 = off), got {a}")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or bool(torch.rand(()) < 0.5))
        if use_cutmix:
            return cutmix(x, y, self.num_classes, self.cutmix_alpha)[:2]
        return mixup(x, y, self.num_classes, self.mixup_alpha)[:2]
