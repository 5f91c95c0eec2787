"""SCALE-Sim v2 files: topology CSV, ``.cfg``, and ``COMPUTE_REPORT.csv``, with its conventions.

Reading: a conv topology has the header ``Layer name, IFMAP Height, IFMAP Width, Filter Height,
Filter Width, Channels, Num Filter, Strides,`` and a GEMM topology ``Layer name, M, N, K,``
(each row ends with a comma; an extra sparsity column ``N:M`` is ignored). From a ``.cfg`` only
``[architecture_presets]`` ``ArrayHeight``, ``ArrayWidth`` and ``Dataflow`` matter here.

Where SCALE-Sim v2 differs from divekit's native mode (this module follows SCALE-Sim):

* Output size: ``ceil((H - Fh + s) / s)`` with no padding, so a window that runs past the
  right/bottom edge still counts (PyTorch: ``floor((H + 2p - Fh) / s) + 1``).
* A GEMM row ``M, N, K`` is the conv ``IFMAP M×K, filter 1×K, 1 channel, N filters, stride 1``:
  M output pixels, window K, N filters.
* A layer whose name contains ``DP`` is depthwise: it is split into ``Channels`` layers of one
  channel each (named ``<name>Channel_<i>``), each its own report row.
* Cycles: the reported total is the index of the last cycle, ``F·per_fold - 1``; the output-
  stationary drain is not counted (per fold ``R + C + T - 2``; divekit counts ``2R + C + T - 2``,
  see :mod:`divekit.hardware.analytic`).
* "Compute Util" is the unweighted mean over folds of a per-fold figure whose cycle count for
  ws/is is ``2R + 2C + T - 3`` (one skew more than the fold takes); divekit's utilisation is
  ``MACs / (PEs · cycles)``, which is SCALE-Sim's "Overall Util" when there are no stalls.
* Only compute is modelled (stall-free): "Stall Cycles" is always 0 here; SCALE-Sim adds stalls
  from its SRAM/DRAM model.
"""

from __future__ import annotations

import configparser
import math
import os
from dataclasses import dataclass
from pathlib import Path

from divekit.errors import DivekitError
from divekit.hardware.analytic import DATAFLOWS, ArraySpec, GemmStats, gemm_cycles
from divekit.io import atomic_write_text

CONV_COLUMNS = ("Layer name", "IFMAP Height", "IFMAP Width", "Filter Height", "Filter Width",
                "Channels", "Num Filter", "Strides")
GEMM_COLUMNS = ("Layer name", "M", "N", "K")
REPORT_HEADER = ("LayerID, Total Cycles, Stall Cycles, Overall Util %, Mapping Efficiency %,"
                 " Compute Util %,")


@dataclass(frozen=True)
class TopologyLayer:
    """One SCALE-Sim layer as the product ``(M×K)·(K×N)``, M = output pixels, K = window."""

    name: str
    m: int
    n: int
    k: int
    ofmap: tuple[int, int]


def scalesim_ofmap(ifmap: int, filt: int, stride: int) -> int:
    """SCALE-Sim's output size: ``ceil((ifmap - filt + stride) / stride)``."""
    return math.ceil((ifmap - filt + stride) / stride)


def _cells(line: str) -> list[str]:
    cells = [c.strip() for c in line.strip().split(",")]
    return cells[:-1] if cells and cells[-1] == "" else cells


def read_topology(path: str | os.PathLike) -> list[TopologyLayer]:
    """The layers of a SCALE-Sim topology CSV (conv or GEMM form, told apart by the header)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DivekitError(f"cannot read topology {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DivekitError(f"topology {path} is not UTF-8 text ({e.reason} at byte "
                           f"{e.start})") from None
    rows = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise DivekitError(f"topology {path} is empty")
    header = [h.lower() for h in _cells(rows[0][1])]
    columns: tuple[str, ...]
    if [h.lower() for h in GEMM_COLUMNS[1:]] == header[1:4]:
        columns, gemm = GEMM_COLUMNS, True
    elif any("ifmap" in h for h in header):
        columns, gemm = CONV_COLUMNS, False
    else:
        raise DivekitError(f"topology {path}: header {rows[0][1].strip()!r} is neither the conv "
                           f"form ({', '.join(CONV_COLUMNS)}) nor the GEMM form (Layer name, M, N, "
                           "K)")
    layers: list[TopologyLayer] = []
    for lineno, line in rows[1:]:
        cells = _cells(line)
        name = cells[0] if cells else ""
        where = f"topology {path.name} row {lineno} ({name!r})"
        if len(cells) < len(columns):
            raise DivekitError(f"{where}: missing column {columns[len(cells)]!r}")
        try:
            nums = [int(c) for c in cells[1:len(columns)]]
        except ValueError:
            raise DivekitError(f"{where}: expected integers in {', '.join(columns[1:])}, "
                               f"got {', '.join(cells[1:len(columns)])}") from None
        if min(nums) <= 0:
            raise DivekitError(f"{where}: sizes must be positive, got {nums}")
        if gemm:
            m, n, k = nums
            layers.append(TopologyLayer(name, m=m, n=n, k=k, ofmap=(m, 1)))
            continue
        h, w, fh, fw, ch, nf, s = nums
        if fh > h or fw > w:
            raise DivekitError(f"{where}: a {fh}x{fw} filter does not fit a {h}x{w} input")
        oh, ow = scalesim_ofmap(h, fh, s), scalesim_ofmap(w, fw, s)
        if "DP" in name:  # SCALE-Sim: a depthwise layer is Channels single-channel layers
            for c in range(ch):
                layers.append(TopologyLayer(f"{name}Channel_{c}", m=oh * ow, n=nf, k=fh * fw,
                                            ofmap=(oh, ow)))
        else:
            layers.append(TopologyLayer(name, m=oh * ow, n=nf, k=fh * fw * ch, ofmap=(oh, ow)))
    if not layers:
        raise DivekitError(f"topology {path} has a header but no layers")
    return layers


def read_config(path: str | os.PathLike) -> ArraySpec:
    """The array (``ArrayHeight``×``ArrayWidth``) and ``Dataflow`` of a SCALE-Sim ``.cfg``."""
    parser = configparser.ConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise DivekitError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DivekitError(f"config {path} is not UTF-8 text ({e.reason} at byte "
                           f"{e.start})") from None
    except configparser.Error as e:
        raise DivekitError(f"config {path} is not a SCALE-Sim .cfg: "
                           f"{str(e).splitlines()[0]}") from None
    section = "architecture_presets"
    if not parser.has_section(section):
        raise DivekitError(f"config {path} has no [{section}] section")
    values = {}
    for key in ("ArrayHeight", "ArrayWidth", "Dataflow"):
        if not parser.has_option(section, key):
            raise DivekitError(f"config {path}: [{section}] lacks {key}")
        values[key] = parser.get(section, key).strip()
    try:
        rows, cols = int(values["ArrayHeight"]), int(values["ArrayWidth"])
    except ValueError:
        raise DivekitError(f"config {path}: ArrayHeight/ArrayWidth must be integers, got "
                           f"{values['ArrayHeight']!r}, {values['ArrayWidth']!r}") from None
    dataflow = values["Dataflow"].lower()
    if dataflow not in DATAFLOWS:
        raise DivekitError(f"config {path}: Dataflow must be one of {', '.join(DATAFLOWS)}, "
                           f"got {values['Dataflow']!r}")
    return ArraySpec(rows, cols, dataflow)


def simulate_topology(layers: list[TopologyLayer], array: ArraySpec) -> list[GemmStats]:
    """Each layer's stall-free compute stats in SCALE-Sim v2's conventions."""
    return [gemm_cycles(layer.m, layer.n, layer.k, array, convention="scalesim")
            for layer in layers]


def report_rows(stats: list[GemmStats]) -> list[str]:
    """COMPUTE_REPORT.csv lines (no header): cycles, 0 stalls, overall/mapping/compute util %."""
    lines = []
    for i, s in enumerate(stats):
        overall = s.macs * 100 / (s.cycles * s.rows * s.cols) if s.cycles else float("nan")
        lines.append(f"{i}, {s.cycles}, 0, {overall}, {s.mapping_efficiency * 100}, "
                     f"{s.compute_util * 100},")
    return lines


def write_compute_report(path: str | os.PathLike, stats: list[GemmStats]) -> None:
    """SCALE-Sim v2's ``COMPUTE_REPORT.csv`` (columns: :data:`REPORT_HEADER`)."""
    atomic_write_text(path, "\n".join([REPORT_HEADER, *report_rows(stats)]) + "\n")
