"""The systolic-array simulator against SCALE-Sim (the ``scalesim`` package) on the same layers.

For each layer (a SCALE-Sim conv row or GEMM, on an array, under a dataflow) one run times:

* ``scalesim run``: SCALE-Sim's whole stall-free single-layer run (``single_layer_sim.run``:
  operand, prefetch and demand matrices, then its SRAM/DRAM model serving every demand row;
  checked to stall 0 cycles; see :mod:`divekit.hardware.reference` for the numpy >= 2.4 caveat);
* ``scalesim compute``: only its compute stage (operand, prefetch and demand matrices), which is
  what decides the stall-free cycles (a lower bound on SCALE-Sim's time);
* ``cycle``: divekit's cycle-accurate simulator moving random float64 operands through the grid
  (and producing the product, checked against ``A @ B``);
* ``analytic``: the closed form.

All must report the same cycles (SCALE-Sim v2 convention). Speed-ups are SCALE-Sim time over
divekit time (median of ``--repeats`` divekit runs; SCALE-Sim once per layer).

    python benchmarks/hardware.py
    python benchmarks/hardware.py --compute-only   # skip SCALE-Sim's slow memory stage
    python benchmarks/hardware.py --smoke          # small layers, 1 run: checks that it runs

Without the scalesim package its columns are skipped (said in the output) and divekit's
simulators run alone, checked against each other.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from divekit.hardware.analytic import ArraySpec, gemm_cycles
from divekit.hardware.scalesim_io import scalesim_ofmap
from divekit.hardware.systolic import simulate

# (name, rows, cols, dataflow, conv (H, W, F, C, filters, stride) or gemm (M, N, K))
LAYERS: list[tuple[str, int, int, str, dict]] = [
    ("alexnet conv1", 32, 32, "ws", dict(conv=(224, 224, 11, 3, 96, 4))),
    ("alexnet conv1", 32, 32, "os", dict(conv=(224, 224, 11, 3, 96, 4))),
    ("alexnet conv1", 32, 32, "is", dict(conv=(224, 224, 11, 3, 96, 4))),
    ("resnet 3x3 64->64 @56", 64, 64, "ws", dict(conv=(58, 58, 3, 64, 64, 1))),
    ("resnet 3x3 256->256 @14", 128, 128, "ws", dict(conv=(16, 16, 3, 256, 256, 1))),
    ("inception 3x3 192->384 @7", 32, 32, "os", dict(conv=(7, 7, 3, 192, 384, 1))),
    ("gemm 256x128x256", 32, 32, "ws", dict(gemm=(256, 128, 256))),
    ("gemm 256x128x256", 32, 32, "is", dict(gemm=(256, 128, 256))),
    ("dense batch 8 4096x1000", 128, 128, "ws", dict(gemm=(8, 1000, 4096))),
]
SMOKE_LAYERS: list[tuple[str, int, int, str, dict]] = [  # --smoke: every dataflow, conv and gemm
    ("conv 3x3 8->8 @10", 8, 8, "ws", dict(conv=(10, 10, 3, 8, 8, 1))),
    ("conv 3x3 8->8 @10", 8, 8, "os", dict(conv=(10, 10, 3, 8, 8, 1))),
    ("conv 3x3 8->8 @10", 8, 8, "is", dict(conv=(10, 10, 3, 8, 8, 1))),
    ("gemm 32x16x32", 8, 4, "ws", dict(gemm=(32, 16, 32))),
]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def mnk(spec: dict) -> tuple[int, int, int]:
    if "gemm" in spec:
        return spec["gemm"]
    h, w, f, c, nf, s = spec["conv"]
    return scalesim_ofmap(h, f, s) * scalesim_ofmap(w, f, s), nf, f * f * c


def scalesim_kwargs(spec: dict) -> dict:
    if "gemm" in spec:
        return dict(gemm=spec["gemm"])
    h, w, f, c, nf, s = spec["conv"]
    return dict(ifmap=(h, w), filt=(f, f), channels=c, filters=nf, stride=s)


def bench_layer(name: str, r: int, c: int, df: str, spec: dict, repeats: int, full: bool,
                rng: np.random.Generator, peer: bool = True) -> tuple[tuple[str, ...], list[float]]:
    m, n, k = mnk(spec)
    array = ArraySpec(r, c, df)
    kwargs = scalesim_kwargs(spec)
    t_full = t_ref = float("nan")
    ref = None
    if peer:
        from divekit.hardware.reference import run_layer, time_full_run

        t_full = time_full_run(r, c, df, **kwargs) if full else float("nan")
        t_ref, ref = timed(lambda: run_layer(r, c, df, **kwargs), 1)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    t_cyc, sim = timed(lambda: simulate(a, b, array, convention="scalesim"), repeats)
    calls = 2000
    t_an, closed = timed(lambda: [gemm_cycles(m, n, k, array, convention="scalesim")
                                  for _ in range(calls)][-1], repeats)
    t_an /= calls
    assert (ref.cycles if peer else closed.cycles) == sim.stats.cycles == closed.cycles, (
        name, ref, sim.stats, closed)
    assert np.allclose(sim.output, a @ b)
    ref_t = t_full if full else t_ref
    row = (name, f"{r}x{c}", df, f"{m}x{k}x{n}", f"{closed.cycles:,}", f"{t_full:.2f}",
           f"{t_ref:.3f}", f"{t_cyc:.3f}", f"{t_an:.1e}", f"{ref_t / t_cyc:.1f}",
           f"{t_ref / t_cyc:.1f}", f"{ref_t / t_an:,.0f}")
    return row, [t_full, t_ref, t_cyc, t_an]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="divekit runs per layer (median)")
    ap.add_argument("--compute-only", action="store_true",
                    help="time only SCALE-Sim's compute stage (skip its memory stage)")
    ap.add_argument("--smoke", action="store_true",
                    help="small layers on 8x8 and 8x4 arrays, 1 run: checks that it runs (seconds)")
    args = ap.parse_args()
    from importlib.metadata import PackageNotFoundError, version

    layers = SMOKE_LAYERS if args.smoke else LAYERS
    if args.smoke:
        args.repeats = 1
    try:
        import divekit.hardware.reference  # noqa: F401  (needs scalesim)

        peer, scalesim = True, f"scalesim {version('scalesim')}"
    except (ImportError, PackageNotFoundError):
        peer, scalesim = False, "scalesim not installed: its columns are skipped"
    full = not args.compute_only
    print(f"{scalesim}, numpy {np.__version__}; seconds; divekit: median of "
          f"{args.repeats} runs; SCALE-Sim: one run")
    head = ("layer", "array", "df", "MxKxN", "cycles", "scalesim run", "scalesim compute",
            "cycle", "analytic", "cycle x", "cycle x compute", "analytic x")
    rows = [head]
    totals = np.zeros(4)
    rng = np.random.default_rng(0)
    for name, r, c, df, spec in layers:
        row, times = bench_layer(name, r, c, df, spec, args.repeats, full, rng, peer)
        rows.append(row)
        totals += times
        print(f"  {name} {r}x{c} {df}: done", flush=True)
    t_full, t_ref, t_cyc, t_an = totals
    ref_t = t_full if full else t_ref
    rows.append(("all layers", "", "", "", "", f"{t_full:.2f}", f"{t_ref:.3f}", f"{t_cyc:.3f}",
                 f"{t_an:.1e}", f"{ref_t / t_cyc:.1f}", f"{t_ref / t_cyc:.1f}",
                 f"{ref_t / t_an:,.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if j < 4 else cell.rjust(w)
                        for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0 or i == len(rows) - 2:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
