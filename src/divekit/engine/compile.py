"""``--compile``: run a model through ``torch.compile`` for training, evaluation and prediction.

What torch.compile does. TorchDynamo reads the Python bytecode of ``forward`` as it runs and
records the tensor operations into a graph (leaving Python it cannot trace as a "graph break");
AOTAutograd derives the backward graph from it ahead of time; TorchInductor fuses the
element-wise operations of both into generated kernels (C++/OpenMP on the CPU, Triton on CUDA)
and calls the vendor libraries (oneDNN, cuBLAS, cuDNN) for the matrix products and
convolutions. What it can save is the per-operator overhead and the memory traffic between
element-wise operations; it cannot make the convolutions and GEMMs themselves faster, and on
this project's 2-core CPU those are the time (ResNet-18's step runs at 81 % of the machine's
GEMM rate), so no family measured gains 1.2x there (see :data:`FAMILY_DEFAULTS`). The first
call of each new input shape or mode (training, evaluation) compiles, which takes seconds to
many minutes on a small CPU; the benchmarks report it apart. On a GPU, where launches and
memory traffic weigh more, the balance differs: measure before turning it on.

How divekit uses it. The module is compiled *in place* (:meth:`torch.nn.Module.compile`): the
model object, its parameters and its ``state_dict`` keys stay the same, so checkpoints are the
same with or without ``--compile``, and a compiled run resumes uncompiled and back. Only the
module's ``__call__`` is compiled: a task that calls a submodule directly (``model.encoder``)
runs that part eagerly.

``--compile`` is a tristate: on, off, or (neither typed) the model family's default,
:data:`FAMILY_DEFAULTS`, decided from the training benchmarks' medians on the 2-core CPU (on
where it wins by at least 1.2× after compilation, off elsewhere).
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
from torch import nn

from divekit.errors import DivekitError

# The strategies --compile cannot go with, and why: each runs the model as parts, so the
# compiled whole-model forward would never be called (pipeline, tensor), or wraps every
# layer's call in its own parameter-gathering hooks (fsdp).
REFUSED_STRATEGIES = {
    "pipeline": "each stage runs its own slice of the layers, never the whole model's forward",
    "tensor": "its layers are split over the ranks with collectives inside the forward",
    "fsdp": "its per-layer hooks gather and free the parameters around every layer's call",
}

# --compile's default per model family (the module of divekit.models that registers the
# model): on where the training step runs at least 1.2x faster compiled, after compilation, at
# the median of interleaved rounds on the 2-core CPU at 1 thread; off elsewhere, and off for
# a family not measured. Measured (session 9, the machine loaded by other jobs, load 10-16):
#   lenet   0.94x (0.55-1.14), 5 rounds, compile 244 s first run, 3 s with a warm cache
#           (benchmarks/train_throughput.py, 12,000 MNIST samples, batch 256)
#   resnet  1.01x (0.70-1.40), 3 rounds, compile 837 s first run, 150 s warm (ResNet-18, 96x96)
#   bert    1.02x (0.77-1.27), 2 rounds, compile 773 s first run, 12 s warm (bert_small
#           pretraining step 512 x 64; benchmarks/bert.py)
# None reaches 1.2x, so --compile is off by default everywhere: the CPU time of these steps is
# in oneDNN's convolutions and GEMMs, which Inductor calls as they are, and what it fuses
# (element-wise operations, optimizer updates) is a small share at these batch sizes.
FAMILY_DEFAULTS: dict[str, bool] = {"lenet": False, "resnet": False, "bert": False}


def model_family(model_name: str) -> str | None:
    """The family of a registered model (``lenet`` for ``lenet``, ``resnet`` for ``resnet18``):
    the module of :mod:`divekit.models` that registers it; None for an unknown name."""
    if not model_name:
        return None
    from divekit.models.registry import model_info

    try:
        info = model_info(model_name)
    except Exception:  # an unknown name: the task refuses it where it builds the model
        return None
    return info.builder.__module__.rsplit(".", 1)[-1]


def family_default(model_name: str) -> bool:
    """Whether ``--compile`` is on by default for ``model_name``'s family."""
    return FAMILY_DEFAULTS.get(model_family(model_name) or "", False)


def default_families_text() -> str:
    """The families compiled by default, for ``--help``."""
    on = sorted(f for f, v in FAMILY_DEFAULTS.items() if v)
    return ", ".join(on) if on else "none"


def resolve(setting: bool | None, model_name: str, strategy: str = "ddp") -> bool:
    """``--compile`` as the run uses it: the typed setting, else the family's default (off with
    a strategy it cannot go with: the default never makes a run fail)."""
    if setting is not None:
        return bool(setting)
    return family_default(model_name) and strategy not in REFUSED_STRATEGIES


def unavailable_reason(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run here (None when it can): a torch older than 2.4, no C++
    compiler for the CPU's generated kernels, no Triton for CUDA's."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]
                    if p.isdigit())
    if not hasattr(torch, "compile") or version < (2, 4):
        return f"torch {torch.__version__} is older than 2.4 (divekit's --compile needs 2.4+)"
    if sys.version_info >= (3, 13) and version < (2, 6):
        return f"torch {torch.__version__} cannot compile on Python 3.13 (needs torch 2.6+)"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - every torch >= 2.4 has it
            return "this torch has no Triton check; install triton"
        if not has_triton():
            return "no Triton for CUDA's generated kernels (pip install triton)"
        return None
    if device.type != "cpu":
        return f"--compile runs on cpu and cuda, not {device.type}"
    compiler = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++", "cl") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        return ("no C++ compiler found (set CXX or install g++/clang++; on Windows, MSVC's cl): "
                "the CPU's generated kernels are C++")
    return None


def check_strategy(strategy: str) -> None:
    """Refuse ``--compile`` with a strategy it cannot go with, in one line saying why."""
    if strategy in REFUSED_STRATEGIES:
        raise DivekitError(f"--compile does not go with --strategy {strategy}: "
                           f"{REFUSED_STRATEGIES[strategy]}; drop --compile (or use ddp, "
                           "allreduce, ps or async)")


def compile_model(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Compile ``model`` in place (its ``__call__``; parameters and ``state_dict`` keys
    unchanged) and return it; one line when this torch or machine cannot compile."""
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    reason = unavailable_reason(device)
    if reason is not None:
        raise DivekitError(f"--compile cannot run here: {reason}; drop --compile")
    model.compile()
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` was compiled in place (:func:`compile_model`)."""
    return getattr(model, "_compiled_call_impl", None) is not None
