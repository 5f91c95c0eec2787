"""Small utilities of the book (Timer, Accumulator, devices) and the ``--quick`` bounds.

``divekit book run --quick`` sets ``DIVEKIT_BOOK_QUICK=1`` in the process that runs a section;
every training function and data iterator of the compat layer then bounds its work (epochs,
batches) so that a section finishes in about a minute on a laptop CPU. The bounds are
``DIVEKIT_BOOK_QUICK_EPOCHS`` (default 2) and ``DIVEKIT_BOOK_QUICK_BATCHES`` (default 4).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["Timer", "Accumulator", "Benchmark", "try_gpu", "try_all_gpus",
           "get_dataloader_workers", "cpu", "gpu", "num_gpus"]


# ------------------------------------------------------------------------------ quick mode
def quick() -> bool:
    """Whether ``divekit book run --quick`` (``DIVEKIT_BOOK_QUICK=1``) bounds the training."""
    return os.environ.get("DIVEKIT_BOOK_QUICK", "") not in ("", "0", "false", "no")


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def quick_epochs(num_epochs: int) -> int:
    """``num_epochs``, or at most ``DIVEKIT_BOOK_QUICK_EPOCHS`` (2) in quick mode."""
    return min(num_epochs, _env_int("DIVEKIT_BOOK_QUICK_EPOCHS", 2)) if quick() else num_epochs


def quick_batches() -> int | None:
    """The batch bound of quick mode (``DIVEKIT_BOOK_QUICK_BATCHES``, 4), or None."""
    return _env_int("DIVEKIT_BOOK_QUICK_BATCHES", 4) if quick() else None


def bounded(iterable: Iterable[Any]) -> Iterator[Any]:
    """The iterable, cut to the quick-mode batch bound when quick mode is on."""
    n = quick_batches()
    return iter(iterable) if n is None else itertools.islice(iterable, n)


class BoundedLoader:
    """A re-iterable view of a data loader that yields at most ``quick_batches()`` batches per
    pass in quick mode (and everything otherwise); ``len`` agrees with what iteration yields.
    Attribute access falls through to the wrapped loader (``.dataset``, ``.batch_size``, ...)."""

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        return bounded(self.loader)

    def __len__(self) -> int:
        n = len(self.loader)  # type: ignore[arg-type]
        q = quick_batches()
        return n if q is None else min(n, q)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


# ----------------------------------------------------------------------------- the book's
class Timer:
    """Record several running times (the book's ``d2l.Timer``)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.start()

    def start(self) -> None:
        self.tik = time.perf_counter()

    def stop(self) -> float:
        self.times.append(time.perf_counter() - self.tik)
        return self.times[-1]

    def avg(self) -> float:
        return sum(self.times) / len(self.times) if self.times else 0.0

    def sum(self) -> float:
        return sum(self.times)

    def cumsum(self) -> list[float]:
        return np.array(self.times).cumsum().tolist()


class Accumulator:
    """Sums over ``n`` variables (the book's ``d2l.Accumulator``)."""

    def __init__(self, n: int):
        self.data = [0.0] * n

    def add(self, *args: Any) -> None:
        self.data = [a + float(b) for a, b in zip(self.data, args)]

    def reset(self) -> None:
        self.data = [0.0] * len(self.data)

    def __getitem__(self, idx: int) -> float:
        return self.data[idx]


class Benchmark:
    """``with Benchmark('what'):`` prints ``what: 0.1234 sec``, the block's wall time."""

    def __init__(self, description: str = "Done"):
        self.description = description

    def __enter__(self) -> Benchmark:
        self.timer = Timer()
        return self

    def __exit__(self, *args: Any) -> None:
        print(f"{self.description}: {self.timer.stop():.4f} sec")


def num_gpus() -> int:
    return torch.cuda.device_count()


def cpu() -> torch.device:
    return torch.device("cpu")


def gpu(i: int = 0) -> torch.device:
    return torch.device(f"cuda:{i}")


def try_gpu(i: int = 0) -> torch.device:
    """GPU ``i`` if it exists, else the CPU (never an error)."""
    return gpu(i) if torch.cuda.device_count() >= i + 1 else cpu()


def try_all_gpus() -> list[torch.device]:
    """Every GPU, or ``[cpu]`` when there is none."""
    return [gpu(i) for i in range(torch.cuda.device_count())] or [cpu()]


def get_dataloader_workers() -> int:
    """Worker processes for the book's data loaders: the book asks for 4; on a machine with
    fewer cores more workers only cost start-up, so this is ``min(4, cores - 1)`` (0 on a
    single core, which loads in the main process)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _cpu_synchronize() -> None:
    """Without CUDA, ``torch.cuda.synchronize()`` (no device, or a CPU device) returns at once
    instead of raising: work on the CPU is synchronous, so there is nothing to wait for, and the
    book's timing cells (``torch.cuda.synchronize(d2l.try_gpu())``) then run on a laptop. A CUDA
    device named explicitly still gets torch's own error. Done once, at the compat import."""
    if torch.cuda.is_available() or getattr(torch.cuda.synchronize, "_divekit_cpu", False):
        return
    original = torch.cuda.synchronize

    def synchronize(device: Any = None) -> None:
        if device is None or (isinstance(device, (str, torch.device))
                              and torch.device(device).type == "cpu"):
            return None
        return original(device)

    synchronize.__doc__ = original.__doc__
    synchronize._divekit_cpu = True  # type: ignore[attr-defined]
    torch.cuda.synchronize = synchronize


_cpu_synchronize()
