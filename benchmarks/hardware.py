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
divekit time, medians of ``--repeats`` interleaved rounds (every side once a round); the goal
(cycle-accurate >= 20x SCALE-Sim's run on every layer) is judged on the per-round ratios'
min-max.

    python benchmarks/hardware.py
    python benchmarks/hardware.py --compute-only   # skip SCALE-Sim's slow memory stage
    python benchmarks/hardware.py --smoke          # small layers, 1 run: checks that it runs

Without the scalesim package its columns are skipped (said in the output) and divekit's
simulators run alone, checked against each other.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import numpy as np
from _common import (
    Report,
    add_markdown_arg,
    function_table,
    interleave,
    paired_ratio,
    verdict,
    wall,
)

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


GOAL_CYCLE, GOAL_ANALYTIC = 20.0, 1000.0  # over SCALE-Sim's stall-free run, every layer


def bench_layer(name: str, r: int, c: int, df: str, spec: dict, repeats: int, full: bool,
                rng: np.random.Generator,
                peer: bool = True) -> tuple[tuple[str, ...], dict[str, list[float]]]:
    """One layer, ``repeats`` interleaved rounds (SCALE-Sim's run, its compute stage, divekit's
    cycle-accurate run, 2,000 closed-form calls): the console row and the seconds per round of
    each side (``{side: [round 1, ...]}``; NaN where a side is skipped)."""
    m, n, k = mnk(spec)
    array = ArraySpec(r, c, df)
    kwargs = scalesim_kwargs(spec)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    out: dict[str, object] = {}
    calls = 2000

    def run_cycle() -> float:
        return wall(lambda: out.__setitem__("sim", simulate(a, b, array, convention="scalesim")))

    def run_analytic() -> float:
        return wall(lambda: out.__setitem__("closed", [
            gemm_cycles(m, n, k, array, convention="scalesim") for _ in range(calls)][-1])) / calls

    sides: dict[str, Callable[[], float]] = {}
    if peer:
        from divekit.hardware.reference import run_layer, time_full_run

        if full:
            sides["scalesim run"] = lambda: time_full_run(r, c, df, **kwargs)
        sides["scalesim compute"] = lambda: wall(
            lambda: out.__setitem__("ref", run_layer(r, c, df, **kwargs)))
    sides |= {"cycle": run_cycle, "analytic": run_analytic}
    times = interleave(sides, repeats, timer=lambda fn: fn())  # each side times itself
    nan = [float("nan")] * repeats
    times = {k: times.get(k, nan) for k in ("scalesim run", "scalesim compute", "cycle",
                                            "analytic")}
    sim, closed, ref = out["sim"], out["closed"], out.get("ref")
    assert (ref.cycles if peer else closed.cycles) == sim.stats.cycles == closed.cycles, (
        name, ref, sim.stats, closed)
    assert np.allclose(sim.output, a @ b)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref_t = med["scalesim run"] if full else med["scalesim compute"]
    row = (name, f"{r}x{c}", df, f"{m}x{k}x{n}", f"{closed.cycles:,}", f"{med['scalesim run']:.2f}",
           f"{med['scalesim compute']:.3f}", f"{med['cycle']:.3f}", f"{med['analytic']:.1e}",
           f"{ref_t / med['cycle']:.1f}", f"{med['scalesim compute'] / med['cycle']:.1f}",
           f"{ref_t / med['analytic']:,.0f}")
    return row, times


def profile_missed(report: Report, name: str, r: int, c: int, df: str, spec: dict, full: bool,
                   rng: np.random.Generator) -> None:
    """Print and report the top functions of both sides on a layer whose goal is not met."""
    from divekit.hardware.reference import run_layer, time_full_run

    m, n, k = mnk(spec)
    array = ArraySpec(r, c, df)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    kwargs = scalesim_kwargs(spec)
    peer = ((lambda: time_full_run(r, c, df, **kwargs)) if full
            else (lambda: run_layer(r, c, df, **kwargs)))
    headers, rows = function_table({"SCALE-Sim": peer,
                                    "divekit cycle-accurate": lambda: simulate(
                                        a, b, array, convention="scalesim")}, warm=False, digits=1)
    caption = (f"Where the time goes on {name} ({r}×{c} {df}), goal not met: the top functions "
               "by self time of one run of each side (cProfile), then each side's whole run "
               "and the part in the functions both sides call.")
    print(caption)
    for row in rows:
        print("  " + " | ".join(row))
    report.table(headers, rows, align="lll", caption=caption)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved rounds per layer (every side once a round); medians and "
                         "the per-round ratios' min-max")
    ap.add_argument("--compute-only", action="store_true",
                    help="time only SCALE-Sim's compute stage (skip its memory stage)")
    ap.add_argument("--smoke", action="store_true",
                    help="small layers on 8x8 and 8x4 arrays, 1 run: checks that it runs (seconds)")
    ap.add_argument("--only", default="",
                    help="run the layers whose 'name RxC dataflow' contains this, e.g. 128x128 "
                         "(SCALE-Sim's full run takes minutes a layer)")
    add_markdown_arg(ap)
    args = ap.parse_args()
    from importlib.metadata import PackageNotFoundError, version

    layers = [layer for layer in (SMOKE_LAYERS if args.smoke else LAYERS)
              if args.only in f"{layer[0]} {layer[1]}x{layer[2]} {layer[3]}"]
    if not layers:
        ap.error(f"no layer matches --only {args.only!r}")
    if args.smoke:
        args.repeats = 1
    try:
        import divekit.hardware.reference  # noqa: F401  (needs scalesim)

        peer, scalesim = True, f"scalesim {version('scalesim')}"
    except (ImportError, PackageNotFoundError):
        peer, scalesim = False, "scalesim not installed: its columns are skipped"
    full = not args.compute_only
    print(f"{scalesim}, numpy {np.__version__}; seconds; medians of {args.repeats} interleaved "
          "rounds (SCALE-Sim, divekit)")
    head = ("layer", "array", "df", "MxKxN", "cycles", "scalesim run", "scalesim compute",
            "cycle", "analytic", "cycle x", "cycle x compute", "analytic x")
    rows = [head]
    totals: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    goal_rows = []
    missed: list[tuple[str, int, int, str, dict]] = []  # layers whose goal is not met
    ref_side = "scalesim run" if full else "scalesim compute"
    for name, r, c, df, spec in layers:
        row, times = bench_layer(name, r, c, df, spec, args.repeats, full, rng, peer)
        rows.append(row)
        for k, v in times.items():
            totals[k] = totals.get(k, np.zeros(args.repeats)) + np.array(v)
        if peer:
            cyc = paired_ratio(times[ref_side], times["cycle"])
            goal_rows.append([f"{name} ({r}×{c} {df})", cyc.md(1), verdict(cyc, GOAL_CYCLE)])
            if goal_rows[-1][-1] != "met":
                missed.append((name, r, c, df, spec))
        print(f"  {name} {r}x{c} {df}: done", flush=True)
    med = {k: float(np.median(v)) for k, v in totals.items()}
    ref_t = med[ref_side]
    rows.append(("all layers", "", "", "", "", f"{med['scalesim run']:.2f}",
                 f"{med['scalesim compute']:.3f}", f"{med['cycle']:.3f}", f"{med['analytic']:.1e}",
                 f"{ref_t / med['cycle']:.1f}", f"{med['scalesim compute'] / med['cycle']:.1f}",
                 f"{ref_t / med['analytic']:,.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if j < 4 else cell.rjust(w)
                               for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    print("\n".join(lines))
    report = Report("Systolic-array simulation against SCALE-Sim")
    report.text(f"{scalesim}, numpy {np.__version__}. Seconds: medians of {args.repeats} "
                "interleaved rounds per layer (SCALE-Sim's stall-free run, its compute stage, "
                "divekit's cycle-accurate run, the closed form); all report the same cycles "
                "(asserted).")
    report.code("\n".join(lines))
    if peer:
        total = paired_ratio(list(totals[ref_side]), list(totals["cycle"]))
        goal_rows.append(["all layers", total.md(1), verdict(total, GOAL_CYCLE)])
        analytic = paired_ratio(list(totals[ref_side]), list(totals["analytic"]))
        print(f"cycle-accurate vs {ref_side}, all layers: {total} "
              f"(goal >= {GOAL_CYCLE:g}x on every layer: "
              f"{', '.join(sorted({row[-1] for row in goal_rows}))})")
        report.table(["layer", f"cycle-accurate speed-up over `{ref_side}` (min–max)",
                      f"goal ≥ {GOAL_CYCLE:g}×"], goal_rows, align="lrl")
        report.text(f"Closed form over `{ref_side}`, all layers: {analytic.md(0)}, goal "
                    f"≥ {GOAL_ANALYTIC:,.0f}×: {verdict(analytic, GOAL_ANALYTIC)}.")
        # where the time goes, both sides (the acceptance); --smoke shows it on one layer
        for name, r, c, df, spec in missed[:1] if args.smoke else missed:
            profile_missed(report, name, r, c, df, spec, full, rng)
    else:
        report.text("scalesim is not installed: no ratios.")
    report.write(args.markdown)


if __name__ == "__main__":
    main()
