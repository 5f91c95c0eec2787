"""A cycle-accurate R×C systolic array that really computes ``A @ B``.

Each cycle moves every operand one processing element (PE) further, vectorised over the whole
grid with numpy (one array operation per cycle, never a Python loop over PEs). The folds (tiles)
of a product run the same timeline on different data, so a batch of folds is simulated side by
side as a leading axis; the array runs them one after another, so the total is the sum of the
per-fold timelines (see :mod:`divekit.hardware.analytic` for the closed forms they must equal).

Dataflows (``A`` is M×K, ``B`` is K×N):

* ``ws`` weight-stationary: a K×N tile of ``B`` is shifted in from the top, one row per cycle
  (``R`` cycles of preload). Rows of ``A`` then enter from the left edge, row ``i`` of the array
  skewed by ``i`` cycles, move right one PE per cycle; partial sums move down one PE per cycle
  and leave the bottom row as finished outputs (fill and skew ``R - 1`` and ``C - 1`` cycles).
* ``is`` input-stationary: the same machine with the roles swapped, ``(A B)ᵀ = Bᵀ Aᵀ``: a K×M tile
  of ``Aᵀ`` is preloaded and the columns of ``B`` stream through.
* ``os`` output-stationary: each PE owns one output. Rows of ``A`` enter from the left, columns
  of ``B`` from the top, both skewed; after the last multiply-accumulate the ``R`` rows of
  results are shifted out of the bottom (drain, ``R`` cycles).

Every operand carries a tag (its index along the streamed dimension); outputs are scattered into
the result by tag, and the loops stop when every output has left the array, so the cycle counts
are measured, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from divekit.errors import DivekitError
from divekit.hardware.analytic import CONVENTIONS, ArraySpec, GemmStats, spatio_temporal

_CHUNK_ELEMS = 2**24  # folds simulated side by side: at most ~16M float64 of output buffer
_CHUNK_PE = 2**17  # ... and at most ~128K PEs of state, so each per-cycle array stays in cache


@dataclass(frozen=True)
class FoldTimeline:
    """Measured phases of one fold: ``fill`` (preload, ws/is), ``run`` (until the last output
    leaves the array for ws/is; until the last multiply-accumulate for os), ``drain`` (os)."""

    fill: int
    run: int
    drain: int

    @property
    def total(self) -> int:
        return self.fill + self.run + self.drain


@dataclass(frozen=True)
class SimResult:
    output: np.ndarray  # (M, N) float64
    stats: GemmStats
    timeline: FoldTimeline


def _pad(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols), dtype=np.float64)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _valid_count(rows_valid: np.ndarray, cols_valid: np.ndarray) -> np.ndarray:
    """(F, R) and (F, C) bool → (R, C): in how many of the folds each PE holds real data."""
    return rows_valid.T.astype(np.int64) @ cols_valid.astype(np.int64)


def _skew(x: np.ndarray) -> np.ndarray:
    """(F, T, L) → (F, T + L - 1, L) with lane ``l`` delayed by ``l`` cycles (zeros elsewhere)."""
    f, t, lanes = x.shape
    out = np.zeros((f, t + lanes - 1, lanes), dtype=np.float64)
    out[:, np.arange(t)[:, None] + np.arange(lanes)[None, :], np.arange(lanes)] = x
    return out


def _skew_tags(t: int, lanes: int) -> np.ndarray:
    """(T + L - 1, L) int: the streamed index lane ``l`` holds at cycle ``s`` (``s - l``), or -1."""
    s = np.arange(t + lanes - 1)[:, None] - np.arange(lanes)[None, :]
    return np.where((s >= 0) & (s < t), s, -1)


def _ws_chunk(a_tiles: np.ndarray, w_tiles: np.ndarray, valid_count: np.ndarray
              ) -> tuple[np.ndarray, int, int, int]:
    """Weight-stationary run of F folds side by side.

    a_tiles (F, T, R): the streamed rows of each fold; w_tiles (F, R, C): stationary tiles;
    valid_count (R, C): in how many folds each PE holds a real (unpadded) weight. Returns
    (out (F, T, C), preload cycles, stream cycles, useful MACs).
    """
    f, t, r = a_tiles.shape
    c = w_tiles.shape[2]
    # Preload: rows enter at the top and shift down; the last row goes in first.
    w = np.zeros((f, r, c))
    fill = 0
    while fill < r:
        w[:, 1:] = w[:, :-1]
        w[:, 0] = w_tiles[:, r - 1 - fill]
        fill += 1
    x = _skew(a_tiles)  # (F, T+R-1, R): what the left edge of row i sees at each cycle
    x_tag = _skew_tags(t, r)  # (T+R-1, R)
    # Registers are double-buffered (this cycle's from last cycle's), as in hardware.
    a, a_next = np.zeros((f, r, c)), np.zeros((f, r, c))
    psum, psum_next = np.zeros((f, r, c)), np.zeros((f, r, c))
    prod = np.empty((f, r, c))
    a_tag = np.full((r, c), -1)
    steps = t + r + c - 1  # room for the output FIFO; the loop below decides when it is done
    fifo = np.zeros((f, steps, c))  # what leaves the bottom edge, cycle by cycle
    fifo_tag = np.full((steps, c), -1)
    emitted, needed, macs, s = 0, t * c, 0, 0
    while emitted < needed:
        a_next[:, :, 1:] = a[:, :, :-1]  # operands move one PE to the right
        a_tag[:, 1:] = a_tag[:, :-1].copy()
        if s < x.shape[1]:
            a_next[:, :, 0] = x[:, s]
            a_tag[:, 0] = x_tag[s]
        else:
            a_next[:, :, 0] = 0.0
            a_tag[:, 0] = -1
        a, a_next = a_next, a
        np.multiply(a, w, out=prod)
        np.add(psum[:, :-1], prod[:, 1:], out=psum_next[:, 1:])  # partial sums move one PE down
        psum_next[:, 0] = prod[:, 0]
        psum, psum_next = psum_next, psum
        live = a_tag >= 0
        macs += int(valid_count[live].sum())
        fifo[:, s] = psum[:, r - 1]  # sums leave the bottom row into the output FIFO
        fifo_tag[s] = a_tag[r - 1]  # ... tagged with the streamed row they belong to
        emitted += int(np.count_nonzero(a_tag[r - 1] >= 0))
        s += 1
    when, col = np.nonzero(fifo_tag >= 0)  # de-skew the FIFO into rows: out[t, j]
    out = np.zeros((f, t, c))
    out[:, fifo_tag[when, col], col] = fifo[:, when, col]
    return out, fill, s, macs


def _os_chunk(a_tiles: np.ndarray, b_tiles: np.ndarray, valid_count: np.ndarray
              ) -> tuple[np.ndarray, int, int, int]:
    """Output-stationary run of F folds side by side.

    a_tiles (F, R, K), b_tiles (F, K, C), valid_count (R, C): in how many folds each PE owns a
    real output. Returns
    (out (F, R, C), compute cycles, drain cycles, useful MACs).
    """
    f, r, k = a_tiles.shape
    c = b_tiles.shape[2]
    xa = _skew(a_tiles.transpose(0, 2, 1))  # (F, K+R-1, R): left edge of row i
    xb = _skew(b_tiles)  # (F, K+C-1, C): top edge of column j
    ta, tb = _skew_tags(k, r), _skew_tags(k, c)
    # Operand registers are double-buffered (this cycle's from last cycle's), as in hardware.
    a, a_next = np.zeros((f, r, c)), np.zeros((f, r, c))
    b, b_next = np.zeros((f, r, c)), np.zeros((f, r, c))
    prod = np.empty((f, r, c))
    a_tag = np.full((r, c), -1)
    b_tag = np.full((r, c), -1)
    acc = np.zeros((f, r, c))
    done, needed, macs, s = 0, r * c * k, 0, 0
    while done < needed:
        in_a, in_b = s < xa.shape[1], s < xb.shape[1]
        a_next[:, :, 1:] = a[:, :, :-1]  # A moves right
        a_next[:, :, 0] = xa[:, s] if in_a else 0.0
        b_next[:, 1:] = b[:, :-1]  # B moves down
        b_next[:, 0] = xb[:, s] if in_b else 0.0
        a, a_next, b, b_next = a_next, a, b_next, b
        a_tag[:, 1:] = a_tag[:, :-1].copy()
        a_tag[:, 0] = ta[s] if in_a else -1
        b_tag[1:] = b_tag[:-1].copy()
        b_tag[0] = tb[s] if in_b else -1
        live = (a_tag >= 0) & (b_tag >= 0)
        if np.any(a_tag[live] != b_tag[live]):
            raise RuntimeError("output-stationary operands out of step")  # a simulator bug
        acc += np.multiply(a, b, out=prod)
        done += int(live.sum())
        macs += int(valid_count[live].sum())
        s += 1
    # Drain: finished outputs shift down one row per cycle and leave the bottom edge.
    out = np.zeros((f, r, c))
    row_tag = np.arange(r)
    drained = 0
    while drained < r:
        out[:, row_tag[r - 1]] = acc[:, r - 1]
        acc[:, 1:] = acc[:, :-1]
        row_tag[1:] = row_tag[:-1].copy()
        acc[:, 0] = 0.0
        drained += 1
    return out, s, drained, macs


def _run_folds(
    n_folds: int,
    fold_shape: tuple[int, int],
    per_fold_elems: int,
    pes: int,
    run_chunk: Callable[[slice], tuple[np.ndarray, int, int, int]],
) -> tuple[np.ndarray, int, int, int]:
    """Run every fold, a chunk of folds side by side at a time, and check one timeline.

    ``run_chunk(folds)`` simulates the folds of a slice and returns ``(outputs (F, *fold_shape),
    first phase, second phase, MACs)``. Chunks hold at most ``_CHUNK_ELEMS`` elements of
    per-fold state (``per_fold_elems`` each) and ``_CHUNK_PE`` PEs of per-cycle arrays. Every
    fold must run the same two-phase timeline (a difference is a simulator bug); the result is
    ``(outputs (n_folds, *fold_shape), first, second, MACs summed)``.
    """
    size = max(1, min(_CHUNK_ELEMS // max(per_fold_elems, 1), _CHUNK_PE // pes))
    out = np.zeros((n_folds, *fold_shape))
    timings = set()
    macs = 0
    for start in range(0, n_folds, size):
        sl = slice(start, min(start + size, n_folds))
        out[sl], first, second, chunk_macs = run_chunk(sl)
        timings.add((first, second))
        macs += chunk_macs
    if len(timings) != 1:
        raise RuntimeError(f"folds ran different timelines: {timings}")  # a simulator bug
    first, second = timings.pop()
    return out, first, second, macs


def _run_ws(a: np.ndarray, b: np.ndarray, r: int, c: int) -> tuple[np.ndarray, int, int, int]:
    """(M×K)·(K×N) weight-stationary: returns (product, preload, stream, MACs)."""
    m, k = a.shape
    n = b.shape[1]
    fr, fc = math.ceil(k / r), math.ceil(n / c)
    ap = _pad(a, m, fr * r).reshape(m, fr, r).transpose(1, 0, 2)  # (fr, M, R)
    bp = _pad(b, fr * r, fc * c).reshape(fr, r, fc, c).transpose(0, 2, 1, 3)  # (fr, fc, R, C)
    w_tiles = bp.reshape(fr * fc, r, c)
    fold_kr, fold_nc = np.repeat(np.arange(fr), fc), np.tile(np.arange(fc), fr)  # f = (kr, nc)
    rows_valid = (np.arange(fr * r) < k).reshape(fr, r)[fold_kr]  # (F, R)
    cols_valid = (np.arange(fc * c) < n).reshape(fc, c)[fold_nc]  # (F, C)
    out, fill, run, macs = _run_folds(
        fr * fc, (m, c), m * (c + r), r * c,
        lambda sl: _ws_chunk(ap[fold_kr[sl]], w_tiles[sl],
                             _valid_count(rows_valid[sl], cols_valid[sl])))
    product = out.reshape(fr, fc, m, c).sum(axis=0).transpose(1, 0, 2).reshape(m, fc * c)
    return product[:, :n], fill, run, macs


def _run_os(a: np.ndarray, b: np.ndarray, r: int, c: int) -> tuple[np.ndarray, int, int, int]:
    """(M×K)·(K×N) output-stationary: returns (product, compute, drain, MACs)."""
    m, k = a.shape
    n = b.shape[1]
    fr, fc = math.ceil(m / r), math.ceil(n / c)
    ap = _pad(a, fr * r, k).reshape(fr, r, k)  # (fr, R, K)
    bp = _pad(b, k, fc * c).reshape(k, fc, c).transpose(1, 0, 2)  # (fc, K, C)
    fold_mr, fold_nc = np.repeat(np.arange(fr), fc), np.tile(np.arange(fc), fr)
    rows_valid = (np.arange(fr * r) < m).reshape(fr, r)[fold_mr]  # (F, R)
    cols_valid = (np.arange(fc * c) < n).reshape(fc, c)[fold_nc]  # (F, C)
    out, run, drain, macs = _run_folds(
        fr * fc, (r, c), k * (r + c) + r * c, r * c,
        lambda sl: _os_chunk(ap[fold_mr[sl]], bp[fold_nc[sl]],
                             _valid_count(rows_valid[sl], cols_valid[sl])))
    product = out.reshape(fr, fc, r, c).transpose(0, 2, 1, 3).reshape(fr * r, fc * c)
    return product[:m, :n], run, drain, macs


def simulate(a: np.ndarray | object, b: np.ndarray | object, array: ArraySpec, *,
             convention: str = "native", overlap: bool = False) -> SimResult:
    """Run ``a @ b`` (M×K by K×N, float64) cycle by cycle on ``array``.

    cycles = folds × fold timeline (native); with ``overlap`` the next fold's preload (ws/is) or
    start (os) hides under the previous fold's tail: ``F·run + fill + drain``; SCALE-Sim v2
    convention: ``F·(fill + run) - 1`` (os: drain not counted). Utilisation = counted useful MACs /
    (R·C·cycles).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or 0 in a.shape + b.shape:
        raise DivekitError(f"cannot multiply shapes {a.shape} and {b.shape}")
    if convention not in CONVENTIONS:
        raise DivekitError(f"convention must be one of {', '.join(CONVENTIONS)}")
    r, c, df = array.rows, array.cols, array.dataflow
    m, k = a.shape
    n = b.shape[1]
    if df == "ws":
        product, fill, run, macs = _run_ws(a, b, r, c)
        timeline = FoldTimeline(fill=fill, run=run, drain=0)
    elif df == "is":
        product_t, fill, run, macs = _run_ws(b.T, a.T, r, c)  # (A B)ᵀ = Bᵀ Aᵀ, Aᵀ stationary
        product = product_t.T
        timeline = FoldTimeline(fill=fill, run=run, drain=0)
    else:
        product, run, drain, macs = _run_os(a, b, r, c)
        timeline = FoldTimeline(fill=0, run=run, drain=drain)
    sr, sc, t = spatio_temporal(m, n, k, df)
    folds = math.ceil(sr / r) * math.ceil(sc / c)
    if convention == "scalesim":
        cycles = folds * (timeline.fill + timeline.run) - 1
        c_f = timeline.run if df == "os" else timeline.fill + timeline.run + c - 1
    else:
        if overlap:
            cycles = folds * timeline.run + timeline.fill + timeline.drain
        else:
            cycles = folds * timeline.total
        c_f = timeline.total
    stats = GemmStats(
        m=m, n=n, k=k, rows=r, cols=c, dataflow=df, folds=folds, cycles=cycles, macs=macs,
        mapping_efficiency=sr * sc / (folds * r * c),
        utilisation=macs / (r * c * cycles) if cycles else float("nan"),
        compute_util=sr * sc * t / (folds * r * c * c_f),
    )
    return SimResult(output=product, stats=stats, timeline=timeline)
