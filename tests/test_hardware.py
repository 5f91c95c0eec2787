"""The systolic-array simulator: numerics, cycle counts, SCALE-Sim v2 agreement, the zoo."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divekit.errors import DivekitError
from divekit.hardware.analytic import ArraySpec, gemm_cycles, parse_array
from divekit.hardware.lowering import conv2d_gemm_shape, conv2d_im2col
from divekit.hardware.scalesim_io import (
    REPORT_HEADER,
    read_config,
    read_topology,
    simulate_topology,
    write_compute_report,
)
from divekit.hardware.systolic import simulate
from divekit.hardware.zoo import simulate_model, trace_model

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"


# ------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("dataflow", ["ws", "os", "is"])
@pytest.mark.parametrize("m,k,n,r,c", [(7, 5, 9, 4, 3), (13, 27, 10, 8, 8), (1, 1, 1, 1, 1),
                                       (3, 17, 2, 5, 4), (20, 3, 11, 3, 7)])
def test_product_equals_matmul(dataflow, m, k, n, r, c):
    gen = torch.Generator().manual_seed(m * 100 + k * 10 + n)
    a = torch.randn(m, k, generator=gen, dtype=torch.float64)
    b = torch.randn(k, n, generator=gen, dtype=torch.float64)
    result = simulate(a.numpy(), b.numpy(), ArraySpec(r, c, dataflow))
    torch.testing.assert_close(torch.from_numpy(result.output), torch.matmul(a, b),
                               rtol=1e-12, atol=1e-12)
    assert result.stats.macs == m * n * k  # counted MACs on real (unpadded) operands


@pytest.mark.parametrize("stride,padding,dilation,groups", [
    (1, 0, 1, 1), (2, 1, 1, 1), (3, 2, 1, 1), (1, 2, 2, 1), ((2, 1), (1, 0), (1, 2), 1),
    (1, 1, 1, 2), (2, 1, 1, 6), (1, 1, 3, 6),  # grouped and depthwise (6 groups of 1 channel)
])
def test_im2col_conv_equals_conv2d(stride, padding, dilation, groups):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, 9, generator=gen, dtype=torch.float64)
    w = torch.randn(12, 6 // groups, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(12, generator=gen, dtype=torch.float64)
    expected = F.conv2d(x, w, bias, stride, padding, dilation, groups)
    got = conv2d_im2col(x, w, bias, stride, padding, dilation, groups)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    shape = conv2d_gemm_shape(tuple(x.shape), 12, (3, 3), *(
        (v, v) if isinstance(v, int) else v for v in (stride, padding, dilation)), groups)
    assert shape.macs == 2 * expected[0].numel() * (6 // groups) * 9  # B·Ho·Wo · C_out · K


@pytest.mark.parametrize("dataflow", ["ws", "os", "is"])
def test_conv_on_the_array_equals_conv2d(dataflow):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 7, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    array = ArraySpec(4, 3, dataflow)

    def on_array(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(simulate(a.numpy(), b.numpy(), array).output)

    got = conv2d_im2col(x, w, None, stride=2, padding=1, groups=2, matmul=on_array)
    torch.testing.assert_close(got, F.conv2d(x, w, None, 2, 1, 1, 2), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------- cycle counts
def test_hand_worked_fill_and_drain():
    """A 2x2 array, A 3x2, B 2x2 (one fold each way), by hand:

    ws: 2 cycles shift B's two rows in from the top. Row 0 of the array sees A[t, 0] at stream
    cycle t, row 1 sees A[t, 1] at t + 1 (skew); an operand reaches column j j cycles later, so
    PE(i, j) works on row t at cycle t + i + j and the last sum (t=2) leaves PE(1, 1) at cycle
    2 + 1 + 1 = 4: 5 stream cycles (T + R + C - 2). Total 2 + 5 = 7; utilisation 12 MACs /
    (4 PEs · 7 cycles) = 3/7.
    os (A 2x3, B 3x2, K = 3 streams): PE(i, j) does its k-th MAC at cycle k + i + j, the last at
    2 + 1 + 1 = 4: 5 cycles, then 2 cycles shift the two result rows out: 7.
    """
    a, b = np.arange(6.0).reshape(3, 2), np.arange(4.0).reshape(2, 2)
    ws = simulate(a, b, ArraySpec(2, 2, "ws"))
    assert (ws.timeline.fill, ws.timeline.run, ws.timeline.drain) == (2, 5, 0)
    assert ws.stats.cycles == 7 and ws.stats.folds == 1
    assert ws.stats.utilisation == pytest.approx(12 / (4 * 7))
    os_ = simulate(np.arange(6.0).reshape(2, 3), np.arange(6.0).reshape(3, 2),
                   ArraySpec(2, 2, "os"))
    assert (os_.timeline.run, os_.timeline.drain) == (5, 2) and os_.stats.cycles == 7
    assert os_.stats.utilisation == pytest.approx(12 / (4 * 7))
    # two folds back to back; overlapping hides the next fold's preload behind the stream
    two = simulate(np.ones((3, 4)), np.ones((4, 2)), ArraySpec(2, 2, "ws"))
    assert two.stats.folds == 2 and two.stats.cycles == 14
    assert simulate(np.ones((3, 4)), np.ones((4, 2)), ArraySpec(2, 2, "ws"),
                    overlap=True).stats.cycles == 2 * 5 + 2
    # SCALE-Sim v2 reports the last cycle's index and no os drain
    assert simulate(a, b, ArraySpec(2, 2, "ws"), convention="scalesim").stats.cycles == 6
    assert simulate(np.ones((2, 3)), np.ones((3, 2)), ArraySpec(2, 2, "os"),
                    convention="scalesim").stats.cycles == 4


def test_analytic_equals_cycle_accurate_on_a_grid():
    sizes = (1, 2, 5, 7)
    arrays = ((1, 1), (2, 3), (4, 2), (3, 3))
    options = (("native", False), ("native", True), ("scalesim", False))
    rng = np.random.default_rng(0)
    checked = 0
    for (m, n, k), (r, c), df in itertools.product(itertools.product(sizes, repeat=3), arrays,
                                                   ("ws", "os", "is")):
        a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
        array = ArraySpec(r, c, df)
        for convention, overlap in options:
            sim = simulate(a, b, array, convention=convention, overlap=overlap).stats
            closed = gemm_cycles(m, n, k, array, convention=convention, overlap=overlap)
            assert sim.cycles == closed.cycles, (m, n, k, r, c, df, convention, overlap)
            assert sim.folds == closed.folds and sim.macs == closed.macs
            assert sim.mapping_efficiency == pytest.approx(closed.mapping_efficiency)
            assert sim.compute_util == pytest.approx(closed.compute_util)
            checked += 1
    assert checked == 4**3 * 4 * 3 * 3


# ------------------------------------------------------------------------ SCALE-Sim v2 golden
def _golden_rows() -> list[dict]:
    lines = [line for line in (FIXTURES / "scalesim_v2_golden.csv").read_text().splitlines()
             if line and not line.startswith("#")]
    keys = ["source", "topology", "rows", "cols", "dataflow", "gemm", "total", "stalls",
            "overall", "mapping", "compute"]
    return [dict(zip(keys, row)) for row in csv.reader(lines)]


@pytest.mark.parametrize("row", _golden_rows(), ids=lambda r: r["source"].split("@")[0])
def test_agrees_with_scalesim_v2_golden_reports(row):
    array = ArraySpec(int(row["rows"]), int(row["cols"]), row["dataflow"])
    (layer,) = read_topology(FIXTURES / row["topology"])
    (stats,) = simulate_topology([layer], array)
    total, stalls = int(row["total"]), int(row["stalls"])
    assert stats.cycles == total - stalls  # stall-free compute cycles, exact
    assert abs(100 * stats.mapping_efficiency - float(row["mapping"])) < 1e-6
    assert abs(100 * stats.compute_util - float(row["compute"])) < 1e-6
    # SCALE-Sim's overall utilisation: the same MACs over its cycles including stalls
    assert abs(stats.macs * 100 / (total * array.pes) - float(row["overall"])) < 1e-6
    # the cycle-accurate simulator, in SCALE-Sim's convention, measures the same
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((layer.m, layer.k)), rng.standard_normal((layer.k, layer.n))
    sim = simulate(a, b, array, convention="scalesim")
    assert sim.stats.cycles == stats.cycles
    assert abs(sim.stats.compute_util - stats.compute_util) < 1e-12
    np.testing.assert_allclose(sim.output, a @ b, rtol=1e-10, atol=1e-9)


def test_scalesim_files_round_trip(tmp_path):
    array = read_config(FIXTURES / "scale_32x32_ws.cfg")
    assert (array.rows, array.cols, array.dataflow) == (32, 32, "ws")
    layers = read_topology(FIXTURES / "alexnet_part.csv")
    assert [(x.name, x.ofmap, x.m, x.k, x.n) for x in layers] == [
        ("Conv1", (55, 55), 3025, 363, 96)]  # SCALE-Sim's ceil: PyTorch would give 54x54
    out = tmp_path / "COMPUTE_REPORT.csv"
    write_compute_report(out, simulate_topology(layers, array))
    header, row = out.read_text().splitlines()
    assert header == REPORT_HEADER
    assert row == "0, 112283, 0, 91.68309650614964, 94.53125, 90.78000992063492,"
    dp = tmp_path / "dw.csv"
    dp.write_text("Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, "
                  "Num Filter, Strides,\nConv_DP, 8, 8, 3, 3, 3, 1, 1,\n")
    assert [x.name for x in read_topology(dp)] == [f"Conv_DPChannel_{i}" for i in range(3)]


def test_topology_errors_name_the_row(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, "
                   "Num Filter, Strides,\nConv1, 8, 8, 3, 3, 3, 4, 1,\nConv2, 8, 8, 3, 3, 3,\n")
    with pytest.raises(DivekitError, match=r"row 3 \('Conv2'\): missing column 'Num Filter'"):
        read_topology(bad)
    with pytest.raises(DivekitError, match="lacks ArrayWidth"):
        (tmp_path / "x.cfg").write_text("[architecture_presets]\nArrayHeight: 4\n")
        read_config(tmp_path / "x.cfg")


# ------------------------------------------------------------------------------------ the zoo
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, stride=2, groups=4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.dw(torch.relu(self.conv(x)))).flatten(1))


def test_model_cycle_mode_equals_analytic_and_counts_groups():
    model = _Tiny()
    array = ArraySpec(3, 4, "ws")
    analytic = simulate_model(model, (2, 8, 8), array, batch=2)
    cycle = simulate_model(model, (2, 8, 8), array, batch=2, mode="cycle")
    assert [x.cycles for x in analytic.layers] == [x.cycles for x in cycle.layers]
    conv, dw, fc = analytic.layers
    assert (conv.shape.m, conv.shape.k, conv.shape.n) == (2 * 64, 18, 4)
    assert (dw.shape.groups, dw.shape.m, dw.shape.k, dw.shape.n) == (4, 2 * 9, 9, 1)
    assert dw.cycles == 4 * gemm_cycles(18, 1, 9, array).cycles
    assert (fc.shape.m, fc.shape.k, fc.shape.n) == (2, 36, 5)
    assert analytic.macs == sum(x.shape.macs for x in analytic.layers)


def test_model_errors_are_one_line():
    with pytest.raises(DivekitError, match="no convolution or linear layer"):
        trace_model(nn.Sequential(nn.ReLU(), nn.Flatten()), (1, 4, 4))
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(DivekitError, match=r"rejected at layer '2'"):
        trace_model(net, (1, 6, 6))  # 2·4·4 = 32 features reach a Linear(8, 3)
    for text in ("0x0", "12x", "x", "4x-1", "axb"):
        with pytest.raises(DivekitError, match="--array"):
            parse_array(text)
    assert parse_array("64") == (64, 64) and parse_array("32x128") == (32, 128)


def test_tpu_v1_dense_layer_batching():
    """A batch-8 dense layer streams only 8 rows through each 256x256 weight tile, so the
    256-cycle preload and the 510 cycles of skew dominate; utilisation grows with the batch."""
    tpu = ArraySpec(256, 256, "ws")
    utils = [gemm_cycles(b, 4096, 4096, tpu).utilisation for b in (1, 8, 64, 512)]
    assert utils == sorted(utils) and utils[1] < 0.02 and utils[3] > 0.35
    assert math.isclose(2 * tpu.pes * 0.7e9 / 1e12, 91.75, rel_tol=1e-3)  # 92 peak TOPS


def test_transposed_conv_is_one_product_per_group():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1,
                                                               groups=2))
    array = ArraySpec(4, 4, "os")
    analytic = simulate_model(net, (3, 5, 5), array)
    cycle = simulate_model(net, (3, 5, 5), array, mode="cycle")
    _, convt = analytic.layers
    assert (convt.kind, convt.shape.groups, convt.shape.m, convt.shape.k, convt.shape.n) == (
        "convT", 2, 25, 2, 3 * 16)
    assert [x.cycles for x in analytic.layers] == [x.cycles for x in cycle.layers]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11", "googlenet", "densenet121",
                                  "nin", "alexnet", "lenet_bn"])
def test_a_model_on_meta_traces_the_layers_a_real_forward_does(name):
    """The shape-only trace (meta tensors, with the elementwise/normalisation/linear shortcuts
    of zoo._MetaShapes) maps the same products as a forward pass with real weights."""
    from divekit.models import create_model

    shape = (1, 64, 64)
    real, real_others = trace_model(create_model(name, num_classes=10, in_channels=1), shape)
    with torch.device("meta"):
        meta_model = create_model(name, num_classes=10, in_channels=1)
    meta, meta_others = trace_model(meta_model, shape)
    assert [(t.name, t.kind, t.shape) for t in meta] == [(t.name, t.kind, t.shape) for t in real]
    assert meta_others == real_others


@pytest.mark.parametrize("dataflow", ["ws", "os", "is"])
def test_folds_one_chunk_each_run_as_all_together(dataflow, monkeypatch):
    """The folds are simulated a chunk at a time; one fold per chunk (and, for ws, wavefronts
    laid out folds-innermost instead of wavefronts-innermost) gives the same product, cycles,
    MACs and timeline."""
    from divekit.hardware import systolic

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((9, 23)), rng.standard_normal((23, 14))
    array = ArraySpec(4, 5, dataflow)
    together = simulate(a, b, array)
    monkeypatch.setattr(systolic, "_STEP_ELEMS", 1)
    monkeypatch.setattr(systolic, "_CHUNK_ELEMS", 1)
    apart = simulate(a, b, array)
    assert together.stats.folds > 1
    np.testing.assert_allclose(apart.output, together.output, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(apart.output, a @ b, rtol=1e-12, atol=1e-12)
    assert apart.stats == together.stats and apart.timeline == together.timeline
