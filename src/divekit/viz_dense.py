"""Pictures of dense predictions: segmentation overlays with a legend, pixel confusion
matrices, style-transfer loss curves and side-by-side panels.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state, no backend switch)
and written atomically (:func:`divekit.viz.save_figure`), so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from divekit.viz import save_figure


def _hwc(image: Tensor) -> np.ndarray:
    """``(3, H, W)`` uint8 or float in [0, 1] → ``(H, W, 3)`` float array in [0, 1]."""
    x = image.detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
    return x.permute(1, 2, 0).numpy()


def blend(image: Tensor, label_map: Tensor, colormap: Sequence[tuple[int, int, int]],
          alpha: float = 0.5) -> np.ndarray:
    """``(1 - α)·image + α·colour(class)`` per pixel, ``(H, W, 3)`` in [0, 1]."""
    palette = np.asarray(colormap, dtype=np.float32) / 255
    colours = palette[label_map.cpu().numpy().astype(np.int64)]
    return (1 - alpha) * _hwc(image) + alpha * colours


def plot_overlay(image: Tensor, label_map: Tensor, classes: Sequence[str],
                 colormap: Sequence[tuple[int, int, int]], path: str | os.PathLike,
                 alpha: float = 0.5) -> Path:
    """The image beside its class colours blended over it, with a legend of the classes
    present (and their share of the pixels)."""
    h, w = label_map.shape
    scale = 4.0 / max(h, w)
    fig = Figure(figsize=(2 * w * scale + 2.2, h * scale + 0.4))
    ax_img, ax_seg = fig.subplots(1, 2)
    ax_img.imshow(_hwc(image))
    ax_img.set_title("image", fontsize=9)
    ax_seg.imshow(blend(image, label_map, colormap, alpha))
    ax_seg.set_title("segmentation", fontsize=9)
    for ax in (ax_img, ax_seg):
        ax.axis("off")
    counts = torch.bincount(label_map.flatten().long(), minlength=len(classes))
    handles = [Patch(facecolor=np.asarray(colormap[c]) / 255, edgecolor="black", linewidth=0.5,
                     label=f"{classes[c]} {100 * n / label_map.numel():.1f}%")
               for c, n in enumerate(counts.tolist()) if n]
    ax_seg.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8,
                  frameon=False, title="classes", title_fontsize=8)
    return save_figure(fig, path)


def plot_pixel_confusion(matrix: Tensor, classes: Sequence[str], path: str | os.PathLike,
                         title: str = "") -> Path:
    """Rows: true class, columns: predicted; colour and text are each row's fraction (pixel
    counts run to millions, fractions stay readable)."""
    counts = np.asarray(matrix, dtype=np.float64)
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    size = max(3.5, 0.42 * k + 1.5)
    fig = Figure(figsize=(size + 0.8, size))
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, f"{100 * frac[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(k), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "pixel confusion matrix (% of each true class)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path)


def plot_loss_curves(history: Mapping[str, Sequence[float]], path: str | os.PathLike,
                     title: str = "style transfer") -> Path:
    """The weighted content, style and TV losses (and their total) against the step, log scale."""
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.subplots()
    for name, values in history.items():
        if len(values):
            ax.plot(range(1, len(values) + 1), values, label=name,
                    linewidth=2 if name == "total" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_side_by_side(images: Sequence[Tensor], titles: Sequence[str], path: str | os.PathLike,
                      height: float = 3.0, suptitle: str | None = None) -> Path:
    """Images ``(3, H, W)`` in a row, each with its title (content, style, result)."""
    widths = [img.shape[-1] / img.shape[-2] for img in images]
    fig = Figure(figsize=(height * sum(widths) + 0.3, height + 0.5))
    axes = fig.subplots(1, len(images), width_ratios=widths, squeeze=False)[0]
    for ax, img, title in zip(axes, images, titles):
        ax.imshow(_hwc(img))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return save_figure(fig, path)
