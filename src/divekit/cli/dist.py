"""``divekit dist plan``: the step time of every distributed strategy on 1 to 1,024 devices,
predicted from the model's FLOPs, a device rate and an alpha-beta network
(:mod:`divekit.engine.planner`)."""

from __future__ import annotations

import argparse
import math
import re

from divekit.cli._common import add_action_command, add_command
from divekit.errors import DivekitError
from divekit.io import check_output

COMMANDS = ("dist",)  # `divekit dist ...` imports only this area

EXAMPLES = """\
examples:
  divekit dist plan resnet50 --input-shape 3,224,224 --flops-per-s 100T --bandwidth 25G \\
      --latency 10us --batch-size 1024 --plot resnet50-plan.png
  divekit dist plan bert_base --seq-len 128 --flops-per-s 100T --bandwidth 25G --batch-size 256
  divekit dist plan lenet --flops-per-s measure --bandwidth 1G --batch-size 128 --devices 8
  divekit dist plan lenet --input-shape 1,28,28 --num-classes 10 --flops-per-s 2G \\
      --bandwidth 0.5G --latency 100us --step-overhead 2ms --jitter 1ms --batch-size 128
      (benchmarks/planner_check.py measures all five inputs on your machine)
"""

_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_rate(text: str, option: str) -> float:
    """``"25G"``, ``"2.5e10"``, ``"100T"`` → a positive float (SI prefixes k M G T P)."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKMGTP]?)\s*", text)
    try:
        value = float(m.group(1)) * _SI[m.group(2)] if m else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise DivekitError(f"{option} must be a positive number (SI prefixes k, M, G, T, P "
                           f"allowed, e.g. 25G), got {text!r}")
    return value


def parse_seconds(text: str, option: str = "--latency") -> float:
    """``"10us"``, ``"0.5ms"``, ``"1e-5"`` (seconds) → seconds, >= 0."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(s|ms|us|µs|ns)?\s*", text)
    try:
        value = float(m.group(1)) * _TIME[m.group(2) or "s"] if m else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise DivekitError(f"{option} must be a time >= 0 (seconds, or with s, ms, us, ns), "
                           f"got {text!r}")
    return value


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    actions = add_action_command(sub, parent, "dist", help="plan training on many devices",
                                 description="Predict how distributed strategies scale.",
                                 examples=EXAMPLES)
    p = add_command(
        actions, parent, "plan", help="step time of each strategy on 1 to 1,024 devices",
        description="Predict the training step time, samples/s and scaling efficiency of "
        "allreduce (ddp), ps, async, pipeline, tensor and fsdp on 1, 2, 4, ... devices, from "
        "the model's FLOPs (divekit's FLOP counter, x3 for forward + backward), a device rate, "
        "an alpha-beta network (alpha per message, bandwidth per link), the fixed cost of a "
        "step (--step-overhead) and the spread of a device's step time (--jitter: a "
        "synchronous step waits for the slowest of N devices). Every step adds the overhead; "
        "every synchronous step on N devices adds jitter x E[max of N standard normals]. "
        "benchmarks/planner_check.py measures all five here and checks the prediction against "
        "2-process training.", examples=EXAMPLES)
    p.add_argument("model", help="model name: an image classifier or a BERT (see `divekit models`)")
    p.add_argument("--devices", type=int, default=1024, metavar="N",
                   help="the largest device count in the table (default: 1024)")
    p.add_argument("--flops-per-s", required=True, metavar="R",
                   help="device rate in FLOP/s (SI prefixes: 100T), or 'measure' to time a "
                   "float32 matrix product here")
    p.add_argument("--bandwidth", required=True, metavar="B",
                   help="bytes per second of one link (SI prefixes: 25G)")
    p.add_argument("--latency", default="10us", metavar="A",
                   help="seconds per message, alpha (e.g. 10us, 0.5ms, 1e-5; default: 10us)")
    p.add_argument("--step-overhead", default="0", metavar="T0",
                   help="fixed seconds of every step on each device whatever its batch: "
                   "optimizer step, batch fetch, Python and kernel launches; the intercept of "
                   "step time against batch size (e.g. 1.5ms; default: 0)")
    p.add_argument("--jitter", default="0", metavar="SIGMA",
                   help="standard deviation of one device's step time; a synchronous step "
                   "waits SIGMA x E[max of N normals] for its slowest device (0.56 SIGMA at N = "
                   "2, 3.2 SIGMA at 1,024; e.g. 0.4ms; default: 0)")
    p.add_argument("--batch-size", type=int, required=True, metavar="G",
                   help="global batch: samples per step over all devices")
    p.add_argument("--microbatches", type=int, metavar="M",
                   help="pipeline micro-batches per step (default: 4 per stage, at most G)")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="image classifiers: input (default: the model's own)")
    p.add_argument("--seq-len", type=int, default=128, metavar="T",
                   help="BERT: tokens per sequence (default: 128)")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="image classifiers: output classes (default: 1000, ImageNet's)")
    p.add_argument("--plot", metavar="PNG", help="draw the scaling efficiency and the batch "
                   "that makes data parallelism pay")
    p.add_argument("--csv", metavar="FILE", help="write every prediction as CSV")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --plot and --csv files that exist (default: refuse)")
    p.set_defaults(handler=cmd_plan)


MAX_DEVICES, MAX_BATCH = 1 << 20, 1 << 30


def cmd_plan(args: argparse.Namespace) -> None:
    from divekit.engine import planner

    if not 1 <= args.devices <= MAX_DEVICES:
        raise DivekitError(f"--devices must be in 1..{MAX_DEVICES}, got {args.devices}")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise DivekitError(f"--batch-size must be in 1..{MAX_BATCH}, got {args.batch_size}")
    if args.microbatches is not None and args.microbatches < 1:
        raise DivekitError(f"--microbatches must be >= 1, got {args.microbatches}")
    if not 1 <= args.num_classes <= 100_000:
        raise DivekitError(f"--num-classes must be in 1..100000, got {args.num_classes}")
    bandwidth = parse_rate(args.bandwidth, "--bandwidth")
    latency = parse_seconds(args.latency)
    overhead = parse_seconds(args.step_overhead, "--step-overhead")
    jitter = parse_seconds(args.jitter, "--jitter")
    measure = args.flops_per_s.strip().lower() == "measure"
    rate = None if measure else parse_rate(args.flops_per_s, "--flops-per-s")
    shape = None
    if args.input_shape:
        from divekit.models.summary import parse_shape

        shape = parse_shape(args.input_shape)
        if max(shape) > 4096:
            raise DivekitError(f"--input-shape sides must be at most 4096, got {args.input_shape}")
    out_csv = check_output(args.csv, [], overwrite=args.overwrite, option="--csv") \
        if args.csv else None
    out_png = check_output(args.plot, [args.csv] if args.csv else [], overwrite=args.overwrite,
                           option="--plot") if args.plot else None
    for out, given in ((out_csv, args.csv), (out_png, args.plot)):
        if out is not None and not out.parent.exists():
            raise DivekitError(f"folder {out.parent} does not exist (for {given})")
    from divekit.models import model_info

    model_info(args.model)  # an unknown name: one line listing the zoo
    cost = planner.profile_model(args.model, shape, seq_len=args.seq_len,
                                 num_classes=args.num_classes)
    if measure:
        rate = planner.measure_flops_per_s()
        print(f"measured: float32 1024x1024 matrix product at {rate / 1e9:.1f} GFLOP/s here")
    net = planner.Network(rate, bandwidth, latency, overhead, jitter)
    result = planner.plan(cost, net, args.batch_size, planner.device_counts(args.devices),
                          args.microbatches)
    print(planner.format_plan(result))
    if out_csv is not None:
        planner.write_csv(result, str(out_csv))
        print(f"csv: {args.csv}")
    if out_png is not None:
        from divekit.viz import plot_plan

        plot_plan(result, out_png, target=planner.TARGET_EFFICIENCY, note=planner.describe(result))
        print(f"plot: {args.plot}")
