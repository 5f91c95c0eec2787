"""Drive the ``scalesim`` package (PyPI, SCALE-Sim v2/v3 code) on one layer, for tests and
benchmarks. ``scalesim`` is an optional extra: importing this module without it raises
:class:`ModuleNotFoundError`.

SCALE-Sim turns a layer into operand matrices, then into per-cycle *demand matrices* (one row per
cycle, built fold by fold with fill/skew/drain rows), and finally runs those rows through its
SRAM/DRAM model. With no stalls the memory stage serves row ``i`` at cycle ``i``, so its "Total
Cycles" is the last row's index, ``rows - 1``. :func:`run_layer` runs the compute stage (operand
and demand matrices) and reads the stall-free cycles from there.

:func:`time_full_run` times SCALE-Sim's whole single-layer run (compute and memory stages), for
the benchmark. Under numpy >= 2.4, scalesim 3.0.0's memory stage raises ``TypeError`` ("only
0-dimensional arrays can be converted") at its very last statement (``int(max(...))`` of the
served cycles, after every demand row has been served); that one error is caught and the run
counted as complete, and the run's stall count is checked to be 0.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scalesim.compute.operand_matrix import operand_matrix
from scalesim.compute.systolic_compute_is import systolic_compute_is
from scalesim.compute.systolic_compute_os import systolic_compute_os
from scalesim.compute.systolic_compute_ws import systolic_compute_ws
from scalesim.layout_utils import layouts
from scalesim.scale_config import scale_config
from scalesim.single_layer_sim import single_layer_sim
from scalesim.topology_utils import topologies

_COMPUTE = {"ws": systolic_compute_ws, "os": systolic_compute_os, "is": systolic_compute_is}


@dataclass(frozen=True)
class ScaleSimLayer:
    cycles: int  # stall-free "Total Cycles"
    mapping_efficiency: float  # fraction (SCALE-Sim reports %)
    compute_util: float  # fraction


def _config(rows: int, cols: int, dataflow: str):
    parser = configparser.ConfigParser()
    parser["general"] = {"run_name": "divekit"}
    parser["architecture_presets"] = {
        "ArrayHeight": str(rows), "ArrayWidth": str(cols), "IfmapSramSzkB": "1024",
        "FilterSramSzkB": "1024", "OfmapSramSzkB": "1024", "IfmapOffset": "0",
        "FilterOffset": "10000000", "OfmapOffset": "20000000", "Bandwidth": "1000",
        "Dataflow": dataflow, "ReadRequestBuffer": "32", "WriteRequestBuffer": "32"}
    parser["layout"] = {
        "IfmapCustomLayout": "False", "FilterCustomLayout": "False",
        "IfmapSRAMBankBandwidth": "10", "IfmapSRAMBankNum": "10", "IfmapSRAMBankPort": "2",
        "FilterSRAMBankBandwidth": "10", "FilterSRAMBankNum": "10", "FilterSRAMBankPort": "2"}
    parser["sparsity"] = {"SparsitySupport": "false", "SparseRep": "ellpack_block",
                          "OptimizedMapping": "false", "BlockSize": "8",
                          "RandomNumberGeneratorSeed": "40"}
    parser["run_presets"] = {"InterfaceBandwidth": "CALC", "UseRamulatorTrace": "False"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "divekit.cfg"
        with open(path, "w") as f:
            parser.write(f)
        cfg = scale_config()
        cfg.read_conf_file(str(path))
    return cfg


def _topology(ifmap: tuple[int, int], filt: tuple[int, int], channels: int, filters: int,
              stride: int, gemm: tuple[int, int, int] | None):
    topo = topologies()
    if gemm is not None:  # SCALE-Sim's own GEMM→conv mapping (topology_utils.load_arrays_gemm)
        m, n, k = gemm
        entry = ["gemm", m, k, 1, k, 1, n, 1, 1, 1, 1]
    else:
        entry = ["conv", ifmap[0], ifmap[1], filt[0], filt[1], channels, filters, stride,
                 stride, 1, 1]
    topo.load_layer_params_from_list(entry[0], entry)
    return topo


def run_layer(rows: int, cols: int, dataflow: str, *, ifmap: tuple[int, int] = (1, 1),
              filt: tuple[int, int] = (1, 1), channels: int = 1, filters: int = 1,
              stride: int = 1, gemm: tuple[int, int, int] | None = None) -> ScaleSimLayer:
    """One conv layer (or ``gemm=(M, N, K)``) through SCALE-Sim's compute stage."""
    cfg = _config(rows, cols, dataflow)
    topo = _topology(ifmap, filt, channels, filters, stride, gemm)
    with contextlib.redirect_stdout(io.StringIO()):
        op = operand_matrix()
        op.set_params(config_obj=cfg, topoutil_obj=topo, layoututil_obj=layouts(), layer_id=0)
        _, ifmap_mat = op.get_ifmap_matrix()
        _, filter_mat = op.get_filter_matrix()
        _, ofmap_mat = op.get_ofmap_matrix()
        compute = _COMPUTE[dataflow]()
        compute.set_params(config_obj=cfg, ifmap_op_mat=ifmap_mat, filter_op_mat=filter_mat,
                           ofmap_op_mat=ofmap_mat)
        compute.create_prefetch_matrices()
        _, _, ofmap_demand = compute.get_demand_matrices()
    return ScaleSimLayer(cycles=ofmap_demand.shape[0] - 1,
                         mapping_efficiency=compute.get_avg_mapping_efficiency(),
                         compute_util=compute.get_avg_compute_utilization())


def time_full_run(rows: int, cols: int, dataflow: str, *, ifmap: tuple[int, int] = (1, 1),
                  filt: tuple[int, int] = (1, 1), channels: int = 1, filters: int = 1,
                  stride: int = 1, gemm: tuple[int, int, int] | None = None) -> float:
    """Seconds of SCALE-Sim's full single-layer run (compute + memory stages), stall-free."""
    cfg = _config(rows, cols, dataflow)
    topo = _topology(ifmap, filt, channels, filters, stride, gemm)
    sim = single_layer_sim()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            sim.set_params(layer_id=0, config_obj=cfg, topology_obj=topo, layout_obj=layouts(),
                           verbose=False)
            sim.run()
    except TypeError as e:  # scalesim 3.0.0 + numpy >= 2.4: its last statement (module doc)
        if "0-dimensional" not in str(e):
            raise
    elapsed = time.perf_counter() - t0
    if sim.memory_system.stall_cycles != 0:
        raise RuntimeError(f"SCALE-Sim stalled {sim.memory_system.stall_cycles} cycles")
    return elapsed
