"""Anchor labelling in C (the fast path of ``ops.anchors.multibox_target`` on float32 CPU input).

``multibox_target`` labels every anchor of every image: the IoU of each truth with each anchor,
the course's greedy pairing (largest IoU first, one anchor per truth), then every other anchor
takes its best truth if their IoU reaches the threshold. In torch that is a dozen passes over a
``(B, G, A)`` matrix plus a Python loop over the truths; here one pass per image computes the
image's ``G × A`` IoUs into a small scratch buffer (which stays in cache) and does the rest on
it, writing the class of each anchor and the bounding-box mask directly.

The arithmetic and the order are ``ops.boxes.box_iou``'s (float32, ``inter / (area_t + area_a -
inter)``, no contraction), so the IoUs are bit for bit torch's, and the greedy step keeps the
course's tie order (the smaller anchor index, then the smaller truth index). Each truth's best
anchor is cached and rescanned only when that anchor is taken, so a step costs ``O(G)``, not
``O(G·A)``. The offsets of the positive anchors (a few hundred) are left to torch, whose ``log``
the course's results were made with. ``tests/test_ops_anchors.py`` compares both paths with
each other and with d2l on random, tie-heavy and padded labels.

Built and loaded as :mod:`divekit.ops._native_nms` builds its kernel (same cache, same
``DIVEKIT_NATIVE=0`` opt-out); without a compiler ``load()`` is None and torch does the work.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from divekit.ops._native_nms import build_library

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* anchors: A x 4 float corner boxes; labels: B x G x 5 float rows [class, x1, y1, x2, y2],
   class < 0 for padding. Writes cls (B x A int64: class + 1, 0 for background), mask (B x A*4
   float: 1 for an assigned anchor, else 0) and the assigned anchors (flat index b*A + a and
   the truth) to pos and pos_truth; returns how many, or -1 when out of memory. */
int64_t assign_anchors(const float *anchors, const float *labels, int64_t B, int64_t G,
                       int64_t A, double threshold, int64_t *cls, float *mask, int64_t *pos,
                       int64_t *pos_truth)
{
    float *iou = malloc(sizeof(float) * (size_t)G * A), *area_a = malloc(sizeof(float) * A);
    float *rowmax = malloc(sizeof(float) * G), *best_a = malloc(sizeof(float) * A);
    int64_t *rowarg = malloc(sizeof(int64_t) * G), *asg = malloc(sizeof(int64_t) * A);
    int64_t count = -1;
    if (!iou || !area_a || !rowmax || !best_a || !rowarg || !asg) goto done;
    for (int64_t a = 0; a < A; a++) {
        const float *q = anchors + 4 * a;
        area_a[a] = (q[2] - q[0]) * (q[3] - q[1]);
    }
    /* step 2 needs iou >= max(t, 0), compared in float32 as torch compares a float32 tensor
       with a Python number */
    float reach = (float)(threshold > 0.0 ? threshold : 0.0);
    count = 0;
    for (int64_t b = 0; b < B; b++) {
        const float *lab = labels + 5 * G * b;
        /* the image's IoUs, truths x anchors, as ops.boxes.box_iou computes them */
        for (int64_t g = 0; g < G; g++) {
            const float *t = lab + 5 * g;
            float *row = iou + A * g;
            if (!(t[0] >= 0.0f)) { /* padding: the course's "deleted" marker, never picked */
                for (int64_t a = 0; a < A; a++) row[a] = -1.0f;
                continue;
            }
            float x1 = t[1], y1 = t[2], x2 = t[3], y2 = t[4];
            float area_t = (x2 - x1) * (y2 - y1);
            for (int64_t a = 0; a < A; a++) {
                const float *q = anchors + 4 * a;
                float lx = x1 > q[0] ? x1 : q[0], rx = x2 < q[2] ? x2 : q[2];
                float ly = y1 > q[1] ? y1 : q[1], ry = y2 < q[3] ? y2 : q[3];
                float w = rx - lx, h = ry - ly;
                w = w < 0.0f ? 0.0f : w;
                h = h < 0.0f ? 0.0f : h;
                float inter = w * h;
                float union_ = (area_t + area_a[a]) - inter;
                float v = inter / union_;
                row[a] = v != v ? 0.0f : v; /* NaN (two empty boxes): no overlap */
            }
        }
        /* step 2 of the course, done first (the greedy pairs overwrite it): every anchor takes
           its best truth (the first of equals) if the IoU reaches the threshold */
        for (int64_t a = 0; a < A; a++) { best_a[a] = iou[a]; asg[a] = 0; }
        for (int64_t g = 1; g < G; g++) {  /* truth by truth, so the loops run along rows */
            const float *row = iou + A * g;
            for (int64_t a = 0; a < A; a++) {
                int better = row[a] > best_a[a];
                best_a[a] = better ? row[a] : best_a[a];
                asg[a] = better ? g : asg[a];
            }
        }
        for (int64_t a = 0; a < A; a++) asg[a] = best_a[a] >= reach ? asg[a] : -1;
        /* step 1: pair the largest remaining IoU's anchor and truth, delete both, repeat; each
           truth's best anchor (the first of equals) is cached */
        for (int64_t g = 0; g < G; g++) {
            const float *row = iou + A * g;
            float best = row[0];
            int64_t arg = 0;
            for (int64_t a = 1; a < A; a++) if (row[a] > best) { best = row[a]; arg = a; }
            rowmax[g] = best; rowarg[g] = arg;
        }
        int64_t rounds = G < A ? G : A;
        for (int64_t round = 0; round < rounds; round++) {
            int64_t gs = 0;
            for (int64_t g = 1; g < G; g++) {  /* largest; ties: smaller anchor, then truth */
                if (rowmax[g] > rowmax[gs] || (rowmax[g] == rowmax[gs] && rowarg[g] < rowarg[gs]))
                    gs = g;
            }
            if (rowmax[gs] < 0.0f) break; /* every entry deleted: out of truths or anchors */
            int64_t as = rowarg[gs];
            asg[as] = gs;
            float *row = iou + A * gs;
            for (int64_t a = 0; a < A; a++) row[a] = -1.0f; /* delete the truth's row */
            rowmax[gs] = -1.0f; rowarg[gs] = 0;
            for (int64_t g = 0; g < G; g++) {               /* ... and the anchor's column */
                iou[A * g + as] = -1.0f;
                if (g != gs && rowarg[g] == as) {         /* its cached best was taken: rescan */
                    const float *r2 = iou + A * g;
                    float best = r2[0];
                    int64_t arg = 0;
                    for (int64_t a = 1; a < A; a++) if (r2[a] > best) { best = r2[a]; arg = a; }
                    rowmax[g] = best; rowarg[g] = arg;
                }
            }
        }
        int64_t *c = cls + A * b;
        float *m = mask + 4 * A * b;
        memset(c, 0, sizeof(int64_t) * A); /* background everywhere, then the few positives */
        memset(m, 0, sizeof(float) * 4 * A);
        for (int64_t a = 0; a < A; a++) {
            int64_t g = asg[a];
            if (g < 0) continue;
            c[a] = (int64_t)lab[5 * g] + 1;
            m[4 * a] = m[4 * a + 1] = m[4 * a + 2] = m[4 * a + 3] = 1.0f;
            pos[count] = A * b + a;
            pos_truth[count] = g;
            count++;
        }
    }
done:
    free(iou); free(area_a); free(rowmax); free(best_a); free(rowarg); free(asg);
    return count;
}
"""


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None when that is not possible."""
    lib = build_library("assign_anchors", SOURCE)
    if lib is None:
        return None
    lib.assign_anchors.restype = ctypes.c_int64
    lib.assign_anchors.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_int64, ctypes.c_double, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def usable(anchors: Tensor) -> bool:
    """Whether the kernel applies: float32 anchors on the CPU and the library built."""
    return anchors.device.type == "cpu" and anchors.dtype == torch.float32 and load() is not None


def assign_anchors(anchors: Tensor, labels: Tensor, iou_threshold: float
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``anchors (A, 4)``, ``labels (B, G, 5)`` (float32, checked by the caller, ``G, A > 0``)
    -> ``(class_labels (B, A) int64, bbox_mask (B, A*4), positives (P,) flat b*A + a,
    their truths (P,))``."""
    lib = load()
    assert lib is not None
    batch, truths = labels.shape[:2]
    num = anchors.shape[0]
    anchors, labels = anchors.detach().contiguous(), labels.detach().contiguous()
    cls = torch.empty(batch, num, dtype=torch.int64)
    mask = torch.empty(batch, num * 4, dtype=torch.float32)
    pos = torch.empty(batch * num, dtype=torch.int64)
    pos_truth = torch.empty(batch * num, dtype=torch.int64)
    count = lib.assign_anchors(anchors.data_ptr(), labels.data_ptr(), batch, truths, num,
                               float(iou_threshold), cls.data_ptr(), mask.data_ptr(),
                               pos.data_ptr(), pos_truth.data_ptr())
    if count < 0:
        raise MemoryError("assign_anchors: out of memory")
    return cls, mask, pos[:count], pos_truth[:count]
