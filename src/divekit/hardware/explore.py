"""Batch-size curves and array-shape sweeps of a traced model (analytic mode); their
pictures are :func:`divekit.viz.plot_batching` and :func:`divekit.viz.plot_sweep`.

Batching: a layer's M grows with the batch (M = batch · output pixels), so the fill, skew and
drain of every fold, and the preload of every stationary tile, are paid once per batch instead
of once per sample: per-sample latency = cycles(batch) / (batch · clock) falls and utilisation
= MACs / (PEs · cycles) rises with the batch, most for dense layers whose M is the batch itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from divekit.hardware.analytic import DATAFLOWS, ArraySpec
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
