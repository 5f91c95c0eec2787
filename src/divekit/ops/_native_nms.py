"""Greedy NMS in C with a uniform grid, compiled on first use (the fast path of ``ops.boxes.nms``).

torchvision's CPU kernel compares every kept box with every later box: ``O(kept · N)`` IoUs.
A box can only suppress boxes it overlaps, and overlapping boxes share a cell of any uniform
grid, so here every box is registered in the grid cells it covers and a kept box is compared
only with the later, not yet suppressed boxes of its own cells. The visiting order (score
descending, ties by index), the IoU arithmetic (float32, ``inter / (area_i + area_j - inter)``)
and the test (``iou > threshold`` in double) are torchvision's, so the kept indices are
identical — ``tests/test_ops_boxes.py`` checks it on random, clustered and tie-heavy boxes.
A cell's boxes are kept as five float planes (x1, y1, x2, y2, area), so a kept box's IoUs with
them are one branch-free loop the compiler vectorises; the double test ``iou > t`` is run as
the float test ``iou > t_f`` (``t_f`` the largest float not above ``t``: the same verdict for
every float ``iou``), and only a list that lost a box is compacted.

The C source below is compiled once with the system C compiler into the user's cache
(``$DIVEKIT_CACHE`` or ``~/.cache/divekit``, under ``build/``) and loaded with ctypes; no
compiler, a failed build, or ``DIVEKIT_NATIVE=0`` leaves ``load()`` returning None and NMS on
torchvision's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

/* A box can only suppress a box of similar size near it. In exact arithmetic IoU > t implies
   min(w) > t max(w), min(h) > t max(h), |dcx| < (1 - t) max(w) and |dcy| < (1 - t) max(h).
   So boxes are put in classes by log width and log height (class width L = 1.01 log(1/t): a
   partner is at most one class away) and, inside a class, in cells of a centre grid at least
   as wide as the search radius (a partner is at most one cell away). A kept box visits the
   3 x 3 neighbouring classes and 3 x 3 cells of each, and compares exactly, as torchvision
   does, only with the later boxes found there. Zero-area boxes never suppress or get
   suppressed (their IoU is 0 or NaN), so they are left out. Valid for 0 < t < 1. */

typedef struct { uint64_t key; int32_t end, ptr; } Slot; /* 16 bytes: n < 2^31 boxes */

/* The hash table outgrows malloc's heap and would be mapped and faulted in afresh on every
   call; each thread keeps its own (ctypes releases the GIL) for the next call instead. */
static __thread Slot *cached_table = NULL;
static __thread uint64_t cached_size = 0;

static Slot *zeroed_table(uint64_t size)
{
    if (cached_size < size) {
        free(cached_table);
        cached_table = malloc(size * sizeof(Slot));
        cached_size = cached_table ? size : 0;
        if (!cached_table) return NULL;
    }
    memset(cached_table, 0, size * sizeof(Slot));
    return cached_table;
}

static void release_table(uint64_t size)
{
    if (size > ((uint64_t)1 << 20)) { free(cached_table); cached_table = NULL; cached_size = 0; }
}

/* log(x) for a positive float: exponent from the bits, the mantissa m in [1/sqrt 2, sqrt 2) by
   the series 2 atanh(s), s = (m - 1)/(m + 1), to s^9 (truncation below 1e-9; float rounding
   ~1e-6 at most): far inside the 1 % slack of the class width, as logf's own error is.
   Subnormal x goes to logf. Inline, unlike logf, and a third of its cost. */
static float log_pos(float x)
{
    if (x < 1e-30f) return logf(x);
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    int e = (int)(u >> 23) - 127;
    u = (u & 0x007fffffu) | 0x3f800000u; /* the mantissa, in [1, 2) */
    float m;
    memcpy(&m, &u, sizeof m);
    if (m > 1.41421356f) { m *= 0.5f; e += 1; }
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float p = s * (2.0f + s2 * (0.66666667f + s2 * (0.4f + s2 * (0.28571429f + s2 * 0.22222222f))));
    return p + (float)e * 0.69314718f;
}

static uint64_t pack(int64_t kw, int64_t kh, int64_t gx, int64_t gy)
{
    return ((uint64_t)(kw + 32768) << 48) | ((uint64_t)(kh + 32768) << 32) |
           ((uint64_t)(gx + 32768) << 16) | (uint64_t)(gy + 32768);
}

static uint64_t mix(uint64_t k)
{
    k ^= k >> 33; k *= 0xff51afd7ed558ccdULL; k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53ULL; k ^= k >> 33;
    return k;
}

static Slot *lookup(Slot *table, uint64_t mask, uint64_t key)
{
    for (uint64_t h = mix(key) & mask;; h = (h + 1) & mask) {
        if (table[h].key == 0 || table[h].key == key) return &table[h]; /* pack() is never 0 */
    }
}

/* Visiting order: scores descending, ties by index, NaN first (as torch.sort(descending=True,
   stable=True)); an LSD radix sort on the scores' bits, which is stable. */
static int radix_order(const float *scores, int64_t n, int64_t *order)
{
    uint32_t *key = malloc(sizeof(uint32_t) * n), *key2 = malloc(sizeof(uint32_t) * n);
    int64_t *idx2 = malloc(sizeof(int64_t) * n);
    if (!key || !key2 || !idx2) { free(key); free(key2); free(idx2); return -1; }
    for (int64_t i = 0; i < n; i++) {
        float v = scores[i];
        uint32_t u;
        if (v != v) { key[i] = 0; order[i] = i; continue; } /* NaN: largest, so first */
        if (v == 0.0f) v = 0.0f;                              /* -0 ties with +0 */
        memcpy(&u, &v, sizeof u);
        u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);       /* ascending as the floats */
        key[i] = ~u;                                          /* descending */
        if (key[i] == 0) key[i] = 1;                          /* below NaN (only v = +inf maps here) */
        order[i] = i;
    }
    int64_t *src_i = order, *dst_i = idx2;
    uint32_t *src_k = key, *dst_k = key2;
    static __thread int64_t counts[3][2049];
    memset(counts, 0, sizeof counts);
    for (int64_t i = 0; i < n; i++) { /* the three digits' histograms in one pass */
        uint32_t k = key[i];
        counts[0][(k & 2047u) + 1]++; counts[1][((k >> 11) & 2047u) + 1]++; counts[2][(k >> 22) + 1]++;
    }
    for (int pass = 0; pass < 3; pass++) {
        int shift = 11 * pass;
        int64_t *c = counts[pass];
        for (int d = 0; d < 2048; d++) c[d + 1] += c[d];
        for (int64_t i = 0; i < n; i++) {
            int64_t at = c[(src_k[i] >> shift) & 2047u]++;
            dst_k[at] = src_k[i]; dst_i[at] = src_i[i];
        }
        int64_t *ti = src_i; src_i = dst_i; dst_i = ti;
        uint32_t *tk = src_k; src_k = dst_k; dst_k = tk;
    }
    memcpy(order, src_i, sizeof(int64_t) * n); /* three passes: the result is in idx2 */
    free(key); free(key2); free(idx2);
    return 0;
}

/* boxes: n x 4 float (x1, y1, x2, y2); scores: n float; 0 < threshold < 1. Writes the kept
   indices to keep and returns how many (-1: out of memory, -2: coordinates too far apart for
   the class and cell indices, -3: a NaN or infinite coordinate or x2 < x1 or y2 < y1). */
int64_t grid_nms(const float *boxes, const float *scores, int64_t n, double threshold, int64_t *keep)
{
    if (n <= 0) return 0;
    if (n >= INT32_MAX) return -2; /* the lists' 32-bit positions: torchvision's kernel */
    double L = 1.01 * log(1.0 / threshold), f = 1.01 * (1.0 - threshold);
    float *area = malloc(sizeof(float) * n);
    int64_t *order = malloc(sizeof(int64_t) * n), *rank = malloc(sizeof(int64_t) * n);
    int64_t *kw = malloc(sizeof(int64_t) * n), *kh = malloc(sizeof(int64_t) * n);
    int64_t *sorted = malloc(sizeof(int64_t) * n), *sidx = malloc(sizeof(int64_t) * n);
    double *cx = malloc(sizeof(double) * n), *cy = malloc(sizeof(double) * n);
    double *cellw = NULL, *cellh = NULL, *maxw = NULL, *maxh = NULL; /* cellw/h: 1 / size */
    char *suppressed = calloc(n, 1);
    Slot *table = NULL;
    float *sbox = NULL; /* x1, y1, x2, y2, area of the grouped entries: five planes of m */
    float *bx1, *by1, *bx2, *by2, *bar;
    unsigned char *flag = NULL; /* the scan's verdicts, one list at a time */
    int64_t count = -1, m = 0, kwmin = INT64_MAX, kwmax = INT64_MIN, khmin = INT64_MAX, khmax = INT64_MIN;
    if (!area || !order || !rank || !kw || !kh || !sorted || !sidx || !cx || !cy || !suppressed) goto done;
    if (radix_order(scores, n, order) != 0) goto done;
    for (int64_t r = 0; r < n; r++) {
        int64_t i = order[r];
        const float *b = boxes + 4 * i;
        area[i] = (b[2] - b[0]) * (b[3] - b[1]);
        rank[i] = r;
        double w = (double)b[2] - b[0], h = (double)b[3] - b[1];
        float sum = (b[0] + b[1]) + (b[2] + b[3]); /* NaN when a coordinate is NaN or infinite */
        if (!(sum - sum == 0.0f && w >= 0 && h >= 0)) {
            count = -3; /* the caller names the offending box (or, after an overflow, falls back) */
            goto done;
        }
        cx[i] = 0.5 * ((double)b[0] + b[2]);
        cy[i] = 0.5 * ((double)b[1] + b[3]);
        if (!(w > 0 && h > 0)) { kw[i] = INT64_MIN; continue; }
        double fw = floor(log_pos((float)w) / L), fh = floor(log_pos((float)h) / L);
        if (fabs(fw) > 30000 || fabs(fh) > 30000) { count = -2; goto done; }
        kw[i] = (int64_t)fw; kh[i] = (int64_t)fh;
        if (kw[i] < kwmin) kwmin = kw[i];
        if (kw[i] > kwmax) kwmax = kw[i];
        if (kh[i] < khmin) khmin = kh[i];
        if (kh[i] > khmax) khmax = kh[i];
        m++;
    }
    if (m == 0) kwmin = kwmax = khmin = khmax = 0;
    /* cell sizes of the classes kmin - 1 .. kmax + 1 */
    cellw = malloc(sizeof(double) * (kwmax - kwmin + 3));
    cellh = malloc(sizeof(double) * (khmax - khmin + 3));
    maxw = malloc(sizeof(double) * (kwmax - kwmin + 3));
    maxh = malloc(sizeof(double) * (khmax - khmin + 3));
    if (!cellw || !cellh || !maxw || !maxh) goto done;
    for (int64_t k = kwmin - 1; k <= kwmax + 1; k++) {
        cellw[k - kwmin + 1] = 1.0 / (f * exp((k + 2) * L));
        maxw[k - kwmin + 1] = exp((k + 1) * L); /* widths of class k are below this */
    }
    for (int64_t k = khmin - 1; k <= khmax + 1; k++) {
        cellh[k - khmin + 1] = 1.0 / (f * exp((k + 2) * L));
        maxh[k - khmin + 1] = exp((k + 1) * L);
    }
    uint64_t size = 16;
    while (size < (3 * (uint64_t)m) / 2 + 16) size <<= 1; /* at most 2/3 full: short probes */
    table = zeroed_table(size);
    sbox = malloc(sizeof(float) * 5 * (m > 0 ? m : 1));
    flag = malloc(m > 0 ? m : 1);
    if (!table || !sbox || !flag) goto done;
    bx1 = sbox; by1 = sbox + m; bx2 = sbox + 2 * m; by2 = sbox + 3 * m; bar = sbox + 4 * m;
    /* torchvision tests (double)iou > threshold; for a float iou that is iou > tf, with tf the
       largest float not above the threshold, a test the loop below can run four or eight wide */
    float tf = (float)threshold;
    if ((double)tf > threshold) tf = nextafterf(tf, -1.0f);
    /* group by (class, cell), each group in visiting order: count, then place */
    for (int64_t r = 0; r < n; r++) {
        int64_t i = order[r];
        if (kw[i] == INT64_MIN) continue;
        /* x * (1 / size), here and in the search: one monotone map, so the search's cell
           range still holds every partner's cell */
        double gx = floor(cx[i] * cellw[kw[i] - kwmin + 1]), gy = floor(cy[i] * cellh[kh[i] - khmin + 1]);
        if (fabs(gx) > 30000 || fabs(gy) > 30000) { count = -2; goto done; }
        uint64_t key = pack(kw[i], kh[i], (int64_t)gx, (int64_t)gy);
        Slot *slot = lookup(table, size - 1, key);
        slot->key = key;
        slot->end++;
        sidx[i] = slot - table;
    }
    int64_t acc = 0;
    for (uint64_t h = 0; h < size; h++) {
        if (table[h].key == 0) continue;
        int64_t c = table[h].end;
        table[h].ptr = table[h].end = (int32_t)acc;
        acc += c;
    }
    for (int64_t r = 0; r < n; r++) {
        int64_t i = order[r];
        if (kw[i] == INT64_MIN) continue;
        int64_t e = table[sidx[i]].end++;
        const float *b = boxes + 4 * i;
        sorted[e] = i;
        bx1[e] = b[0]; by1[e] = b[1]; bx2[e] = b[2]; by2[e] = b[3]; bar[e] = area[i];
    }

    count = 0;
    for (int64_t r = 0; r < n; r++) {
        int64_t i = order[r];
        if (suppressed[i]) continue;
        keep[count++] = i;
        if (kw[i] == INT64_MIN) continue;
        const float *bi = boxes + 4 * i;
        float ix1 = bi[0], iy1 = bi[1], ix2 = bi[2], iy2 = bi[3], iarea = area[i];
        for (int64_t dw = -1; dw <= 1; dw++) {
            int64_t cw = kw[i] + dw;
            if (cw < kwmin || cw > kwmax) continue;
            double sx = cellw[cw - kwmin + 1], rx = f * fmax((double)ix2 - ix1, maxw[cw - kwmin + 1]);
            int64_t gx0 = (int64_t)floor((cx[i] - rx) * sx), gx1 = (int64_t)floor((cx[i] + rx) * sx);
            for (int64_t dh = -1; dh <= 1; dh++) {
                int64_t ch = kh[i] + dh;
                if (ch < khmin || ch > khmax) continue;
                double sy = cellh[ch - khmin + 1], ry = f * fmax((double)iy2 - iy1, maxh[ch - khmin + 1]);
                int64_t gy0 = (int64_t)floor((cy[i] - ry) * sy), gy1 = (int64_t)floor((cy[i] + ry) * sy);
                for (int64_t x = gx0; x <= gx1; x++) {
                    for (int64_t y = gy0; y <= gy1; y++) {
                        Slot *slot = lookup(table, size - 1, pack(cw, ch, x, y));
                        if (slot->key == 0) continue;
                        while (slot->ptr < slot->end && rank[sorted[slot->ptr]] <= r) slot->ptr++;
                        /* the IoUs with the later boxes of the list, all at once (a loop the
                           compiler vectorises: five planes, no branch) ... */
                        int64_t s0 = slot->ptr, s1 = slot->end, nsup = 0;
                        for (int64_t e = s0; e < s1; e++) {
                            float xx1 = ix1 > bx1[e] ? ix1 : bx1[e];
                            float yy1 = iy1 > by1[e] ? iy1 : by1[e];
                            float xx2 = ix2 < bx2[e] ? ix2 : bx2[e];
                            float yy2 = iy2 < by2[e] ? iy2 : by2[e];
                            float w = xx2 - xx1 > 0.0f ? xx2 - xx1 : 0.0f;
                            float h = yy2 - yy1 > 0.0f ? yy2 - yy1 : 0.0f;
                            float inter = w * h;
                            float ovr = inter / (iarea + bar[e] - inter);
                            unsigned char sup = ovr > tf;
                            flag[e - s0] = sup;
                            nsup += sup;
                        }
                        if (nsup == 0) continue;
                        /* ... then the suppressed leave the list (each box sits in exactly one
                           list, so it leaves for good), the others keep their order */
                        int64_t out = s0;
                        for (int64_t e = s0; e < s1; e++) {
                            if (flag[e - s0]) { suppressed[sorted[e]] = 1; continue; }
                            sorted[out] = sorted[e];
                            bx1[out] = bx1[e]; by1[out] = by1[e]; bx2[out] = bx2[e];
                            by2[out] = by2[e]; bar[out] = bar[e];
                            out++;
                        }
                        slot->end = out;
                    }
                }
            }
        }
    }
done:
    free(area); free(order); free(rank); free(kw); free(kh); free(sorted); free(sidx); free(cx);
    free(cy); free(cellw); free(cellh); free(maxw); free(maxh); free(suppressed); free(sbox);
    free(flag);
    if (table) release_table(size);
    return count;
}
"""


def _cache_dir() -> Path:
    root = os.environ.get("DIVEKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "divekit")
    return Path(root) / "build"


def build_library(name: str, source: str) -> ctypes.CDLL | None:
    """Compile ``source`` (C99) into ``<cache>/build/<name>-<hash>.so`` unless it is there, and
    load it; None without a compiler, on a failed build or with ``DIVEKIT_NATIVE=0``."""
    if os.environ.get("DIVEKIT_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    flags = ["-O3", "-std=c99", "-ffp-contract=off", "-shared", "-fPIC"]
    digest = hashlib.sha1((source + " ".join(flags)).encode()).hexdigest()[:12]
    target = _cache_dir() / f"{name}-{digest}.so"
    try:
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                # no -ffast-math and no contraction: the float arithmetic must be torch's; -O3
                # lets the compiler vectorise the loops written for it (same IEEE results)
                subprocess.run([compiler, *flags, str(src), "-o", str(out), "-lm"],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, target)  # atomic: concurrent processes may build it too
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None when that is not possible."""
    lib = build_library("grid_nms", SOURCE)
    if lib is None:
        return None
    lib.grid_nms.restype = ctypes.c_int64
    lib.grid_nms.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double,
                             ctypes.c_void_p]  # boxes, scores, n, threshold, keep
    return lib


def usable(boxes: Tensor, iou_threshold: float) -> bool:
    """Whether the grid kernel applies: float32 on the CPU, a threshold in [0.05, 0.95] (the
    size classes need 0 < t < 1 and stay few inside that range), and the library built."""
    return (boxes.device.type == "cpu" and boxes.dtype == torch.float32
            and 0.05 <= iou_threshold <= 0.95 and load() is not None)


def grid_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor | None:
    """Kept indices ``(K,)`` by decreasing score (ties: smaller index first), as torchvision;
    ``None`` when a box is not finite or inverted (the caller names it: this module imports
    nothing of divekit's, so the dependency runs one way, from ``boxes`` to here)."""
    lib = load()
    assert lib is not None
    n = boxes.shape[0]
    b = boxes.detach().contiguous()
    s = scores.detach().to(torch.float32).contiguous()
    keep = torch.empty(max(n, 1), dtype=torch.int64)
    count = lib.grid_nms(b.data_ptr(), s.data_ptr(), n, float(iou_threshold), keep.data_ptr())
    if count == -1:
        raise MemoryError("grid_nms: out of memory")
    if count == -3:
        return None
    if count < 0:  # coordinates spread too far for the grid's indices: torchvision's kernel
        import torchvision  # type: ignore[import-untyped]

        return torchvision.ops.nms(boxes, scores, float(iou_threshold))
    return keep[:count].clone()
