"""A model on the array: trace every conv and linear layer, map each to its matrix products.

One forward pass with hooks records each ``nn.Conv2d``, ``nn.ConvTranspose2d`` and ``nn.Linear``
call's input shape; the layer becomes ``groups`` products ``(M×K)·(K×N)``
(:mod:`divekit.hardware.lowering`; a transposed conv is ``(B·H·W × C_in)·(C_in × C_out·kh·kw)``
followed by a col2im scatter-add), each run on the array analytically or cycle by cycle. Everything else (normalisation, activations, pooling,
reshapes) runs on the vector unit and is only listed.

Per layer: cycles = groups × cycles of one product; utilisation = MACs / (PEs × cycles); time =
cycles / clock. With a memory bandwidth, a layer also needs ``bytes / bandwidth`` seconds to
move its operands once (8-bit: ``M·K + K·N + M·N`` bytes per product) and takes the longer of
the two (a roofline per layer).
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from divekit.errors import DivekitError
from divekit.hardware.analytic import ArraySpec, GemmStats, gemm_cycles
from divekit.hardware.lowering import GemmShape, im2col, pair
from divekit.hardware.systolic import simulate

MODES = ("analytic", "cycle")
# the most work --mode cycle may take on, in PE-cycles (Σ over layers of the cycles of one
# product × the array's PEs; the simulator moves every PE once a cycle): about 10^8 a second
# on one CPU core, so the limit is half a minute or so (lenet on 256x256: 3.6e8, 4 s). The
# closed form gives the same cycle counts at any size (--mode analytic).
MAX_CYCLE_WORK = 3 * 10**9


@dataclass
class TracedLayer:
    name: str
    kind: str  # "conv", "convT" or "linear"
    shape: GemmShape  # per sample batch 1 (M scales with the batch)
    operands: tuple[torch.Tensor, torch.Tensor] | None = None  # group 0's (M×K, K×N), cycle mode


@dataclass
class LayerResult:
    name: str
    kind: str
    shape: GemmShape  # at the simulated batch
    stats: GemmStats  # one of the ``groups`` identical products

    @property
    def cycles(self) -> int:
        return self.stats.cycles * self.shape.groups

    @property
    def folds(self) -> int:
        return self.stats.folds * self.shape.groups

    @property
    def macs(self) -> int:
        return self.shape.macs

    @property
    def utilisation(self) -> float:
        return self.macs / (self.stats.rows * self.stats.cols * self.cycles)

    def bytes_moved(self, bytes_per_elem: int = 1) -> int:
        s = self.shape
        return s.groups * (s.m * s.k + s.k * s.n + s.m * s.n) * bytes_per_elem


@dataclass
class ModelResult:
    array: ArraySpec
    batch: int
    layers: list[LayerResult]
    vector_layers: list[tuple[str, str]] = field(default_factory=list)  # (name, type)

    @property
    def cycles(self) -> int:
        return sum(layer.cycles for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def utilisation(self) -> float:
        return self.macs / (self.array.pes * self.cycles)


def trace_model(model: nn.Module, input_shape: tuple[int, ...], *, batch: int = 1,
                keep_operands: bool = False) -> tuple[list[TracedLayer], list[tuple[str, str]]]:
    """Run one random input of ``(batch, *input_shape)`` through ``model`` (on the model's device;
    a model on ``meta`` only propagates shapes) and record its conv and linear layers (as
    products) and its other leaf layers. A shape the model rejects raises a
    :class:`DivekitError` that names the innermost layer that failed."""
    traced: list[TracedLayer] = []
    others: list[tuple[str, str]] = []
    stack: list[str] = []
    calls: Counter[str] = Counter()

    def pre_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            stack.append(name)
        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            stack.pop()
            if list(module.children()):
                return
            calls[name] += 1
            label = name if calls[name] == 1 else f"{name}#{calls[name]}"
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            if (isinstance(module, nn.Conv2d) and x is not None and x.dim() == 4
                    and isinstance(output, torch.Tensor)):
                _trace_conv(module, x, output, label, traced, keep_operands)
            elif isinstance(module, nn.ConvTranspose2d) and x is not None and x.dim() == 4:
                _trace_conv_transpose(module, x, label, traced, keep_operands)
            elif isinstance(module, nn.Linear) and x is not None:
                m = x.numel() // x.shape[-1]
                ops = None
                if keep_operands:
                    ops = (x.reshape(m, -1).double(), module.weight.detach().T.double())
                traced.append(TracedLayer(label, "linear", GemmShape(
                    m=max(m // batch, 1), n=module.out_features, k=module.in_features), ops))
            else:
                others.append((label, type(module).__name__))
        return hook

    handles = []
    for name, module in model.named_modules():
        name = name or type(model).__name__
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        handles.append(module.register_forward_hook(post_hook(name)))
    # The model's own device: a model built on "meta" traces shapes without computing.
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    if keep_operands and device.type == "meta":
        raise DivekitError("cycle mode needs a model with real weights, not one on 'meta'")
    try:
        with torch.no_grad(), (_MetaShapes() if device.type == "meta" else contextlib.nullcontext()):
            model.eval()
            make = torch.empty if device.type == "meta" else torch.randn  # meta: no values
            model(make(batch, *input_shape, device=device))
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        where = stack[-1] if stack else type(model).__name__
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shape = ",".join(map(str, input_shape))
        raise DivekitError(f"input shape {shape} rejected at layer {where!r}: {first}") from None
    finally:
        for h in handles:
            h.remove()
    if not traced:
        raise DivekitError(f"{type(model).__name__} has no convolution or linear layer to map "
                           "onto a systolic array")
    return traced, others


# Functions whose output has the shape of their inputs broadcast together (normalisations: of
# their first input). On "meta" torch runs several of them through its Python reference
# kernels, whose first call imports the whole compiler stack (about a second); a shape-only
# trace needs none of it.
_ELEMENTWISE = frozenset({
    "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "mul",
    "__mul__", "__rmul__", "__imul__", "mul_", "div", "__truediv__", "__rtruediv__",
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish",
    "leaky_relu", "elu", "dropout", "dropout2d", "alpha_dropout", "softmax", "log_softmax",
})
_SAME_AS_INPUT = frozenset({"batch_norm", "layer_norm", "group_norm", "instance_norm",
                            "local_response_norm"})


class _MetaShapes(TorchFunctionMode):
    """Shape propagation for meta tensors without the reference kernels (see above)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (name in ("adaptive_avg_pool2d", "adaptive_max_pool2d") and args
                and getattr(args[0], "is_meta", False) and not kwargs.get("return_indices")):
            x, size = args[0], (args[1] if len(args) > 1 else kwargs["output_size"])
            size = pair(size) if not isinstance(size, (tuple, list)) else tuple(size)
            hw = tuple(x.shape[-2 + i] if s is None else s for i, s in enumerate(size))
            return torch.empty((*x.shape[:-2], *hw), dtype=x.dtype, device="meta")
        if name in ("conv2d", "max_pool2d", "avg_pool2d") and args and getattr(
                args[0], "is_meta", False) and not kwargs.get("return_indices"):
            return _window_output(name, args, kwargs)
        if name == "linear" and len(args) >= 2 and getattr(args[0], "is_meta", False):
            x, weight = args[0], args[1]
            return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device="meta")
        if name in _ELEMENTWISE or name in _SAME_AS_INPUT:
            given = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if given and all(t.is_meta for t in given):
                first = given[0]
                shape = (first.shape if name in _SAME_AS_INPUT
                         else _broadcast(*(t.shape for t in given)))
                return torch.empty(shape, dtype=first.dtype, device="meta")
        return func(*args, **kwargs)


class _SkipMetaInit(TorchFunctionMode):
    """In-place initialisers (``normal_``, ``zero_``, ...) on meta tensors do nothing: there are
    no values to fill, and torch would otherwise route ``normal_`` on meta through its Python
    reference kernels, which import the compiler stack (about a second of start-up)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes it by name
        if name.endswith("_") and not name.endswith("__") and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)


def build_image_model(name: str, input_shape: str | None, num_classes: int, *,
                      weights: bool = False, command: str = "hw"
                      ) -> tuple[nn.Module, tuple[int, int, int]]:
    """Zoo model ``name`` and its C,H,W input (``input_shape`` as ``"C,H,W"``, default the
    model's own). Without ``weights`` it is built on the meta device: tracing it propagates
    shapes only, which is all the analytic mode needs."""
    from divekit.models import create_model, model_info
    from divekit.models.summary import parse_shape

    info = model_info(name)
    if info.input_shape is None:
        raise DivekitError(f"{command} works on image models; {name!r} is a {info.task} model")
    shape = parse_shape(input_shape) if input_shape else info.input_shape
    if weights:
        return create_model(name, num_classes=num_classes, in_channels=shape[0]), shape
    with torch.device("meta"), _SkipMetaInit():
        model = create_model(name, num_classes=num_classes, in_channels=shape[0])
    return model, shape


def _broadcast(*shapes: torch.Size) -> tuple[int, ...]:
    """NumPy's broadcasting rule on shapes (right-aligned; a 1 stretches to its partner)."""
    rank = max(len(shape) for shape in shapes)
    out = []
    for i in range(-rank, 0):
        sizes = {shape[i] for shape in shapes if len(shape) >= -i} - {1}
        if len(sizes) > 1:
            raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _window_output(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The output of a convolution or pooling of a meta tensor, from PyTorch's shape formula
    ``H_out = ⌊(H + 2p − d(k − 1) − 1) / s⌋ + 1`` (``ceil_mode``: rounded up, keeping the last
    window's start inside the padded input)."""
    names = (("input", "weight", "bias", "stride", "padding", "dilation", "groups")
             if name == "conv2d" else
             ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
             if name == "max_pool2d" else ("input", "kernel_size", "stride", "padding", "ceil_mode"))
    given = {**dict(zip(names, args)), **kwargs}
    x = given["input"]
    if name == "conv2d":
        kernel, channels = tuple(given["weight"].shape[-2:]), given["weight"].shape[0]
        stride = pair(given.get("stride", 1))
    else:
        kernel, channels = pair(given["kernel_size"]), x.shape[-3]
        stride = pair(given.get("stride") or kernel)
    dilation, padding = pair(given.get("dilation", 1)), given.get("padding", 0)
    if padding == "same":
        return torch.empty((*x.shape[:-3], channels, *x.shape[-2:]), dtype=x.dtype, device="meta")
    padding = (0, 0) if padding == "valid" else pair(padding)
    sizes = []
    for i in range(2):
        span = x.shape[-2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1
        out = (-(-span // stride[i]) if given.get("ceil_mode") else span // stride[i]) + 1
        if given.get("ceil_mode") and (out - 1) * stride[i] >= x.shape[-2 + i] + padding[i]:
            out -= 1
        if out < 1:
            raise RuntimeError(f"{name}: output size {out} is too small (input "
                               f"{tuple(x.shape[-2:])}, kernel {kernel})")
        sizes.append(out)
    return torch.empty((*x.shape[:-3], channels, *sizes), dtype=x.dtype, device="meta")


def _trace_conv(module: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, label: str,
                traced: list[TracedLayer], keep_operands: bool) -> None:
    """M from the output actually produced (B·H_out·W_out), K = C_in/g·kh·kw, N = C_out/g."""
    kernel, stride, dilation = (pair(v) for v in (module.kernel_size, module.stride,
                                                  module.dilation))
    g = module.groups
    c_g, n_g = x.shape[1] // g, module.out_channels // g
    shape = GemmShape(m=y.shape[-2] * y.shape[-1], n=n_g, k=c_g * kernel[0] * kernel[1],
                      groups=g)
    ops = None
    if keep_operands:
        if isinstance(module.padding, str):  # "valid", or "same" (odd kernels: symmetric)
            pad = (0, 0) if module.padding == "valid" else (
                dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2)
        else:
            pad = pair(module.padding)
        a = im2col(x[:, :c_g].double(), kernel, stride, pad, dilation)
        if a.shape[0] != y.shape[0] * shape.m:
            raise DivekitError(f"cycle mode cannot lower {label}'s padding {module.padding!r}")
        ops = (a, module.weight.detach()[:n_g].reshape(n_g, -1).T.double())
    traced.append(TracedLayer(label, "conv", shape, ops))


def _trace_conv_transpose(module: nn.ConvTranspose2d, x: torch.Tensor, label: str,
                          traced: list[TracedLayer], keep_operands: bool) -> None:
    """A transposed convolution is the product (B·H·W × C_in/g)·(C_in/g × C_out/g·kh·kw) per
    group, whose rows are then scattered and summed into the output (col2im, vector unit)."""
    b, c, h, w = x.shape
    g = module.groups
    c_g, n_g = c // g, module.out_channels // g
    kh, kw = module.kernel_size
    ops = None
    if keep_operands:
        a = x[:, :c_g].permute(0, 2, 3, 1).reshape(b * h * w, c_g).double()
        ops = (a, module.weight.detach()[:c_g].reshape(c_g, -1).double())
    traced.append(TracedLayer(label, "convT", GemmShape(m=h * w, n=n_g * kh * kw, k=c_g,
                                                        groups=g), ops))


def at_batch(shape: GemmShape, batch: int) -> GemmShape:
    """The same layer with M scaled to ``batch`` samples (M = batch · pixels or rows)."""
    return GemmShape(m=shape.m * batch, n=shape.n, k=shape.k, groups=shape.groups)


def map_layers(traced: list[TracedLayer], array: ArraySpec, *, batch: int = 1,
               mode: str = "analytic", overlap: bool = False) -> list[LayerResult]:
    """Cycles of each traced layer: closed form, or the cycle-accurate simulator on the layer's
    own operands (group 0; the other groups are the same timeline), checked against matmul."""
    if mode not in MODES:
        raise DivekitError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    results = []
    for layer in traced:
        shape = at_batch(layer.shape, batch)
        if mode == "cycle":
            if layer.operands is None:
                raise DivekitError("cycle mode needs the layers traced with keep_operands=True")
            a, w = layer.operands
            sim = simulate(a.numpy(), w.numpy(), array, overlap=overlap)
            expected = (a @ w).numpy()
            if not np.allclose(sim.output, expected, rtol=1e-9, atol=1e-9):
                raise RuntimeError(f"systolic result differs from matmul at {layer.name}")
            stats = sim.stats
        else:
            stats = gemm_cycles(shape.m, shape.n, shape.k, array, overlap=overlap)
        results.append(LayerResult(layer.name, layer.kind, shape, stats))
    return results


def cycle_work(traced: list[TracedLayer], array: ArraySpec, batch: int = 1) -> int:
    """PE-cycles the cycle-accurate simulator spends on ``traced`` (traced at batch 1) at
    ``batch``: per layer, the closed-form cycles of one product (the simulator runs group 0
    only) times the array's PEs."""
    return sum(gemm_cycles(s.m, s.n, s.k, array).cycles * array.pes
               for s in (at_batch(t.shape, batch) for t in traced))


def check_cycle_work(traced: list[TracedLayer], array: ArraySpec, batch: int = 1) -> None:
    """Refuse, in one line, a cycle-mode run over :data:`MAX_CYCLE_WORK` PE-cycles."""
    work = cycle_work(traced, array, batch)
    if work > MAX_CYCLE_WORK:
        raise DivekitError(
            f"--mode cycle on a {array.rows}x{array.cols} array at batch {batch} would simulate "
            f"{work:.2g} PE-cycles, over the limit of {MAX_CYCLE_WORK:.0e} (about half a minute); "
            "use a smaller --array or --batch, or --mode analytic (the same cycle counts, in "
            "closed form)")


def simulate_model(model: nn.Module, input_shape: tuple[int, ...], array: ArraySpec, *,
                   batch: int = 1, mode: str = "analytic", overlap: bool = False) -> ModelResult:
    """Trace ``model`` on ``input_shape`` and map every conv/linear layer onto ``array``."""
    if batch <= 0:
        raise DivekitError(f"--batch must be positive, got {batch}")
    cycle = mode == "cycle"
    if cycle:  # refused before the operands at the real batch are made, let alone simulated
        check_cycle_work(trace_model(model, input_shape)[0], array, batch)
    traced, others = trace_model(model, input_shape, batch=batch if cycle else 1,
                                 keep_operands=cycle)
    layers = map_layers(traced, array, batch=1 if cycle else batch, mode=mode, overlap=overlap)
    if cycle:  # traced at the real batch already: report the shapes at that batch
        layers = [LayerResult(r.name, r.kind, at_batch(t.shape, batch), r.stats)
                  for r, t in zip(layers, traced)]
    return ModelResult(array=array, batch=batch, layers=layers, vector_layers=others)


def layer_time(layer: LayerResult, clock_ghz: float, bandwidth_gbs: float | None
               ) -> tuple[float, str]:
    """Seconds for the layer and what bounds it: cycles / clock, or bytes / bandwidth."""
    compute = layer.cycles / (clock_ghz * 1e9)
    if bandwidth_gbs is None:
        return compute, "compute"
    memory = layer.bytes_moved() / (bandwidth_gbs * 1e9)
    return (memory, "memory") if memory > compute else (compute, "compute")


def format_result(result: ModelResult, *, title: str, clock_ghz: float,
                  bandwidth_gbs: float | None = None) -> str:
    """The per-layer table, totals, and the layers left to the vector unit."""
    rows = [("layer", "GEMM (MxK·KxN)", "folds", "cycles", "util %", "map eff %", "time us")]
    total_time = 0.0
    for layer in result.layers:
        t, bound = layer_time(layer, clock_ghz, bandwidth_gbs)
        total_time += t
        rows.append((layer.name, str(layer.shape), f"{layer.folds:,}", f"{layer.cycles:,}",
                     f"{100 * layer.utilisation:.1f}",
                     f"{100 * layer.stats.mapping_efficiency:.1f}",
                     f"{t * 1e6:.2f}" + ("" if bound == "compute" else " (mem)")))
    lines = table_lines(title, rows)
    arr = result.array
    peak = 2 * arr.pes * clock_ghz * 1e9
    achieved = 2 * result.macs / total_time if total_time else 0.0
    lines.append("")
    lines.append(f"total: {len(result.layers)} layers, {result.macs:,} MACs, "
                 f"{result.cycles:,} cycles, utilisation {100 * result.utilisation:.1f}%, "
                 f"{total_time * 1e3:.3f} ms at {clock_ghz:g} GHz"
                 + (f" and {bandwidth_gbs:g} GB/s " if bandwidth_gbs else " ") +
                 f"({total_time * 1e3 / result.batch:.3f} ms per sample)")
    lines.append(f"throughput: {achieved / 1e12:.2f} of {peak / 1e12:.2f} peak TOPS "
                 f"({arr.rows}x{arr.cols} MACs x 2 ops x {clock_ghz:g} GHz)")
    if result.vector_layers:
        kinds = Counter(kind for _, kind in result.vector_layers)
        shown = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
        lines.append(f"vector unit (not on the array): {shown}")
    return "\n".join(lines)


def write_layer_csv(path: str | Path, result: ModelResult, clock_ghz: float,
                    bandwidth_gbs: float | None) -> None:
    """The per-layer table of ``result`` as CSV (written atomically)."""
    from divekit.io import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "kind", "M", "K", "N", "groups", "folds", "cycles", "macs",
                "utilisation", "mapping_efficiency", "time_s", "bound"])
    for layer in result.layers:
        t, bound = layer_time(layer, clock_ghz, bandwidth_gbs)
        s = layer.shape
        w.writerow([layer.name, layer.kind, s.m, s.k, s.n, s.groups, layer.folds, layer.cycles,
                    layer.macs, f"{layer.utilisation:.6f}",
                    f"{layer.stats.mapping_efficiency:.6f}", f"{t:.9g}", bound])
    atomic_write_text(path, buf.getvalue())


def format_topology(title: str, layers: list, stats: list[GemmStats], array: ArraySpec,
                    clock_ghz: float) -> str:
    """A SCALE-Sim topology's run (:func:`~divekit.hardware.scalesim_io.simulate_topology`):
    one row per layer, then the totals."""
    rows = [("layer", "ofmap", "GEMM (MxK·KxN)", "folds", "cycles", "overall util %",
             "map eff %", "compute util %", "time us")]
    for layer, s in zip(layers, stats):
        rows.append((layer.name, f"{layer.ofmap[0]}x{layer.ofmap[1]}",
                     f"{s.m}x{s.k}·{s.k}x{s.n}", f"{s.folds:,}", f"{s.cycles:,}",
                     f"{100 * s.utilisation:.2f}", f"{100 * s.mapping_efficiency:.2f}",
                     f"{100 * s.compute_util:.2f}", f"{s.cycles / (clock_ghz * 1e3):.2f}"))
    total = sum(s.cycles for s in stats)
    macs = sum(s.macs for s in stats)
    return "\n".join([*table_lines(title, rows, left=3), "",
                      f"total: {len(stats)} layers, {macs:,} MACs, {total:,} cycles, "
                      f"utilisation {100 * macs / (array.pes * total):.2f}%"])


def table_lines(title: str, rows: list[tuple[str, ...]], left: int = 2) -> list[str]:
    """``title``, then ``rows`` in aligned columns (the first ``left`` left, the rest right),
    the first row a header underlined with dashes."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < left else c.rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines
