"""Device selection and mixed precision, the same code on CPU and CUDA."""

from __future__ import annotations

import contextlib

import torch

from divekit.errors import DivekitError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda:1`` etc. are accepted."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DivekitError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DivekitError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise DivekitError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast (no gradient scaler needed, unlike fp16) or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch, device: torch.device, channels_last: bool = False):
    """Move every tensor of a (nested) batch; 4-D float tensors optionally to channels_last."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def configure_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keep freed tensor memory for reuse instead of returning it to the kernel (glibc only).

    By default glibc serves every allocation above a few hundred KB with a fresh ``mmap`` and
    unmaps it on free, so a training step that allocates the same activations again pays a page
    fault for every 4 KB of them, each step. Raising the mmap threshold (to glibc's maximum,
    32 MB) and the trim threshold lets those tensors come from the heap and stay mapped: 2.7×
    faster ``multibox_target`` and ~9% faster ResNet-18 steps on our 2-core CPU. It is what
    setting ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` does, from inside the process;
    the cost is up to ``trim_threshold`` bytes of freed memory kept by the process. The
    ``divekit`` command calls it (``DIVEKIT_MALLOC=default`` opts out); library users may call
    it themselves. Returns whether it took effect (False off glibc).
    """
    import ctypes
    import os
    import sys

    if os.environ.get("DIVEKIT_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim``).

    :func:`configure_allocator` keeps freed tensor memory mapped so that the next training step
    reuses it without page faults. Between phases that allocate differently, that kept memory
    only raises the process's peak: after a training epoch the heap holds the pages of the
    step's activations, free, and validation's larger batches do not fit its fragments (those
    above the mmap threshold get fresh mappings), so they would come on top of it. The Trainer
    calls this before validating. ``malloc_trim(0)`` gives back the free top of the heap and
    every free whole page inside it; live tensors are not touched. The cost is a page fault for
    each 4 KB of that memory when the next epoch allocates it again. Returns whether it ran
    (False off glibc).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True

def module_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` lives: its first parameter's (or buffer's) device, the CPU for a module
    with neither (a recurrent language model whose layers are all int8, ``--quantize int8``)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")
