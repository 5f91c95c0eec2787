"""A cycle-accurate R×C systolic array that really computes ``A @ B``.

Every cycle moves every operand one processing element (PE) further. Because the edges of the
array are fed skewed (row ``i`` ``i`` cycles late, column ``j`` ``j`` cycles late), all the PEs
of one anti-diagonal ``d = i + j`` work on the same *wavefront* (streamed row, or index ``k``)
at the same cycle: wavefront ``w`` is on diagonal ``d`` at cycle ``w + d``. So the simulation
steps over the ``R + C - 1`` diagonals instead of the cycles, and one numpy operation moves every
wavefront from diagonal ``d - 1`` onto diagonal ``d`` (the wavefront axis of the arrays is time).
Each PE still does each multiply-accumulate of each cycle, with the operand values it holds at
that cycle, in the hardware's order; the loop is over space-time diagonals rather than time, and
only PEs holding data are computed (a short stream through a 128×128 array lights up a thin band
of diagonals: stepping cycle by cycle over the whole grid would compute mostly idle PEs). The
cycle counts are read from when each output leaves the array. The folds (tiles) of a product run
the same timeline on different data, so a batch of folds is simulated side by side as a leading
axis; the array runs them one after another, so the total is the sum of the per-fold timelines
(see :mod:`divekit.hardware.analytic` for the closed forms they must equal).

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

Shift registers (the ws/is preload, the os drain) are ring buffers: a moving head instead of a
copy of the grid per cycle, each row with a tag checked on arrival. The os operands' tags are
read from the skewed edge streams and checked to meet in step at every PE, and the stream phase
ends when every output has left the array, so the cycle counts are measured, not assumed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from divekit.errors import DivekitError
from divekit.hardware.analytic import CONVENTIONS, ArraySpec, GemmStats, spatio_temporal

_CHUNK_ELEMS = 2**24  # folds simulated side by side: at most ~16M float64 of output buffer
_STEP_ELEMS = 2**17  # ... and ~128K elements touched per diagonal step, so a step stays in cache


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


def _skew_tags(t: int, lanes: int) -> np.ndarray:
    """(T + L - 1, L) int: the streamed index lane ``l`` holds at cycle ``s`` (``s - l``), or -1.

    This is what an edge of the array sees: lane ``l`` is fed ``l`` cycles late (the skew)."""
    s = np.arange(t + lanes - 1)[:, None] - np.arange(lanes)[None, :]
    return np.where((s >= 0) & (s < t), s, -1)


def _diagonal(d: int, r: int, c: int) -> tuple[int, int]:
    """The rows ``lo..hi`` of the PEs ``(i, d - i)`` on anti-diagonal ``d`` of an R×C grid."""
    return max(0, d - c + 1), min(d, r - 1)


def _preload(tiles: np.ndarray) -> tuple[np.ndarray, int]:
    """Shift (F, R, C) tiles into the array from the top, one row per cycle, the last row first.

    The R rows of registers are a shift register: each cycle every row moves one PE down and a
    new row enters at the top. It is kept as a ring buffer (a moving head instead of R copies of
    the grid each cycle); every row carries a tag, checked to have arrived at its own row.
    Returns (the grid (F, R, C), preload cycles)."""
    f, r, c = tiles.shape
    ring = np.empty((f, r, c))
    tag = np.full(r, -1)
    head = fill = 0  # grid row i is ring slot (head + i) % R
    while fill < r:
        head = (head - 1) % r  # every row moves down; the bottom slot becomes the new top row
        ring[:, head] = tiles[:, r - 1 - fill]
        tag[head] = r - 1 - fill
        fill += 1
    order = (head + np.arange(r)) % r
    if not np.array_equal(tag[order], np.arange(r)):
        raise RuntimeError("preload put a row in the wrong place")  # a simulator bug
    return (ring if head == 0 else ring[:, order]), fill


def _ws_chunk(a_tiles: np.ndarray, w_tiles: np.ndarray, valid_count: np.ndarray
              ) -> tuple[np.ndarray, int, int, int]:
    """Weight-stationary run of F folds side by side, one anti-diagonal of PEs at a time.

    a_tiles (F, T, R): the streamed rows of each fold; w_tiles (F, R, C): stationary tiles;
    valid_count (R, C): in how many folds each PE holds a real (unpadded) weight. Returns
    (out (F, T, C), preload cycles, stream cycles, useful MACs).

    Row ``i`` of the array is fed ``A[t, i]`` at cycle ``t + i`` (the skew) and an operand moves
    one PE right per cycle, so PE ``(i, j)`` works on streamed row ``t`` at cycle ``t + i + j``:
    every PE of anti-diagonal ``d = i + j`` holds the same wavefront ``t = cycle - d``. The loop
    runs over the diagonals; one step moves every wavefront from diagonal ``d - 1`` to ``d`` at
    once (the ``t`` axis of the arrays is time). An operand keeps its value as it moves right,
    so row ``i``'s registers on every diagonal are ``A[:, i]``; a partial sum moves one PE down
    (row ``i - 1`` to ``i``, same column) and adds its PE's product, so the sums are kept per
    column: ``psum[:, t, j]`` sits on PE ``(d - j, j)`` at diagonal ``d`` and leaves the bottom
    row at diagonal ``R - 1 + j``, cycle ``t + R - 1 + j``. Sums are added in the order the
    hardware adds them, top row first. The stream phase ends when every output has left, at
    the latest such cycle + 1 (measured from the emission cycles, not assumed).
    """
    f, t, r = a_tiles.shape
    c = w_tiles.shape[2]
    grid, fill = _preload(w_tiles)
    # the weights along each anti-diagonal: wd[d, j, :] = W[:, d - j, j] (0 off the grid)
    dj = np.arange(r + c - 1)[:, None] - np.arange(c)[None, :]  # row of PE (d, j)
    on = (dj >= 0) & (dj < r)
    wd = np.where(on[..., None], grid[:, np.clip(dj, 0, r - 1), np.arange(c)].transpose(1, 2, 0),
                  0.0)  # (R+C-1, C, F)
    vd = np.where(on, valid_count[np.clip(dj, 0, r - 1), np.arange(c)], 0).sum(axis=1)
    # Lanes first, then the batch of folds and wavefronts, the longer of the two innermost so
    # each step's arrays run along long contiguous rows. Rows of A reversed (row i at R-1-i),
    # so a diagonal's PEs, by increasing column, read them forward.
    t_last = t >= f
    a_l = a_tiles[:, :, ::-1].transpose((2, 0, 1) if t_last else (2, 1, 0))  # (R, F, T) | (R, T, F)
    a_l = a_l.copy(order="C")  # a fresh array: positive strides, as torch.from_numpy needs
    w_l = wd[:, :, :, None] if t_last else wd[:, :, None, :]  # broadcast over the wavefronts
    psum = np.zeros((c, *a_l.shape[1:]))  # (C, F, T) | (C, T, F): column j's running sums
    # torch views of the same memory: addcmul_ is the multiply-accumulate in one pass
    psum_t, a_t, w_t = torch.from_numpy(psum), torch.from_numpy(a_l), torch.from_numpy(w_l)
    emitted, last, macs = 0, -1, 0
    for d in range(r + c - 1):
        lo, hi = _diagonal(d, r, c)
        jlo, jhi = d - hi, d - lo  # columns of the diagonal's PEs (rows hi..lo)
        # each sum moves one PE down and adds that PE's product
        psum_t[jlo: jhi + 1].addcmul_(a_t[r - 1 - hi: r - lo], w_t[d, jlo: jhi + 1])
        macs += t * int(vd[d])
        if d >= r - 1:  # the bottom row's PE (R-1, j) hands column j's sums out
            emitted += t
            last = max(last, d + t - 1)  # wavefront t leaves at cycle t + d
    if emitted != t * c:
        raise RuntimeError(f"{emitted} of {t * c} outputs left the array")  # a simulator bug
    out = psum.transpose((1, 2, 0) if t_last else (2, 1, 0))  # (F, T, C)
    return out, fill, last + 1, macs


@functools.lru_cache(maxsize=64)
def _os_schedule(r: int, c: int, k: int) -> int:
    """The output-stationary timeline of one fold, checked: walk the anti-diagonals and read the
    tag each operand entered with (row ``i``'s A at cycle ``k + i``, column ``j``'s B at
    ``k + j``, from the skewed edge streams); every PE must see equal tags, every wavefront.
    Returns the compute cycles: the last multiply-accumulate's cycle + 1. The same for every
    fold, so it is walked once per shape (cached), not once per fold."""
    ta, tb = _skew_tags(k, r), _skew_tags(k, c)  # what the left and top edges are fed, by cycle
    wave = np.arange(k)
    last = -1
    for d in range(r + c - 1):
        lo, hi = _diagonal(d, r, c)
        rows = np.arange(lo, hi + 1)
        cols = d - rows
        tag_a = ta[wave[None, :] + rows[:, None], rows[:, None]]
        tag_b = tb[wave[None, :] + cols[:, None], cols[:, None]]
        if not np.array_equal(tag_a, tag_b) or tag_a.min() < 0:
            raise RuntimeError("output-stationary operands out of step")  # a simulator bug
        last = max(last, d + k - 1)  # wavefront k is on diagonal d at cycle k + d
    return last + 1


def _os_chunk(a_tiles: np.ndarray, b_tiles: np.ndarray, valid_count: np.ndarray
              ) -> tuple[np.ndarray, int, int, int]:
    """Output-stationary run of F folds side by side, one anti-diagonal of PEs at a time.

    a_tiles (F, R, K), b_tiles (F, K, C), valid_count (R, C): in how many folds each PE owns a
    real output. Returns (out (F, R, C), compute cycles, drain cycles, useful MACs).

    Row ``i`` is fed ``A[i, k]`` at cycle ``k + i`` from the left, column ``j`` is fed
    ``B[k, j]`` at cycle ``k + j`` from the top; both move one PE per cycle, so PE ``(i, j)``
    meets the pair of index ``k`` at cycle ``k + i + j``: anti-diagonal ``d`` holds wavefront
    ``k = cycle - d``. One step of the loop moves every wavefront onto diagonal ``d`` and lets
    each of its PEs multiply-accumulate all of them (:func:`_os_schedule` checks, from the
    skewed edge streams, that the two operands meeting at every PE carry the same ``k`` and
    measures the cycles). Then the R rows of results shift out of the bottom, one row per cycle
    (a ring buffer of rows, tags checked).
    """
    f, r, k = a_tiles.shape
    c = b_tiles.shape[2]
    last = _os_schedule(r, c, k)
    bt = np.ascontiguousarray(b_tiles.transpose(0, 2, 1)[:, ::-1])  # column j at C-1-j
    acc_d = np.zeros((f, r + c - 1, r))  # acc_d[:, d, i]: the accumulator of PE (i, d - i)
    macs = 0
    for d in range(r + c - 1):
        lo, hi = _diagonal(d, r, c)
        # rows lo..hi meet columns d-lo..d-hi, i.e. B's reversed columns C-1-d+lo..C-1-d+hi;
        # each PE multiply-accumulates the K wavefronts that pass it, in order
        np.einsum("fnk,fnk->fn", a_tiles[:, lo: hi + 1], bt[:, c - 1 - d + lo: c - d + hi],
                  out=acc_d[:, d, lo: hi + 1])
        rows = np.arange(lo, hi + 1)
        macs += k * int(valid_count[rows, d - rows].sum())
    i, j = np.arange(r)[:, None], np.arange(c)[None, :]
    acc = acc_d[:, i + j, i]  # (F, R, C): each PE's finished output
    # Drain: finished outputs shift down one row per cycle and leave the bottom edge. Grid row
    # i is ring slot (i - cycle) % R: the slot leaving the bottom is reused as the new top row.
    out = np.empty((f, r, c))
    slot_tag = np.arange(r)
    drained = 0
    while drained < r:
        slot = (r - 1 - drained) % r
        out[:, slot_tag[slot]] = acc[:, slot]
        acc[:, slot] = 0.0
        slot_tag[slot] = -1
        drained += 1
    if (slot_tag >= 0).any():
        raise RuntimeError("drain left results in the array")  # a simulator bug
    return out, last, drained, macs


def _run_folds(
    n_folds: int,
    fold_shape: tuple[int, int],
    per_fold_elems: int,
    per_fold_step: int,
    run_chunk: Callable[[slice], tuple[np.ndarray, int, int, int]],
) -> tuple[np.ndarray, int, int, int]:
    """Run every fold, a chunk of folds side by side at a time, and check one timeline.

    ``run_chunk(folds)`` simulates the folds of a slice and returns ``(outputs (F, *fold_shape),
    first phase, second phase, MACs)``. Chunks hold at most ``_CHUNK_ELEMS`` elements of
    per-fold state (``per_fold_elems`` each) and about ``_STEP_ELEMS`` elements per diagonal
    step (``per_fold_step`` each). Every fold must run the same two-phase timeline (a difference
    is a simulator bug); the result is ``(outputs (n_folds, *fold_shape), first, second, MACs
    summed)``.
    """
    size = max(1, min(_CHUNK_ELEMS // max(per_fold_elems, 1),
                      _STEP_ELEMS // max(per_fold_step, 1)))
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
        fr * fc, (m, c), m * (c + r) + (r + c) * c, min(m, _STEP_ELEMS // c + 1) * c,
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
        fr * fc, (r, c), k * (r + c) + r * c, min(r, c) * k,
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
