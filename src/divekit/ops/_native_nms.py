"""Greedy NMS in C with a uniform grid, compiled on first use (the fast path of ``ops.boxes.nms``).

torchvision's CPU kernel compares every kept box with every later box: ``O(kept · N)`` IoUs.
A box can only suppress boxes it overlaps, and overlapping boxes share a cell of any uniform
grid, so here every box is registered in the grid cells it covers and a kept box is compared
only with the later, not yet suppressed boxes of its own cells. The visiting order (score
descending, ties by index), the IoU arithmetic (float32, ``inter / (area_i + area_j - inter)``)
and the test (``iou > threshold`` in double) are torchvision's, so the kept indices are
identical — ``tests/test_ops_boxes.py`` checks it on random, clustered and tie-heavy boxes.

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

typedef struct { uint64_t key; int64_t start, end, ptr; } Slot;

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
    for (int shift = 0; shift < 32; shift += 8) {
        int64_t counts[257] = {0};
        for (int64_t i = 0; i < n; i++) counts[((src_k[i] >> shift) & 255u) + 1]++;
        for (int c = 0; c < 256; c++) counts[c + 1] += counts[c];
        for (int64_t i = 0; i < n; i++) {
            int64_t at = counts[(src_k[i] >> shift) & 255u]++;
            dst_k[at] = src_k[i]; dst_i[at] = src_i[i];
        }
        int64_t *ti = src_i; src_i = dst_i; dst_i = ti;
        uint32_t *tk = src_k; src_k = dst_k; dst_k = tk;
    }
    /* four passes: the result is back in order[] */
    free(key); free(key2); free(idx2);
    return 0;
}

/* boxes: n x 4 float (x1, y1, x2, y2); scores: n float; 0 < threshold < 1. Writes the kept
   indices to keep and returns how many (-1: out of memory, -2: coordinates too far apart for
   the class and cell indices, -3: a NaN or infinite coordinate or x2 < x1 or y2 < y1). */
int64_t grid_nms(const float *boxes, const float *scores, int64_t n, double threshold, int64_t *keep)
{
    if (n <= 0) return 0;
    double L = 1.01 * log(1.0 / threshold), f = 1.01 * (1.0 - threshold);
    float *area = malloc(sizeof(float) * n);
    int64_t *order = malloc(sizeof(int64_t) * n), *rank = malloc(sizeof(int64_t) * n);
    int64_t *kw = malloc(sizeof(int64_t) * n), *kh = malloc(sizeof(int64_t) * n);
    int64_t *sorted = malloc(sizeof(int64_t) * n), *sidx = malloc(sizeof(int64_t) * n);
    double *cx = malloc(sizeof(double) * n), *cy = malloc(sizeof(double) * n);
    double *cellw = NULL, *cellh = NULL, *maxw = NULL, *maxh = NULL;
    char *suppressed = calloc(n, 1);
    Slot *table = NULL;
    float *sbox = NULL; /* x1, y1, x2, y2, area of each grouped entry, stored in place */
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
        /* logf: its error (~1e-7) is far inside the 1 % slack of the class width */
        double fw = floor(logf((float)w) / L), fh = floor(logf((float)h) / L);
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
        cellw[k - kwmin + 1] = f * exp((k + 2) * L);
        maxw[k - kwmin + 1] = exp((k + 1) * L); /* widths of class k are below this */
    }
    for (int64_t k = khmin - 1; k <= khmax + 1; k++) {
        cellh[k - khmin + 1] = f * exp((k + 2) * L);
        maxh[k - khmin + 1] = exp((k + 1) * L);
    }
    uint64_t size = 16;
    while (size < 2 * (uint64_t)m + 16) size <<= 1;
    table = zeroed_table(size);
    sbox = malloc(sizeof(float) * 5 * (m > 0 ? m : 1));
    if (!table || !sbox) goto done;
    /* group by (class, cell), each group in visiting order: count, then place */
    for (int64_t r = 0; r < n; r++) {
        int64_t i = order[r];
        if (kw[i] == INT64_MIN) continue;
        double gx = floor(cx[i] / cellw[kw[i] - kwmin + 1]), gy = floor(cy[i] / cellh[kh[i] - khmin + 1]);
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
        table[h].start = table[h].ptr = table[h].end = acc;
        acc += c;
    }
    for (int64_t r = 0; r < n; r++) {
        int64_t i = order[r];
        if (kw[i] == INT64_MIN) continue;
        int64_t e = table[sidx[i]].end++;
        const float *b = boxes + 4 * i;
        sorted[e] = i;
        sbox[5 * e] = b[0]; sbox[5 * e + 1] = b[1]; sbox[5 * e + 2] = b[2]; sbox[5 * e + 3] = b[3];
        sbox[5 * e + 4] = area[i];
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
            int64_t gx0 = (int64_t)floor((cx[i] - rx) / sx), gx1 = (int64_t)floor((cx[i] + rx) / sx);
            for (int64_t dh = -1; dh <= 1; dh++) {
                int64_t ch = kh[i] + dh;
                if (ch < khmin || ch > khmax) continue;
                double sy = cellh[ch - khmin + 1], ry = f * fmax((double)iy2 - iy1, maxh[ch - khmin + 1]);
                int64_t gy0 = (int64_t)floor((cy[i] - ry) / sy), gy1 = (int64_t)floor((cy[i] + ry) / sy);
                for (int64_t x = gx0; x <= gx1; x++) {
                    for (int64_t y = gy0; y <= gy1; y++) {
                        Slot *slot = lookup(table, size - 1, pack(cw, ch, x, y));
                        if (slot->key == 0) continue;
                        while (slot->ptr < slot->end && rank[sorted[slot->ptr]] <= r) slot->ptr++;
                        /* scan the later boxes, compacting away the suppressed ones (order kept) */
                        int64_t out = slot->ptr;
                        for (int64_t e = slot->ptr; e < slot->end; e++) {
                            int64_t j = sorted[e];
                            if (suppressed[j]) continue;
                            float *bj = sbox + 5 * e;
                            float xx1 = ix1 > bj[0] ? ix1 : bj[0];
                            float yy1 = iy1 > bj[1] ? iy1 : bj[1];
                            float xx2 = ix2 < bj[2] ? ix2 : bj[2];
                            float yy2 = iy2 < bj[3] ? iy2 : bj[3];
                            float w = xx2 - xx1 > 0.0f ? xx2 - xx1 : 0.0f;
                            float h = yy2 - yy1 > 0.0f ? yy2 - yy1 : 0.0f;
                            float inter = w * h;
                            float ovr = inter / (iarea + bj[4] - inter);
                            /* branch-free: mark, and keep the entry unless it was suppressed
                               (each box sits in exactly one list, so it leaves it here) */
                            int64_t sup = (double)ovr > threshold;
                            suppressed[j] = (char)sup;
                            float *to = sbox + 5 * out;
                            float b0 = bj[0], b1 = bj[1], b2 = bj[2], b3 = bj[3], b4 = bj[4];
                            sorted[out] = j;
                            to[0] = b0; to[1] = b1; to[2] = b2; to[3] = b3; to[4] = b4;
                            out += 1 - sup;
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
