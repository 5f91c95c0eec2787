"""``divekit hw simulate`` and ``divekit hw sweep``: the zoo (or a SCALE-Sim topology) on a
systolic array."""

from __future__ import annotations

import argparse
from pathlib import Path

from divekit.cli._common import add_action_command, add_command
from divekit.errors import DivekitError
from divekit.io import check_output

COMMANDS = ("hw",)  # the top-level commands add_commands adds (`divekit hw` imports only this area)
MAX_HW_BATCH = 65536  # --batch: the closed forms hold at any batch; cycle mode has its own bound

EXAMPLES = """\
examples:
  divekit hw simulate resnet18 --input-shape 3,224,224 --array 256x256 --clock-ghz 0.7
  divekit hw simulate resnet50 --input-shape 3,224,224 --batch 8 --plot batching.png
  divekit hw simulate lenet --mode cycle --array 16x16 --dataflow os
  divekit hw simulate --topology alexnet.csv --config scale.cfg --csv COMPUTE_REPORT.csv
  divekit hw sweep resnet18 --input-shape 3,224,224 --plot sweep.png
"""


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    actions = add_action_command(sub, parent, "hw", help="systolic-array simulation of the zoo",
                                 description="Map a model's convolution and linear layers onto "
                                 "a TPU-like systolic array: cycles, folds, utilisation per layer.",
                                 examples=EXAMPLES)

    p = add_command(
        actions, parent, "simulate", help="per-layer cycles and utilisation of a model",
        description="Trace MODEL with forward hooks, lower every conv (im2col) and linear layer "
        "to matrix products and run them on the array; or run a SCALE-Sim topology "
        "(--topology, with SCALE-Sim v2's conventions).")
    p.add_argument("model", nargs="?", help="model name (see `divekit models`)")
    _model_options(p)
    p.add_argument("--array", default=None, metavar="RxC",
                   help="array rows x columns, sides up to 65536 (default: 128x128; with "
                   "--config: the .cfg's)")
    p.add_argument("--dataflow", default=None, choices=["ws", "os", "is"],
                   help="weight-, output- or input-stationary (default: ws; with --config: "
                   "the .cfg's)")
    p.add_argument("--bandwidth-gbs", type=float, metavar="B",
                   help="memory bandwidth in GB/s: a layer takes the longer of compute and "
                   "moving its 8-bit operands once")
    p.add_argument("--mode", default="analytic", choices=["analytic", "cycle"],
                   help="closed-form cycles, or the cycle-accurate simulator on the layers' real "
                   "operands (small models and arrays: at most 3e9 PE-cycles, about half a "
                   "minute) (default: analytic)")
    p.add_argument("--overlap", action="store_true",
                   help="overlap each fold's drain with the next fold's fill (double-buffered; "
                   "SCALE-Sim v1 did this for os)")
    p.add_argument("--csv", metavar="FILE", help="write the per-layer table (topology runs: "
                   "SCALE-Sim's COMPUTE_REPORT.csv columns)")
    p.add_argument("--plot", metavar="PNG",
                   help="draw utilisation and per-sample latency against batch size")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --csv and --plot files that exist (default: refuse)")
    p.add_argument("--topology", metavar="CSV", help="a SCALE-Sim topology (conv or GEMM form)")
    p.add_argument("--config", metavar="CFG",
                   help="a SCALE-Sim .cfg for --topology (array size and dataflow)")
    p.set_defaults(handler=cmd_simulate)

    p = add_command(
        actions, parent, "sweep", help="compare array shapes and dataflows on a model",
        description="Total cycles, utilisation and latency of MODEL on square and non-square "
        "arrays under ws, os and is, in one table and one picture.")
    p.add_argument("model", help="model name (see `divekit models`)")
    _model_options(p)
    p.add_argument("--arrays", default="32x32,64x64,128x128,256x256,32x128,128x32,64x256,256x64",
                   metavar="LIST", help="comma-separated RxC shapes (default: 32x32 ... 256x256 "
                   "and four non-square)")
    p.add_argument("--dataflows", default="ws,os,is", metavar="LIST",
                   help="comma-separated dataflows (default: ws,os,is)")
    p.add_argument("--plot", metavar="PNG", help="picture (default: MODEL-sweep.png)")
    p.add_argument("--overwrite", action="store_true", help="replace --plot if it exists")
    p.set_defaults(handler=cmd_sweep)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", metavar="C,H,W", help="input (default: the model's own)")
    p.add_argument("--batch", type=int, default=1,
                   help=f"batch size, up to {MAX_HW_BATCH} (default: 1)")
    p.add_argument("--num-classes", type=int, default=10, help="output classes (default: 10)")
    p.add_argument("--clock-ghz", type=float, default=1.0, metavar="F",
                   help="array clock in GHz (default: 1.0; TPU v1: 0.7)")


def _check_positive(args: argparse.Namespace) -> None:
    import math

    for flag, value in (("--clock-ghz", args.clock_ghz),
                        ("--bandwidth-gbs", getattr(args, "bandwidth_gbs", None))):
        if value is not None and not math.isfinite(value):
            raise DivekitError(f"{flag} must be a finite number, got {value}")
    if not 0 < args.batch <= MAX_HW_BATCH:
        raise DivekitError(f"--batch must be positive and at most {MAX_HW_BATCH}, got {args.batch}")
    if args.clock_ghz <= 0:
        raise DivekitError(f"--clock-ghz must be positive, got {args.clock_ghz}")
    if getattr(args, "bandwidth_gbs", None) is not None and args.bandwidth_gbs <= 0:
        raise DivekitError(f"--bandwidth-gbs must be positive, got {args.bandwidth_gbs}")


def _build(args: argparse.Namespace, weights: bool = False):
    from divekit.hardware.zoo import build_image_model

    return build_image_model(args.model, args.input_shape, args.num_classes, weights=weights)


def _output_path(path: str, inputs: list[str | None], overwrite: bool = False,
                 option: str = "--csv") -> Path:
    """An output file: never one of ``inputs`` (nor another output of the command), an existing
    one only with ``--overwrite`` (:func:`divekit.io.check_output`), in a folder that exists."""
    out = check_output(path, [given for given in inputs if given], overwrite=overwrite,
                       option=option)
    if not out.parent.exists():
        raise DivekitError(f"folder {out.parent} does not exist (for {path})")
    return out


def cmd_simulate(args: argparse.Namespace) -> None:
    from divekit.hardware.analytic import ArraySpec, parse_array

    _check_positive(args)
    if args.topology:
        _simulate_topology(args)
        return
    if not args.model:
        raise DivekitError("hw simulate needs a MODEL or --topology FILE.csv")
    if args.config:
        raise DivekitError("--config (a SCALE-Sim .cfg) goes with --topology; for a MODEL give "
                           "--array and --dataflow")
    from divekit.hardware.zoo import format_result, simulate_model

    array = ArraySpec(*parse_array(args.array or "128x128"), args.dataflow or "ws")
    out_csv = _output_path(args.csv, [], args.overwrite) if args.csv else None
    out_png = _output_path(args.plot, [args.csv], args.overwrite, "--plot") if args.plot else None
    model, shape = _build(args, weights=args.mode == "cycle")
    result = simulate_model(model, shape, array, batch=args.batch, mode=args.mode,
                            overlap=args.overlap)
    title = (f"{args.model} on a {array.rows}x{array.cols} {array.dataflow} array, input "
             f"({args.batch}, {', '.join(map(str, shape))}), {args.mode} mode")
    print(format_result(result, title=title, clock_ghz=args.clock_ghz,
                        bandwidth_gbs=args.bandwidth_gbs))
    if out_csv is not None:
        from divekit.hardware.zoo import write_layer_csv

        write_layer_csv(out_csv, result, args.clock_ghz, args.bandwidth_gbs)
        print(f"csv: {args.csv}")
    if out_png is not None:
        from divekit.hardware.explore import batch_curve
        from divekit.hardware.zoo import trace_model
        from divekit.viz import plot_batching

        traced, _ = trace_model(model, shape)
        points = batch_curve(traced, array, args.clock_ghz, overlap=args.overlap)
        plot_batching(points, out_png, f"{args.model} on {array.rows}x{array.cols} "
                      f"{array.dataflow} at {args.clock_ghz:g} GHz")
        print(f"plot: {args.plot}")


def _simulate_topology(args: argparse.Namespace) -> None:
    from divekit.hardware.analytic import ArraySpec, parse_array
    from divekit.hardware.scalesim_io import (
        read_config,
        read_topology,
        simulate_topology,
        write_compute_report,
    )

    if args.model:
        raise DivekitError("give either a MODEL or --topology, not both")
    if args.mode != "analytic" or args.overlap:
        raise DivekitError("--topology runs follow SCALE-Sim v2 (analytic, no overlap); drop "
                           "--mode cycle / --overlap")
    if args.plot:
        raise DivekitError("--plot draws a MODEL's batch curve; a --topology run writes its "
                           "table (--csv) only")
    if args.config and (args.array or args.dataflow):
        given = " and ".join(f for f, v in (("--array", args.array),
                                             ("--dataflow", args.dataflow)) if v)
        raise DivekitError(f"--config {args.config} sets the array and dataflow; drop {given} "
                           "(or --config)")
    out_csv = (_output_path(args.csv, [args.topology, args.config], args.overwrite)
               if args.csv else None)
    layers = read_topology(args.topology)
    array = (read_config(args.config) if args.config
             else ArraySpec(*parse_array(args.array or "128x128"), args.dataflow or "ws"))
    from divekit.hardware.zoo import format_topology

    stats = simulate_topology(layers, array)
    print(format_topology(f"{Path(args.topology).name} on a {array.rows}x{array.cols} "
                          f"{array.dataflow} array (SCALE-Sim v2 conventions, stall-free)",
                          layers, stats, array, args.clock_ghz))
    if out_csv is not None:
        write_compute_report(out_csv, stats)
        print(f"csv: {args.csv}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from divekit.hardware.analytic import DATAFLOWS, parse_array
    from divekit.hardware.explore import format_points, sweep
    from divekit.hardware.zoo import trace_model
    from divekit.viz import plot_sweep

    _check_positive(args)
    arrays = tuple(parse_array(a.strip()) for a in args.arrays.split(",") if a.strip())
    dataflows = tuple(d.strip().lower() for d in args.dataflows.split(",") if d.strip())
    bad = [d for d in dataflows if d not in DATAFLOWS]
    if bad or not dataflows or not arrays:
        raise DivekitError(f"--dataflows must list some of {', '.join(DATAFLOWS)}, got "
                           f"{args.dataflows!r}" if bad or not dataflows
                           else f"--arrays lists no shape: {args.arrays!r}")
    plot = args.plot or f"{args.model}-sweep.png"
    out_png = _output_path(plot, [], args.overwrite, "--plot")
    model, shape = _build(args)
    traced, _ = trace_model(model, shape)
    points = sweep(traced, args.clock_ghz, args.batch, arrays, dataflows)
    print(format_points(points, f"{args.model}, input ({args.batch}, "
                        f"{', '.join(map(str, shape))}), at {args.clock_ghz:g} GHz"))
    plot_sweep(points, out_png,
               f"{args.model} (batch {args.batch}): utilisation by array and dataflow")
    print(f"plot: {plot}")
