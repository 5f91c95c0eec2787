"""Agreement with the ``scalesim`` package itself on random conv and GEMM layers (the extra)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from divekit.hardware.analytic import ArraySpec, gemm_cycles
from divekit.hardware.scalesim_io import scalesim_ofmap
from divekit.hardware.systolic import simulate

pytest.importorskip("scalesim", reason="the scalesim extra is not installed")
reference = pytest.importorskip("divekit.hardware.reference")

pytestmark = pytest.mark.scalesim


def _layers(n: int = 24) -> list[dict]:
    rng = random.Random(16)
    layers = []
    for i in range(n):
        df = ("ws", "os", "is")[i % 3]
        rows, cols = rng.choice([4, 8, 16, 32]), rng.choice([4, 8, 16, 32])
        if i % 2:
            layers.append(dict(dataflow=df, rows=rows, cols=cols,
                               gemm=(rng.randint(1, 150), rng.randint(1, 90), rng.randint(1, 120))))
        else:
            f = rng.choice([1, 3, 5])
            h, w = rng.randint(f, 20), rng.randint(f, 20)
            layers.append(dict(dataflow=df, rows=rows, cols=cols, ifmap=(h, w), filt=(f, f),
                               channels=rng.randint(1, 12), filters=rng.randint(1, 40),
                               stride=rng.choice([1, 2, 3])))
    return layers


def _mnk(layer: dict) -> tuple[int, int, int]:
    if "gemm" in layer:
        return layer["gemm"]
    (h, w), (fh, fw), s = layer["ifmap"], layer["filt"], layer["stride"]
    m = scalesim_ofmap(h, fh, s) * scalesim_ofmap(w, fw, s)
    return m, layer["filters"], fh * fw * layer["channels"]


@pytest.mark.parametrize("layer", _layers(), ids=lambda d: f"{d['dataflow']}-"
                         + ("gemm" if "gemm" in d else "conv"))
def test_random_layers_agree_with_scalesim(layer):
    params = {k: v for k, v in layer.items() if k not in ("dataflow", "rows", "cols")}
    theirs = reference.run_layer(layer["rows"], layer["cols"], layer["dataflow"], **params)
    array = ArraySpec(layer["rows"], layer["cols"], layer["dataflow"])
    m, n, k = _mnk(layer)
    ours = gemm_cycles(m, n, k, array, convention="scalesim")
    assert ours.cycles == theirs.cycles
    assert abs(ours.mapping_efficiency - theirs.mapping_efficiency) < 1e-6
    assert abs(ours.compute_util - theirs.compute_util) < 1e-6
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    sim = simulate(a, b, array, convention="scalesim")
    assert sim.stats.cycles == theirs.cycles
    assert abs(sim.stats.compute_util - theirs.compute_util) < 1e-6
