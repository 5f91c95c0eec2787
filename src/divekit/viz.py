"""Every picture divekit draws. Matplotlib with the Agg backend: no screen needed."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render to memory, then write atomically: a reader never sees half a PNG."""
    from divekit.engine.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_curves(history: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """One panel per metric (loss, acc, ...), train and validation curves against the epoch.

    ``history`` rows hold ``epoch`` and keys like ``train_loss``, ``val_loss``, ``train_acc``.
    """
    metrics: list[str] = []
    for row in history:
        for key in row:
            for prefix in ("train_", "val_"):
                if key.startswith(prefix) and key[len(prefix) :] not in metrics:
                    metrics.append(key[len(prefix) :])
    metrics = metrics or ["loss"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    epochs = [row["epoch"] for row in history]
    for ax, metric in zip(axes[0], metrics):
        for prefix, style in (("train_", "-o"), ("val_", "--s")):
            key = prefix + metric
            points = [(e, r[key]) for e, r in zip(epochs, history) if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, label=prefix.rstrip("_"), markersize=3)
        values = [v for row in history for k, v in row.items()
                  if k.endswith("_" + metric) and isinstance(v, float) and v > 0]
        if metric == "loss" and values and max(values) / min(values) > 30:
            ax.set_yscale("log")  # one wild first epoch should not flatten the rest
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
