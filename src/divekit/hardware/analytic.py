"""Closed-form cycle counts of a matrix product on an R×C systolic array.

A product ``(M×K)·(K×N)`` is mapped per dataflow onto the array as a *spatial* pair
``(Sr, Sc)`` (what the rows and columns hold) and a *temporal* length ``T`` (what streams by):

============  ======================  ====================  ===================
dataflow      rows hold (Sr)          columns hold (Sc)     streams (T)
============  ======================  ====================  ===================
``ws``        K (reduction)           N (filters)           M (output pixels)
``is``        K (reduction)           M (output pixels)     N (filters)
``os``        M (output pixels)       N (filters)           K (reduction)
============  ======================  ====================  ===================

Folds (tiles): ``F = ceil(Sr/R) · ceil(Sc/C)``; the edge tiles are zero-padded.

Cycles of one fold, as the cycle-accurate simulator (:mod:`divekit.hardware.systolic`) measures
them (native convention):

* ``ws``/``is``: ``R`` cycles preload the stationary operand (one row per cycle), then
  ``T + R + C - 2`` cycles stream the skewed operand until the last partial sum leaves the bottom
  row: ``2R + C + T - 2``.
* ``os``: ``T + R + C - 2`` cycles until the last multiply-accumulate in PE(R-1, C-1), then ``R``
  cycles shift the finished outputs out of the bottom: ``2R + C + T - 2``.

Totals: ``F · (2R + C + T - 2)``. With ``overlap=True`` the next fold's fill (the stationary
preload for ws/is, the start of the next fold for os) runs under the previous fold's tail (double-
buffered registers), so only the first preload / the last drain is exposed:
``F · (R + C + T - 2) + R``.

SCALE-Sim v2 convention (``convention="scalesim"``): ws/is per fold ``2R + C + T - 2``, os per
fold ``R + C + T - 2`` (it does not count the output drain), and the reported total is the index
of the last cycle, ``F · per_fold - 1``.

Utilisation ``= M·N·K / (R·C·cycles)``. Mapping efficiency ``= Sr·Sc / (F·R·C)`` (the mean over
folds of the fraction of PEs that hold real data). SCALE-Sim's "Compute Util" is the unweighted
mean over folds of ``used_PEs·T / (R·C·c_f)`` with its own per-fold ``c_f`` (ws/is
``2R + 2C + T - 3``, os ``R + C + T - 2``), which equals ``Sr·Sc·T / (F·R·C·c_f)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from divekit.errors import DivekitError

DATAFLOWS = ("ws", "os", "is")
CONVENTIONS = ("native", "scalesim")


@dataclass(frozen=True)
class ArraySpec:
    """An R×C systolic array and how it runs."""

    rows: int
    cols: int
    dataflow: str = "ws"

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.cols <= 0:
            raise DivekitError(f"array must be at least 1x1, got {self.rows}x{self.cols}")
        if self.dataflow not in DATAFLOWS:
            raise DivekitError(f"dataflow must be one of {', '.join(DATAFLOWS)}, "
                               f"got {self.dataflow!r}")

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols} {self.dataflow}"


# the longest array side --array takes (the closed forms hold at any size; 65536 x 65536 is
# 4 G PEs, a thousand times a TPU v1)
MAX_ARRAY_SIDE = 65536


def parse_array(text: str) -> tuple[int, int]:
    """``"128x128"`` → ``(128, 128)``; ``"64"`` → ``(64, 64)``; anything else is a user error."""
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2:
        raise DivekitError(f"--array must be ROWSxCOLS with positive integers, e.g. 128x128; "
                           f"got {text!r}")
    if min(dims) <= 0:
        raise DivekitError(f"--array must be at least 1x1, got {text!r}")
    if max(dims) > MAX_ARRAY_SIDE:
        raise DivekitError(f"--array sides must be at most {MAX_ARRAY_SIDE}, got {text!r}")
    return dims[0], dims[1]


@dataclass(frozen=True)
class GemmStats:
    """Cycle accounting of one ``(M×K)·(K×N)`` product on one array."""

    m: int
    n: int
    k: int
    rows: int
    cols: int
    dataflow: str
    folds: int
    cycles: int
    macs: int  # useful multiply-accumulates, M·N·K
    mapping_efficiency: float  # Sr·Sc / (F·R·C)
    utilisation: float  # macs / (R·C·cycles)
    compute_util: float  # SCALE-Sim's per-fold mean (see module docstring)


def spatio_temporal(m: int, n: int, k: int, dataflow: str) -> tuple[int, int, int]:
    """``(Sr, Sc, T)`` of the product for the dataflow (see the module's table)."""
    if dataflow == "ws":
        return k, n, m
    if dataflow == "is":
        return k, m, n
    if dataflow == "os":
        return m, n, k
    raise DivekitError(f"dataflow must be one of {', '.join(DATAFLOWS)}, got {dataflow!r}")


def fold_counts(m: int, n: int, k: int, rows: int, cols: int, dataflow: str) -> tuple[int, int]:
    """``(row folds, column folds)``: ``ceil(Sr/R)``, ``ceil(Sc/C)``."""
    sr, sc, _ = spatio_temporal(m, n, k, dataflow)
    return math.ceil(sr / rows), math.ceil(sc / cols)


def fold_cycles(rows: int, cols: int, t: int, dataflow: str, convention: str = "native") -> int:
    """Cycles of one fold: ``2R + C + T - 2`` (SCALE-Sim os: ``R + C + T - 2``)."""
    if convention == "scalesim" and dataflow == "os":
        return rows + cols + t - 2
    return 2 * rows + cols + t - 2


def gemm_cycles(m: int, n: int, k: int, array: ArraySpec, *, convention: str = "native",
                overlap: bool = False) -> GemmStats:
    """Closed-form :class:`GemmStats` of ``(M×K)·(K×N)`` on ``array`` (formulas: module doc)."""
    if min(m, n, k) <= 0:
        raise DivekitError(f"matrix product dimensions must be positive, got M={m} N={n} K={k}")
    if convention not in CONVENTIONS:
        raise DivekitError(f"convention must be one of {', '.join(CONVENTIONS)}")
    r, c, df = array.rows, array.cols, array.dataflow
    sr, sc, t = spatio_temporal(m, n, k, df)
    fr, fc = math.ceil(sr / r), math.ceil(sc / c)
    folds = fr * fc
    if convention == "scalesim":
        cycles = folds * fold_cycles(r, c, t, df, "scalesim") - 1
        util_fold_cycles = r + c + t - 2 if df == "os" else 2 * r + 2 * c + t - 3
    else:
        per_fold = fold_cycles(r, c, t, df)
        cycles = folds * (per_fold - r) + r if overlap else folds * per_fold
        util_fold_cycles = per_fold
    macs = m * n * k
    return GemmStats(
        m=m, n=n, k=k, rows=r, cols=c, dataflow=df, folds=folds, cycles=cycles, macs=macs,
        mapping_efficiency=sr * sc / (folds * r * c),
        utilisation=macs / (r * c * cycles) if cycles else float("nan"),
        compute_util=sr * sc * t / (folds * r * c * util_fold_cycles),
    )
