"""Batched augmentation: a whole ``(N, C, H, W)`` float batch in ``[0, 1]`` at once.

The per-sample pipeline (:class:`divekit.data.augment.Augment`, torchvision's transforms.v2)
calls every transform once per image in ``DataLoader`` workers; on small images the Python
overhead of those calls dominates. :class:`BatchAugment` takes the same specification
(``"standard"``, ``"hflip,crop:0.5-1,jitter:0.4"``, ...) and draws one set of random parameters
per *sample* (the same distributions as the v2 transforms) but applies each operation to the
whole batch with tensor operations, on whatever device the batch lives on:

* flips: ``torch.where`` between the batch and its mirror;
* ``crop`` (random resized crop back to the input size): bilinear resampling written as two
  batched matrix products, ``R_y @ x @ R_xᵀ``, with one interpolation matrix per sample (the
  same weights as ``torch.nn.functional.interpolate(..., mode="bilinear")``, which torchvision
  uses when it enlarges a crop);
* ``rotate`` and ``elastic``: one ``grid_sample`` over per-sample sampling grids;
* ``blur`` and ``sharpness``: grouped convolutions with per-sample kernels or factors;
* ``jitter``: brightness, contrast, saturation and hue with per-sample factors, in a random
  order per sample as ``ColorJitter`` does (hue through a batched RGB ↔ HSV conversion);
* ``gray``, ``posterize``, ``solarize``, ``erase``: per-sample masks.

Random parameters are drawn on the CPU from one ``torch.Generator`` (the global one unless
given), so a batch is augmented identically on the CPU and on a GPU, and resuming a run that
restores the RNG state reproduces the augmentation. Each operation's ``apply`` takes explicit
parameters, which the tests feed to torchvision's functional ops image by image.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from divekit.data.augment import PRESETS, parse_spec
from divekit.errors import DivekitError

Params = dict[str, Tensor]
GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


# ----------------------------------------------------------------------------- helpers
def _uniform(n: int, low: float, high: float, g: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low


def _coin(n: int, p: float, g: torch.Generator | None) -> Tensor:
    """``n`` Bernoulli(p) draws as a bool tensor (always drawn, so the stream does not depend on p)."""
    return torch.rand(n, generator=g) < p


def _randint(low: Tensor, high: Tensor, g: torch.Generator | None) -> Tensor:
    """Uniform integers in ``[low, high)`` elementwise."""
    return low + (torch.rand(low.shape, generator=g, dtype=torch.float64) * (high - low)).floor().long()


def _view(v: Tensor, x: Tensor) -> Tensor:
    """Per-sample values ``(N,)`` → ``(N, 1, 1, 1)`` on x's device and dtype."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """``(N, 3, H, W)`` → ``(N, 1, H, W)`` luma; a 1-channel batch is returned as it is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def _box_attempts(n: int, height: int, width: int, scale: tuple[float, float],
                  ratio: tuple[float, float], g: torch.Generator | None, tries: int = 10
                  ) -> tuple[Tensor, Tensor]:
    """torchvision's rejection sampling of a box's (h, w), ten tries per sample at once:
    area ``U(scale)·H·W``, aspect ``exp(U(log ratio))`` → ``(N, tries)`` heights and widths."""
    area = height * width * (torch.rand(n, tries, generator=g, dtype=torch.float64)
                             * (scale[1] - scale[0]) + scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(n, tries, generator=g, dtype=torch.float64) * (log_hi - log_lo) + log_lo)
    return (area / aspect).sqrt().round().long(), (area * aspect).sqrt().round().long()


def _first_valid(ok: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the first True per row of ``(N, tries)`` and whether there is one."""
    found = ok.any(dim=1)
    first = torch.where(found, ok.float().argmax(dim=1), torch.zeros_like(found, dtype=torch.long))
    return first, found


def bilinear_matrix(start: Tensor, length: Tensor, size_in: int, size_out: int) -> Tensor:
    """Per-sample ``(N, size_out, size_in)`` matrices resampling the span
    ``[start, start + length)`` of an axis to ``size_out`` pixels, bilinearly with half-pixel
    centres (``interpolate(mode="bilinear", align_corners=False)`` on the cropped span)."""
    n = start.shape[0]
    scale = length.double() / size_out  # (N,)
    o = torch.arange(size_out, dtype=torch.float64)
    src = ((o + 0.5) * scale[:, None] - 0.5).clamp(min=0)  # (N, out), in the span's pixels
    i0 = src.floor().long()
    lam = src - i0
    i1 = torch.minimum(i0 + 1, length[:, None] - 1)
    i0 = torch.minimum(i0, length[:, None] - 1)
    m = torch.zeros(n, size_out, size_in, dtype=torch.float64)
    m.scatter_add_(2, (start[:, None] + i0)[..., None], (1 - lam)[..., None])
    m.scatter_add_(2, (start[:, None] + i1)[..., None], lam[..., None])
    return m


def gaussian_kernels(sigma: Tensor, size: int) -> Tensor:
    """``(N, size)`` normalised 1-D Gaussian kernels, one per σ (torchvision's sampling)."""
    half = (size - 1) * 0.5
    t = torch.linspace(-half, half, size, dtype=torch.float64)
    k = torch.exp(-0.5 * (t[None] / sigma.double()[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def separable_blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Blur each sample with its own 1-D kernel along both axes, reflect padding as torchvision."""
    n, c, h, w = x.shape
    k = kernels.shape[1]
    weight = kernels.to(device=x.device, dtype=x.dtype).repeat_interleave(c, dim=0)  # (N*C, k)
    flat = F.pad(x.reshape(1, n * c, h, w), [k // 2] * 4, mode="reflect")
    flat = F.conv2d(flat, weight.view(n * c, 1, k, 1), groups=n * c)
    flat = F.conv2d(flat, weight.view(n * c, 1, 1, k), groups=n * c)
    return flat.view(n, c, h, w)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    flat = delta == 0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, 1), 0)
    d = torch.where(flat, 1, delta)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = torch.where(flat, 0, h / 6) % 1.0
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6
    sector = h6.floor()
    f = h6 - sector
    sector = sector.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([  # (6 sectors, 3 channels, ...)
        torch.stack((v, t, p)), torch.stack((q, v, p)), torch.stack((p, v, t)),
        torch.stack((p, q, v)), torch.stack((t, p, v)), torch.stack((v, p, q)),
    ])
    index = sector.unsqueeze(0).unsqueeze(0).expand(1, 3, *sector.shape)
    return table.gather(0, index).squeeze(0).movedim(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hues by ``shift`` (fractions of a turn, per sample) of an RGB batch."""
    if x.shape[1] == 1:
        return x
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + shift.to(x.device, x.dtype).view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


# ----------------------------------------------------------------------------- operations
class BatchOp:
    """One operation: ``sample`` draws per-sample parameters (CPU), ``apply`` uses them."""

    def sample(self, x: Tensor, g: torch.Generator | None) -> Params:
        raise NotImplementedError

    def apply(self, x: Tensor, **params: Tensor) -> Tensor:
        raise NotImplementedError

    def apply_mask(self, m: Tensor, **params: Tensor) -> Tensor:
        """The same geometric change on ``(N, K, H, W)`` masks (nearest); colour ops keep them."""
        return m

    def __call__(self, x: Tensor, g: torch.Generator | None = None) -> Tensor:
        return self.apply(x, **self.sample(x, g))


class CoinOp(BatchOp):
    """An operation applied to each sample with probability ``p``: subclasses give ``effect``."""

    p: float

    def sample(self, x, g):
        return {"on": _coin(len(x), self.p, g)}

    def effect(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def apply(self, x, on):
        return torch.where(on.to(x.device).view(-1, 1, 1, 1), self.effect(x), x)


class Flip(BatchOp):
    def __init__(self, p: float, dim: int):
        self.p, self.dim = p, dim

    def sample(self, x, g):
        return {"flip": _coin(len(x), self.p, g)}

    def apply(self, x, flip):
        return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(self.dim), x)

    apply_mask = apply


class Crop(BatchOp):
    """RandomResizedCrop back to the input size (``top, left, height, width`` per sample)."""

    def __init__(self, scale: tuple[float, float], ratio: tuple[float, float]):
        self.scale, self.ratio = scale, ratio

    def sample(self, x, g):
        n, _, height, width = x.shape
        h, w = _box_attempts(n, height, width, self.scale, self.ratio, g)
        first, found = _first_valid((w > 0) & (w <= width) & (h > 0) & (h <= height))
        h, w = h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0]
        # the fallback: the central crop of the allowed aspect closest to the image's
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            fw, fh = int(round(height * max(self.ratio))), height
        else:
            fw, fh = width, height
        h, w = torch.where(found, h, fh), torch.where(found, w, fw)
        top = torch.where(found, _randint(torch.zeros_like(h), height - h + 1, g), (height - h) // 2)
        left = torch.where(found, _randint(torch.zeros_like(w), width - w + 1, g), (width - w) // 2)
        return {"top": top, "left": left, "height": h, "width": w}

    def apply(self, x, top, left, height, width, hflip=None, vflip=None):
        """``R_y @ x @ R_xᵀ`` per sample, as two ``bmm``: the columns first, on the batch seen as
        ``(N, C·H, W)`` (no broadcast copy of the image), then the rows. ``hflip``/``vflip``
        (per-sample booleans): a flip drawn just before the crop, folded into the matrices
        (a mirrored image resampled = the mirrored matrix applied to the image)."""
        n, c, H, W = x.shape
        ry = bilinear_matrix(top, height, H, H)  # (N, H, H)
        rx = bilinear_matrix(left, width, W, W)  # (N, W, W)
        if hflip is not None:
            rx = torch.where(hflip.view(-1, 1, 1), rx.flip(2), rx)
        if vflip is not None:
            ry = torch.where(vflip.view(-1, 1, 1), ry.flip(2), ry)
        rx = rx.to(x.device, x.dtype).transpose(1, 2)
        ry = ry.to(x.device, x.dtype)
        cols = torch.bmm(x.reshape(n, c * H, W), rx)  # (N, C·H, W)
        ry = ry.unsqueeze(1).expand(n, c, H, H).reshape(n * c, H, H)
        return torch.bmm(ry, cols.view(n * c, H, W)).view(n, c, H, W)

    def apply_mask(self, m, top, left, height, width):
        n, k, H, W = m.shape

        def nearest(start: Tensor, length: Tensor, size: int) -> Tensor:  # interpolate's "nearest"
            o = torch.arange(size, dtype=torch.float32)
            src = (o * (length.float()[:, None] / size)).floor().long()
            return (start[:, None] + torch.minimum(src, length[:, None] - 1)).to(m.device)

        rows, cols = nearest(top, height, H), nearest(left, width, W)  # (N, H), (N, W)
        m = m.gather(2, rows.view(n, 1, H, 1).expand(n, k, H, W))
        return m.gather(3, cols.view(n, 1, 1, W).expand(n, k, H, W))


def _grid(x: Tensor) -> Tensor:
    """The identity sampling grid ``(N, H, W, 2)`` in grid_sample's (align_corners=False) units."""
    n, _, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).expand(n, h, w, 2)


class Rotate(BatchOp):
    """Rotation by ``U(-degrees, degrees)`` about the centre, nearest sampling, zero fill."""

    def __init__(self, degrees: float):
        self.degrees = degrees

    def sample(self, x, g):
        return {"angle": _uniform(len(x), -self.degrees, self.degrees, g)}

    def apply(self, x, angle):
        return F.grid_sample(x, self.grid(x, angle), mode="nearest", padding_mode="zeros",
                             align_corners=False)

    def apply_mask(self, m, angle):
        return self.apply(m.float(), angle).to(m.dtype)

    @staticmethod
    def grid(x: Tensor, angle: Tensor) -> Tensor:
        _, _, h, w = x.shape
        a = torch.deg2rad(angle.double())
        cos, sin = torch.cos(a), torch.sin(a)
        grid = _grid(x).double()
        px, py = grid[..., 0] * (w / 2), grid[..., 1] * (h / 2)  # pixels from the centre, y down
        c, s = cos.view(-1, 1, 1), sin.view(-1, 1, 1)
        # an output pixel shows the input pixel rotated back by the angle (counter-clockwise
        # on screen for positive angles, as torchvision)
        sx, sy = c * px - s * py, s * px + c * py
        return torch.stack((sx / (w / 2), sy / (h / 2)), dim=-1).to(x.dtype)


class Elastic(BatchOp):
    """Elastic deformation: per-sample noise fields blurred by σ, scaled by α, then resampled."""

    def __init__(self, alpha: float, sigma: float, p: float):
        self.alpha, self.sigma, self.p = alpha, sigma, p

    def sample(self, x, g):
        n, _, h, w = x.shape
        noise = torch.rand(n, 2, h, w, generator=g) * 2 - 1
        sigma = min(self.sigma, (min(h, w) - 1) / 8)  # the kernel (8σ) must fit, as the v2 path
        if sigma > 0:
            k = int(8 * sigma + 1)
            k += 1 - k % 2
            noise = separable_blur(noise, gaussian_kernels(torch.full((n,), sigma), k))
        shift = noise * self.alpha / torch.tensor([w, h], dtype=noise.dtype).view(1, 2, 1, 1)
        return {"displacement": shift.permute(0, 2, 3, 1), "on": _coin(n, self.p, g)}

    def apply(self, x, displacement, on, mode="bilinear"):
        moved = F.grid_sample(x, _grid(x) + displacement.to(x.device, x.dtype), mode=mode,
                              padding_mode="zeros", align_corners=False)
        return torch.where(on.to(x.device).view(-1, 1, 1, 1), moved, x)

    def apply_mask(self, m, displacement, on):
        return self.apply(m.float(), displacement, on, mode="nearest").to(m.dtype)


class Blur(BatchOp):
    """Gaussian blur with σ ~ U(sigma) per sample (kernel ≈ 6σ, shrunk to fit small images)."""

    def __init__(self, sigma: tuple[float, float], p: float):
        self.sigma, self.p = sigma, p
        self.kernel = 2 * round(3 * sigma[1]) + 1

    def sample(self, x, g):
        return {"sigma": _uniform(len(x), *self.sigma, g), "on": _coin(len(x), self.p, g)}

    def apply(self, x, sigma, on):
        h, w = x.shape[-2:]
        k = min(self.kernel, max(1, 2 * (min(h, w) // 2) - 1))
        blurred = separable_blur(x, gaussian_kernels(sigma, k))
        return torch.where(on.to(x.device).view(-1, 1, 1, 1), blurred, x)


class Sharpness(CoinOp):
    """Blend with torchvision's 3x3 smoothing (borders kept) by ``factor``, with probability p."""

    def __init__(self, factor: float, p: float):
        self.factor, self.p = factor, p

    def effect(self, x):
        c, h, w = x.shape[1:]
        if h <= 2 or w <= 2:
            return x
        kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
        kernel[1, 1] = 5
        kernel = (kernel / 13).expand(c, 1, 3, 3)
        smooth = F.conv2d(x, kernel, groups=c)  # (N, C, H-2, W-2)
        out = x.clone()
        inner = out[..., 1:-1, 1:-1]
        inner.add_((smooth - inner) * (1 - self.factor))
        return out.clamp_(0, 1)


class Jitter(BatchOp):
    """ColorJitter: brightness, contrast, saturation, hue factors and order drawn per sample."""

    def __init__(self, brightness: float, contrast: float | None, saturation: float | None, hue: float):
        c = brightness if contrast is None else contrast
        s = brightness if saturation is None else saturation

        def span(v: float) -> tuple[float, float] | None:
            return None if v == 0 else (max(0.0, 1 - v), 1 + v)

        self.ranges = [span(brightness), span(c), span(s), None if hue == 0 else (-hue, hue)]

    def sample(self, x, g):
        n = len(x)
        order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
        factors = torch.stack([_uniform(n, *r, g) if r else torch.ones(n, dtype=torch.float64)
                               for r in self.ranges], dim=1)
        return {"order": order, "factors": factors}

    @staticmethod
    def adjust(x: Tensor, op: int, f: Tensor) -> Tensor:
        fv = _view(f, x)
        if op == 0:  # brightness
            return (x * fv).clamp_(0, 1)
        if op == 1:  # contrast: towards the mean luma of each image
            mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
            return (x * fv).add_(mean * (1 - fv)).clamp_(0, 1)
        if op == 2:  # saturation: towards the image's own grayscale
            if x.shape[1] == 1:
                return x
            return (x * fv).add_(grayscale(x) * (1 - fv)).clamp_(0, 1)
        return adjust_hue(x, f)

    def apply(self, x, order, factors):
        out = x.clone()
        for position in range(4):
            for op, r in enumerate(self.ranges):
                if r is None:
                    continue
                rows = (order[:, position] == op).nonzero()[:, 0]
                if len(rows):
                    idx = rows.to(x.device)
                    out[idx] = self.adjust(out[idx], op, factors[rows, op])
        return out


class Gray(CoinOp):
    def __init__(self, p: float):
        self.p = p

    def effect(self, x):
        return grayscale(x).expand_as(x)


class Posterize(CoinOp):
    def __init__(self, bits: int, p: float):
        self.bits, self.p = bits, p

    def effect(self, x):
        levels = 1 << self.bits
        return (x * levels).floor().clamp(0, levels - 1) / levels


class Solarize(CoinOp):
    def __init__(self, threshold: float, p: float):
        self.threshold, self.p = threshold, p

    def effect(self, x):
        return torch.where(x >= self.threshold, 1 - x, x)


class Erase(BatchOp):
    """Random erasing: a zero rectangle of area fraction ``U(scale)``, aspect in [0.3, 3.3]."""

    def __init__(self, p: float, scale: tuple[float, float]):
        self.p, self.scale = p, scale

    def sample(self, x, g):
        n, _, height, width = x.shape
        on = _coin(n, self.p, g)
        across, along = _box_attempts(n, height, width, self.scale, (0.3, 3.3), g)
        h_all, w_all = along, across  # RandomErasing: h = √(area·aspect), w = √(area/aspect)
        first, found = _first_valid((h_all < height) & (w_all < width))
        h, w = h_all.gather(1, first[:, None])[:, 0], w_all.gather(1, first[:, None])[:, 0]
        on = on & found
        top = _randint(torch.zeros_like(h), (height - h + 1).clamp(min=1), g)
        left = _randint(torch.zeros_like(w), (width - w + 1).clamp(min=1), g)
        zero = torch.zeros_like(h)
        return {"top": torch.where(on, top, zero), "left": torch.where(on, left, zero),
                "height": torch.where(on, h, zero), "width": torch.where(on, w, zero)}

    def apply(self, x, top, left, height, width):
        _, _, h, w = x.shape
        dev = x.device
        ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
        t, l_ = top.to(dev).view(-1, 1), left.to(dev).view(-1, 1)
        inside_y = (ys >= t) & (ys < t + height.to(dev).view(-1, 1))  # (N, H)
        inside_x = (xs >= l_) & (xs < l_ + width.to(dev).view(-1, 1))  # (N, W)
        box = (inside_y[:, :, None] & inside_x[:, None, :]).unsqueeze(1)
        return x.masked_fill(box, 0.0)


BUILDERS: dict[str, Any] = {
    "hflip": lambda p: Flip(p, -1),
    "vflip": lambda p: Flip(p, -2),
    "crop": Crop,
    "rotate": Rotate,
    "jitter": Jitter,
    "blur": Blur,
    "sharpness": Sharpness,
    "elastic": Elastic,
    "posterize": Posterize,
    "solarize": Solarize,
    "gray": Gray,
    "erase": Erase,
}


class BatchAugment:
    """The batched counterpart of :class:`~divekit.data.augment.Augment` (training only).

    ``BatchAugment("standard")(x)`` augments a ``(N, C, H, W)`` float batch in ``[0, 1]`` (1 or 3
    channels) with per-sample random parameters; ``generator`` fixes the draws. With ``masks``
    (``(N, H, W)`` class maps or ``(N, K, H, W)`` instance masks, any dtype) it returns
    ``(images, masks)``, the masks moved by the same flips, crops, rotations and deformations
    (nearest neighbour; 0 where a rotation brings in pixels from outside) and untouched by the
    colour operations: the joint transform segmentation needs.
    """

    def __init__(self, spec: str | None = "none"):
        self.spec = spec or "none"
        self.ops = [BUILDERS[name](*values) for name, values in parse_spec(spec)]

    def __repr__(self) -> str:
        return f"BatchAugment({self.spec!r})"

    @property
    def is_identity(self) -> bool:
        return not self.ops

    def __call__(self, x: Tensor, masks: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if isinstance(masks, torch.Generator):  # aug(x, generator) reads naturally too
            masks, generator = None, masks
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise DivekitError(f"expected a batch (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise DivekitError(f"expected float images in [0, 1], got {x.dtype}")
        m = None
        if masks is not None:
            if masks.ndim not in (3, 4) or masks.shape[0] != x.shape[0] or masks.shape[-2:] != x.shape[-2:]:
                raise DivekitError(f"masks of shape {tuple(masks.shape)} do not match images "
                                   f"{tuple(x.shape)}: expected (N, H, W) or (N, K, H, W)")
            m = masks if masks.ndim == 4 else masks.unsqueeze(1)
        out = x
        if len(x):
            with torch.autocast(x.device.type, enabled=False):
                out = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
                pending: dict[str, Tensor] = {}  # a flip waiting to be folded into a crop
                for i, op in enumerate(self.ops):
                    params = op.sample(out, generator)
                    if m is None and isinstance(op, Flip) and op.dim in (-1, -2, 2, 3) \
                            and i + 1 < len(self.ops) and isinstance(self.ops[i + 1], Crop):
                        key = "hflip" if op.dim in (-1, 3) else "vflip"
                        if key not in pending:
                            pending[key] = params["flip"]  # the crop's matrices do it
                            continue
                    if pending and isinstance(op, Crop):
                        params = {**params, **pending}
                        pending = {}
                    out = op.apply(out, **params)
                    if m is not None:
                        m = op.apply_mask(m, **params)
            out = out.to(x.dtype)
        if masks is None:
            return out
        return out, (m if masks.ndim == 4 else m[:, 0])


__all__ = ["BUILDERS", "PRESETS", "BatchAugment", "BatchOp", "bilinear_matrix", "grayscale"]
