"""Batch-size curves and array-shape sweeps of a traced model (analytic mode), with pictures.

Batching: a layer's M grows with the batch (M = batch · output pixels), so the fill, skew and
drain of every fold, and the preload of every stationary tile, are paid once per batch instead
of once per sample: per-sample latency = cycles(batch) / (batch · clock) falls and utilisation
= MACs / (PEs · cycles) rises with the batch, most for dense layers whose M is the batch itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from divekit.hardware.analytic import DATAFLOWS, ArraySpec
from divekit.hardware.scalesim_io import atomic_write
from divekit.hardware.zoo import TracedLayer, map_layers, table_lines

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_ARRAYS = ((32, 32), (64, 64), (128, 128), (256, 256), (32, 128), (128, 32),
                  (64, 256), (256, 64))


@dataclass(frozen=True)
class Point:
    """One (array, dataflow, batch) point: total cycles, utilisation, milliseconds per sample."""

    rows: int
    cols: int
    dataflow: str
    batch: int
    cycles: int
    utilisation: float
    ms_per_sample: float


def evaluate(traced: list[TracedLayer], array: ArraySpec, batch: int, clock_ghz: float,
             overlap: bool = False) -> Point:
    layers = map_layers(traced, array, batch=batch, overlap=overlap)
    cycles = sum(layer.cycles for layer in layers)
    macs = sum(layer.macs for layer in layers)
    return Point(array.rows, array.cols, array.dataflow, batch, cycles,
                 macs / (array.pes * cycles), cycles / (clock_ghz * 1e6) / batch)


def batch_curve(traced: list[TracedLayer], array: ArraySpec, clock_ghz: float,
                batches: tuple[int, ...] = DEFAULT_BATCHES, overlap: bool = False
                ) -> list[Point]:
    return [evaluate(traced, array, b, clock_ghz, overlap) for b in batches]


def sweep(traced: list[TracedLayer], clock_ghz: float, batch: int = 1,
          arrays: tuple[tuple[int, int], ...] = DEFAULT_ARRAYS,
          dataflows: tuple[str, ...] = DATAFLOWS, overlap: bool = False) -> list[Point]:
    return [evaluate(traced, ArraySpec(r, c, df), batch, clock_ghz, overlap)
            for r, c in arrays for df in dataflows]


def format_points(points: list[Point], title: str) -> str:
    head = ("array", "dataflow", "batch", "cycles", "util %", "ms/sample")
    rows = [head] + [(f"{p.rows}x{p.cols}", p.dataflow, str(p.batch), f"{p.cycles:,}",
                      f"{100 * p.utilisation:.1f}", f"{p.ms_per_sample:.4f}") for p in points]
    return "\n".join(table_lines(title, rows))


def _save(fig, path: str | os.PathLike) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())


def plot_batching(points: list[Point], path: str | os.PathLike, title: str) -> None:
    """Utilisation and per-sample latency against batch size (log2 x axis)."""
    from matplotlib.figure import Figure

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
    _save(fig, path)


def plot_sweep(points: list[Point], path: str | os.PathLike, title: str) -> None:
    """Grouped bars: utilisation of each array shape, one bar per dataflow."""
    from matplotlib.figure import Figure

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
    _save(fig, path)
