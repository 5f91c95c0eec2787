"""Every picture divekit draws, with Matplotlib's object API: a :class:`~matplotlib.figure.Figure`
renders through the Agg canvas with no screen and no global backend switch, so importing divekit
in a notebook leaves its backend alone."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from divekit.errors import DivekitError
from divekit.ops.conv import as_4d


def _subplots(nrows: int = 1, ncols: int = 1, **kw):
    """``plt.subplots`` without pyplot: a Figure (Agg canvas) and its axes."""
    fig = Figure(figsize=kw.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kw)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120, tight: bool = True) -> Path:
    """Render to memory, then write atomically: a reader never sees half a PNG. ``tight``:
    crop the page to what is drawn (else the figure's own size, as its layout placed it)."""
    from divekit.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
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
    fig, axes = _subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
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


def plot_image_grid(images: Sequence, path: str | os.PathLike, titles: Sequence[str] | None = None,
                    ncols: int = 4, scale: float = 2.0) -> Path:
    """Images ``(C, H, W)`` in [0, 1] (1 or 3 channels) in a grid, one optional title each."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = _subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i].detach().float().clamp(0, 1).cpu()
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        if titles is not None and i < len(titles):
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion_matrix(matrix, classes: Sequence[str], path: str | os.PathLike,
                          title: str = "") -> Path:
    """Rows: true class, columns: predicted; colour is the row's fraction, text the count."""
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    frac = counts / np.maximum(rows, 1)
    k = len(classes)
    size = max(3.5, 0.45 * k + 1.5)
    fig, ax = _subplots(figsize=(size + 0.8, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=90 if k > 10 else 0, fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    diag = np.diag(frac)
    ax.set_title(title or f"confusion matrix (mean per-class accuracy {diag.mean():.3f})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_detections(images: Sequence, detections: Sequence, classes: Sequence[str],
                    path: str | os.PathLike, ncols: int = 4, scale: float = 3.0) -> Path:
    """Images ``(3, H, W)`` in [0, 1] with their boxes drawn and labelled ``class score``.

    ``detections[i]`` holds image ``i``'s rows ``[class, score, x1, y1, x2, y2]`` (corner,
    normalised to [0, 1]); a colour per class.
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = _subplots(nrows, ncols, figsize=(scale * ncols, scale * nrows), squeeze=False)
    palette = colormaps["tab10"]
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i].detach().float().clamp(0, 1).cpu()
        h, w = img.shape[-2:]
        ax.imshow(img.permute(1, 2, 0).numpy())
        for row in detections[i].tolist():
            c, score, x1, y1, x2, y2 = row
            colour = palette(int(c) % 10)
            ax.add_patch(Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h,
                                       fill=False, edgecolor=colour, linewidth=2))
            name = classes[int(c)] if 0 <= int(c) < len(classes) else str(int(c))
            ax.text(x1 * w, y1 * h, f"{name} {score:.2f}", fontsize=7, color="white",
                    va="bottom", bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0})
    fig.tight_layout()
    return save_figure(fig, path)


def plot_attention(weights, path: str | os.PathLike, *, xlabel: str = "keys", ylabel: str = "queries",
                   titles: Sequence[str] | None = None, xticks: Sequence[str] | None = None,
                   yticks: Sequence[str] | None = None, cmap: str = "Reds") -> Path:
    """Attention weights as heat maps (the course's ``show_heatmaps``).

    ``weights``: ``(Q, K)``, ``(panels, Q, K)`` (e.g. one per head) or ``(rows, cols, Q, K)``;
    one shared colour scale; ``xticks`` / ``yticks`` label keys and queries (tokens).
    """
    import numpy as np

    w = np.asarray(weights.detach().float().cpu() if hasattr(weights, "detach") else weights, dtype=np.float32)
    w = as_4d(w, "attention weights")
    rows, cols, q, k = w.shape
    cell = min(2.5, max(0.9, 0.22 * max(q, k)))
    fig, axes = _subplots(rows, cols, figsize=(cell * cols + 0.8, cell * rows), squeeze=False,
                             sharex=True, sharey=True)
    vmax = float(w.max()) if w.size else 1.0
    image = None
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            image = ax.imshow(w[i, j], cmap=cmap, vmin=0, vmax=vmax or 1.0, aspect="auto")
            if titles is not None and i * cols + j < len(titles):
                ax.set_title(titles[i * cols + j], fontsize=9)
            if i == rows - 1:
                ax.set_xlabel(xlabel)
                if xticks is not None:
                    ax.set_xticks(range(k), xticks, rotation=90, fontsize=7)
            if j == 0:
                ax.set_ylabel(ylabel)
                if yticks is not None:
                    ax.set_yticks(range(q), yticks, fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6)
    return save_figure(fig, path)


def plot_kernel_fit(result, name: str, path: str | os.PathLike) -> Path:
    """One kernel-regression method's fit against the truth, with the noisy training points.

    ``result`` is :func:`divekit.models.kernel_regression.kernel_regression`'s
    ``KernelRegressionResult``: its ``data`` (``x_train``, ``y_train``, ``x_test``, ``y_truth``),
    ``predictions[name]`` and ``test_mse[name]`` (shown in the title)."""
    d = result.data
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot(d.x_test, d.y_truth, label="truth")
    ax.plot(d.x_test, result.predictions[name].detach(), "--", label="prediction")
    ax.plot(d.x_train, d.y_train, "o", alpha=0.5, markersize=4, label="training points")
    ax.set(xlabel="x", ylabel="y", xlim=(0, 5), title=f"{name} (test MSE "
           f"{result.test_mse[name]:.3f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _sorted_counts(freqs) -> list[int]:
    """Counts, most frequent first, from a Counter, ``(item, count)`` pairs, or plain counts."""
    if isinstance(freqs, dict):
        counts = list(freqs.values())
    else:
        counts = [f[1] if isinstance(f, tuple | list) else f for f in freqs]
    return sorted((int(c) for c in counts), reverse=True)


def plot_zipf(freq_lists: Sequence, labels: Sequence[str], path: str | os.PathLike, *,
              title: str = "Zipf's law") -> Path:
    """Save the log-log plot of frequency against rank, one line per table, as a PNG: word
    frequencies follow Zipf's law (a straight line), and so do bigrams and trigrams, with a
    smaller slope (the course's "Language Models" section).

    Each entry of ``freq_lists`` is a ``Counter`` (e.g. from
    :func:`divekit.data.lm_stats.bigram_freqs`), a list of ``(item, count)`` pairs
    (``Vocab.token_freqs``) or a list of counts.
    """
    if len(freq_lists) != len(labels):
        raise DivekitError(f"got {len(freq_lists)} frequency tables but {len(labels)} labels")
    fig, ax = _subplots(figsize=(5, 3.5))
    for freqs, label in zip(freq_lists, labels):
        counts = _sorted_counts(freqs)
        if not counts:
            raise DivekitError(f"frequency table {label!r} is empty")
        ax.loglog(range(1, len(counts) + 1), counts, label=label)
    ax.set_xlabel("token: x (rank)")
    ax.set_ylabel("frequency: n(x)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, dpi=100, tight=False)


def plot_k_step(result: dict, path: str | os.PathLike) -> Path:
    """The course's k-step predictions of a noisy sine, in three panels: the data with 1-step
    and multistep MLP predictions; the MLP's k-step predictions; the GRU's. ``result`` is what
    :func:`divekit.tasks.sequence.run` returns."""
    cfg, t, x = result["config"], result["time"], result["x"]
    fig = Figure(figsize=(7, 8), layout="tight")
    axes = fig.subplots(3, 1, sharex=True)
    axes[0].plot(t, x, color="0.7", lw=1, label="data")
    axes[0].plot(t, result["mlp_preds"][1], lw=1, label="MLP 1-step")
    axes[0].plot(t, result["mlp_multistep"], lw=1.5,
                 label=f"MLP multistep (from t={cfg['n_train']})")
    for ax, key, name in ((axes[1], "mlp_preds", f"MLP, τ={cfg['tau']}"),
                          (axes[2], "rnn_preds", "GRU (latent state)")):
        ax.plot(t, x, color="0.8", lw=1, label="data")
        for k, pred in result[key].items():
            mse = result["mse"]["mlp" if key == "mlp_preds" else "rnn"][k]
            ax.plot(t, pred, lw=1, label=f"{k}-step (test MSE {mse:.3f})")
        ax.set_title(name, fontsize=10)
    for ax in axes:
        ax.axvline(cfg["n_train"], color="k", ls=":", lw=0.8)
        ax.set_ylabel("x")
        ax.set_ylim(-2, 2)
        ax.legend(fontsize=7, loc="lower left", ncol=2)
    axes[0].set_title("noisy sine: x_t = sin(0.01 t) + N(0, 0.2²)", fontsize=10)
    axes[2].set_xlabel("time")
    return save_figure(fig, path)


def plot_plan(plan, path: str | os.PathLike, *, target: float, note: str = "") -> Path:
    """``divekit dist plan --plot``: scaling efficiency against devices (left), and the global
    batch allreduce needs for ``target`` efficiency against devices (right).

    ``plan`` is :func:`divekit.engine.planner.plan`'s ``Plan``: its ``rows`` (``devices``,
    ``steps`` and ``efficiencies`` by strategy, ``batch_for_80``), ``cost.name``, ``batch`` and
    ``verdict(strategy)``; ``note`` is the line above the panels (the plan's inputs)."""
    fig, (ax, bx) = _subplots(1, 2, figsize=(11, 4.2))
    ns = [r.devices for r in plan.rows]
    for s in plan.rows[0].steps:
        pts = [(r.devices, r.efficiencies[s]) for r in plan.rows if r.efficiencies[s] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=s)
    ax.axhline(target, color="grey", ls="--", lw=1)
    last = plan.verdict("allreduce")["last_efficient"]
    if last is not None:
        ax.axvline(last, color="C0", ls=":", lw=1)
        ax.annotate(f"allreduce >= {target:.0%}\nup to N={last}", (last, target), fontsize=8,
                    xytext=(5, 8), textcoords="offset points")
    ax.set(xscale="log", xlabel="devices N", ylabel="efficiency T(1) / (N T(N))", ylim=(0, 1.05),
           title=f"{plan.cost.name}, G = {plan.batch}")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    pts = [(r.devices, r.batch_for_80) for r in plan.rows if r.batch_for_80 is not None]
    if pts:
        bx.plot(*zip(*pts), marker="o", ms=3, color="C0", label=f"allreduce: G for {target:.0%}")
    bx.axhline(plan.batch, color="grey", ls="--", lw=1, label=f"G = {plan.batch}")
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set(xlabel="devices N", ylabel="global batch", xlim=(min(ns), max(ns) or 1),
           title="the batch at which data parallelism pays again")
    bx.legend(fontsize=8)
    fig.suptitle(note, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110, tight=False)


def plot_batching(points: Sequence, path: str | os.PathLike, title: str) -> Path:
    """``divekit hw ... --plot``: a systolic array's utilisation and per-sample latency against
    the batch size (log2 x axis). ``points``: :func:`divekit.hardware.explore.batch_curve`'s,
    each with ``batch``, ``utilisation`` (a fraction) and ``ms_per_sample``."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax_u, ax_l = fig.subplots(1, 2)
    batches = [p.batch for p in points]
    ax_u.plot(batches, [100 * p.utilisation for p in points], "o-")
    ax_u.set(xscale="log", xlabel="batch size", ylabel="utilisation %", title="array utilisation")
    ax_u.set_xscale("log", base=2)
    ax_l.plot(batches, [p.ms_per_sample for p in points], "o-", color="tab:red")
    ax_l.set(xlabel="batch size", ylabel="ms per sample", title="latency per sample")
    ax_l.set_xscale("log", base=2)
    for ax in (ax_u, ax_l):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=110, tight=False)


def plot_sweep(points: Sequence, path: str | os.PathLike, title: str) -> Path:
    """``divekit hw sweep``: grouped bars, the utilisation of each array shape, one bar per
    dataflow. ``points``: :func:`divekit.hardware.explore.sweep`'s, each with ``rows``,
    ``cols``, ``dataflow`` and ``utilisation`` (a fraction)."""
    arrays = list(dict.fromkeys((p.rows, p.cols) for p in points))
    dataflows = list(dict.fromkeys(p.dataflow for p in points))
    util = {(p.rows, p.cols, p.dataflow): 100 * p.utilisation for p in points}
    fig = Figure(figsize=(max(6.0, 1.1 * len(arrays) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(dataflows)
    for i, df in enumerate(dataflows):
        xs = [j + (i - (len(dataflows) - 1) / 2) * width for j in range(len(arrays))]
        ax.bar(xs, [util[(r, c, df)] for r, c in arrays], width, label=df)
    ax.set_xticks(range(len(arrays)), [f"{r}x{c}" for r, c in arrays])
    ax.set(xlabel="array (rows x columns)", ylabel="utilisation %", title=title)
    ax.legend(title="dataflow")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, dpi=110, tight=False)
