"""Systolic arrays: how matrix products and convolutions run on a TPU-like accelerator.

* :mod:`~divekit.hardware.systolic`: a cycle-accurate R×C array (ws, os, is) that computes.
* :mod:`~divekit.hardware.analytic`: the closed-form cycle counts it must equal.
* :mod:`~divekit.hardware.lowering`: convolution as im2col matrix products.
* :mod:`~divekit.hardware.scalesim_io`: SCALE-Sim v2 topologies, configs, reports, conventions.
* :mod:`~divekit.hardware.zoo` and :mod:`~divekit.hardware.explore`: the model zoo on the array,
  batch curves and array sweeps.

Only the CLI imports this package.
"""

from divekit.hardware.analytic import ArraySpec, GemmStats, gemm_cycles, parse_array
from divekit.hardware.lowering import GemmShape, conv2d_im2col, im2col
from divekit.hardware.systolic import SimResult, simulate
from divekit.hardware.zoo import simulate_model, trace_model

__all__ = [
    "ArraySpec", "GemmShape", "GemmStats", "SimResult", "conv2d_im2col", "gemm_cycles", "im2col",
    "parse_array", "simulate", "simulate_model", "trace_model",
]
