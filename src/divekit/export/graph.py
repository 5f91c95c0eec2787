"""A run's model as a graph: ONNX (``torch.onnx.export``) and ``torch.export`` (``.pt2``).

Each exportable task gives a :class:`GraphSpec`: the module to trace (the model in eval mode,
sometimes wrapped so its inputs are plain tensors), example inputs, their names, which of their
dimensions may vary, and the preprocessing a caller must apply (:mod:`divekit.export.meta`).

Two exporters write ONNX. The *dynamo* one (``torch.onnx.export(..., dynamo=True)``, the
default from PyTorch 2.9) captures the graph with ``torch.export`` and translates each ATen
operator with onnxscript; the *TorchScript* one traces the module with ``torch.jit.trace`` and
translates each TorchScript node. ``exporter="auto"`` tries dynamo first and falls back to
TorchScript when dynamo fails (or when this PyTorch has no dynamo exporter); the file's
metadata names the one that wrote it. A model neither can export fails in one line naming the
operator that stopped it (:func:`operator_in`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from divekit.errors import DivekitError

EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass
class GraphSpec:
    """What to trace: ``module(*examples)``; ``names`` of the inputs and ``outputs``; for each
    input, ``{dim: (name, min, max)}`` of its dimensions that may vary (the batch one only with
    ``--dynamic-batch``); ``meta``: the preprocessing and labels that travel with the file;
    ``batch_free``: the outputs whose first dimension is not the batch (an SSD's anchors);
    ``auto``: the exporters ``exporter="auto"`` tries, in order."""

    module: nn.Module
    examples: tuple[Tensor, ...]
    names: list[str]
    outputs: list[str]
    dynamic: list[dict[int, tuple[str, int, int]]]
    meta: dict[str, Any] = field(default_factory=dict)
    batch_free: tuple[str, ...] = ()
    auto: tuple[str, ...] = ("dynamo", "torchscript")


# ----------------------------------------------------------------------------- bad exports
_OPERATOR = [
    re.compile(r"\b(aten\.(?:item|_local_scalar_dense)\.default)"),  # a branch on tensor values
    re.compile(r"operator '([\w:.]+)'"),       # TorchScript: Exporting the operator 'aten::x'
    re.compile(r"export of operator ([\w:.]+)"),  # TorchScript: ONNX export of operator x, ...
    re.compile(r"\b(aten::\w+(?:\.\w+)?)"),
    re.compile(r"\b((?:aten|prims|torchvision|divekit)\.\w+(?:\.\w+)?)"),  # dynamo: aten.x.default
    re.compile(r"\b(torch\.ops\.[\w.]+)\b"),
]


def operator_in(error: BaseException) -> str | None:
    """The operator an exporter's error names (``aten::linalg_eig``, ``aten.bincount.default``),
    searched through the chained causes; ``None`` when none does."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        for pattern in _OPERATOR:
            m = pattern.search(text)
            if m:
                return m.group(1)
        e = e.__cause__ or e.__context__
    return None


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the dynamo exporter's colours
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    return f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__


def export_failed(what: str, errors: dict[str, BaseException]) -> DivekitError:
    """One line for a model no exporter could write, naming the operator when one is known."""
    named = [(name, op, e) for name, e in errors.items() if (op := operator_in(e))]
    named += [(name, "aten.item", e) for name, e in errors.items()  # a value read by Python
              if "data-dependent" in str(e) and not operator_in(e)]
    tried = " and ".join(errors)
    if named:
        name, op, e = named[-1]
        why = (" (a Python branch on tensor values, which the graph cannot hold)"
               if "data-dependent" in str(e) else "")
        return DivekitError(f"{what} cannot be exported: operator {op}{why} ({tried} tried; "
                            f"{name}: {_first_line(e)})")
    said = "; ".join(f"{name}: {_first_line(e)}" for name, e in errors.items())
    return DivekitError(f"{what} cannot be exported ({said})")


# ----------------------------------------------------------------------------- exporters
def has_dynamo_exporter() -> bool:
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporters print progress lines and warn about tracing; a command prints its own."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


def _dims(spec: GraphSpec) -> list[dict[int, Any]]:
    """``torch.export.Dim`` objects, one per named varying dimension (shared by name)."""
    made: dict[str, Any] = {}
    out = []
    for dims in spec.dynamic:
        row = {}
        for d, (name, lo, hi) in dims.items():
            if name not in made:
                made[name] = torch.export.Dim(name, min=lo, max=hi)
            row[d] = made[name]
        out.append(row)
    return out


def _dynamo(spec: GraphSpec, path: Path, opset: int | None) -> None:
    kwargs: dict[str, Any] = {"dynamo": True, "input_names": spec.names,
                              "output_names": spec.outputs, "external_data": False}
    if "external_data" not in inspect.signature(torch.onnx.export).parameters:
        kwargs.pop("external_data")
    if any(spec.dynamic):
        kwargs["dynamic_shapes"] = tuple(d or None for d in _dims(spec))
    if opset is not None:
        kwargs["opset_version"] = opset
    program = torch.onnx.export(spec.module, spec.examples, None, **kwargs)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path))


def _torchscript(spec: GraphSpec, path: Path, opset: int | None) -> None:
    axes = {name: {d: n for d, (n, _, _) in dims.items()}
            for name, dims in zip(spec.names, spec.dynamic) if dims}
    axes.update({name: {0: "batch"} for name in spec.outputs if name not in spec.batch_free
                 and any(0 in d and d[0][0] == "batch" for d in spec.dynamic)})
    kwargs: dict[str, Any] = {"input_names": spec.names, "output_names": spec.outputs,
                              "dynamic_axes": axes or None}
    if has_dynamo_exporter():
        kwargs["dynamo"] = False
    if opset is not None:
        kwargs["opset_version"] = opset
    torch.onnx.export(spec.module, spec.examples, str(path), **kwargs)


WRITERS: dict[str, Callable[[GraphSpec, Path, int | None], None]] = {
    "dynamo": _dynamo, "torchscript": _torchscript}


def write_onnx(spec: GraphSpec, path: Path, *, opset: int | None = None,
               exporter: str = "auto", what: str = "the model") -> str:
    """Write ``spec`` as ONNX at ``path``; return the exporter that wrote it. ``auto``: dynamo,
    else TorchScript. Every failure is one :class:`DivekitError` line."""
    if exporter not in EXPORTERS:
        raise DivekitError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    order = list(spec.auto) if exporter == "auto" else [exporter]
    if not has_dynamo_exporter() and order != ["torchscript"]:
        if exporter == "dynamo":
            raise DivekitError(f"torch {torch.__version__} has no dynamo ONNX exporter "
                               "(torch.onnx.export(dynamo=True)); use --exporter torchscript")
        order = ["torchscript"]
    _need("onnxscript" if "dynamo" in order else "onnx")
    errors: dict[str, BaseException] = {}
    for name in order:
        try:
            with _quiet(), torch.inference_mode(False), torch.no_grad():
                WRITERS[name](spec, path, opset)
            return name
        except DivekitError:
            raise
        except Exception as e:  # the exporters raise many kinds; each is reported in one line
            errors[name] = e
            path.unlink(missing_ok=True)
    raise export_failed(what, errors)


def write_pt2(spec: GraphSpec, path: Path, extra: dict[str, str], what: str = "the model") -> None:
    """``torch.export.export`` then ``torch.export.save`` (``extra`` travels as extra files)."""
    dims = _dims(spec)
    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(spec.module, spec.examples,
                                          dynamic_shapes=tuple(d or None for d in dims)
                                          if any(spec.dynamic) else None)
            buffer = io.BytesIO()
            torch.export.save(program, buffer, extra_files=extra)
    except Exception as e:
        raise export_failed(what, {"torch.export": e}) from None
    from divekit.io import atomic_write_bytes

    atomic_write_bytes(path, buffer.getvalue())


def _need(package: str) -> None:
    from importlib.util import find_spec

    if find_spec(package) is None:
        raise DivekitError(f"exporting to ONNX needs the {package} package: "
                           "pip install divekit[export]")
