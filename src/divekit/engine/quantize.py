"""``--quantize int8``: dynamic int8 quantization for CPU inference (``torch.ao``).

Dynamic quantization stores the weights of ``nn.Linear``, ``nn.LSTM`` and ``nn.GRU`` as 8-bit
integers (one scale per tensor) and quantizes each activation on the fly, so the matrix products
run in int8 with 32-bit accumulation (fbgemm on x86, qnnpack on ARM). It pays where the time
goes to those products: BERT, the Transformer and the recurrent language models; convolutions
are left in float32 (they need static quantization with calibration). It is a CPU technique:
the quantized kernels have no CUDA form.
"""

from __future__ import annotations

import torch
from torch import nn

from divekit.errors import DivekitError

QUANTIZE_CHOICES = ("none", "int8")
# the tasks whose models are matmul-bound (dynamic quantization's target)
QUANTIZABLE_TASKS = ("language_model", "translate", "bert_finetune", "bert_pretrain")


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    raise DivekitError("this PyTorch build has no quantized CPU engine (x86, fbgemm or "
                       "qnnpack); --quantize int8 cannot run here")


def quantize_dynamic_int8(model: nn.Module, task: str) -> nn.Module:
    """``model`` with its Linear, LSTM and GRU layers quantized to int8 (a new module; the
    original is left as it was). One line refuses a task whose model is not matmul-bound and a
    model that is not on the CPU."""
    if task not in QUANTIZABLE_TASKS:
        raise DivekitError(f"--quantize int8 applies to {', '.join(QUANTIZABLE_TASKS)} runs "
                           f"(matmul-bound models), not a {task} run: convolutions need static "
                           "quantization with calibration")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise DivekitError("--quantize int8 is for CPU inference (the int8 kernels have no CUDA "
                           "form): add --device cpu")
    import warnings

    torch.backends.quantized.engine = _engine()
    with warnings.catch_warnings():  # torch.ao's notices about its successor (torchao)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError:  # torch < 1.10 spelled it torch.quantization
            from torch.quantization import quantize_dynamic
        quantized = quantize_dynamic(model, {nn.Linear, nn.LSTM, nn.GRU}, dtype=torch.qint8,
                                     inplace=False)
    quantized.eval()
    return quantized


def quantized_layers(model: nn.Module) -> int:
    """How many layers of ``model`` are dynamically quantized."""
    return sum(1 for m in model.modules()
               if type(m).__module__.startswith(("torch.ao.nn.quantized.dynamic",
                                                  "torch.nn.quantized.dynamic")))
