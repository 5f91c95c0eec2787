"""The book's small utilities in divekit.compat.d2l: Timer, Accumulator, Benchmark, devices,
the quick-mode bounds, and torch.cuda.synchronize on a machine without CUDA."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from divekit.compat import d2l
from divekit.compat.d2l import _util


def test_timer_and_accumulator():
    timer = d2l.Timer()
    for _ in range(3):
        timer.start()
        sum(range(10_000))
        timer.stop()
    assert len(timer.times) == 3 and timer.sum() == pytest.approx(sum(timer.times))
    assert timer.avg() == pytest.approx(timer.sum() / 3)
    assert timer.cumsum()[-1] == pytest.approx(timer.sum())
    acc = d2l.Accumulator(2)
    acc.add(1, torch.tensor(2.5))
    acc.add(3, 0.5)
    assert (acc[0], acc[1]) == (4.0, 3.0)
    acc.reset()
    assert acc.data == [0.0, 0.0]


def test_benchmark_prints_the_blocks_time(capsys):
    (param,) = inspect.signature(d2l.Benchmark).parameters.values()
    assert (param.name, param.default) == ("description", "Done")
    with d2l.Benchmark("numpy"):
        sum(range(1000))
    with d2l.Benchmark():
        pass
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"numpy: \d+\.\d{4} sec", out[0]) and out[1].startswith("Done: ")


def test_devices_fall_back_to_the_cpu():
    n = torch.cuda.device_count()
    assert d2l.try_gpu() == (torch.device("cuda:0") if n else torch.device("cpu"))
    assert d2l.try_gpu(n) == torch.device("cpu")  # one past the last GPU
    assert d2l.try_all_gpus() == ([torch.device(f"cuda:{i}") for i in range(n)]
                                  or [torch.device("cpu")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim applies only without CUDA")
def test_synchronize_without_cuda():
    torch.cuda.synchronize()
    torch.cuda.synchronize(d2l.try_gpu())
    torch.cuda.synchronize("cpu")
    with pytest.raises((RuntimeError, AssertionError)):  # a CUDA device named: torch's error
        torch.cuda.synchronize("cuda:0")


def test_quick_bounds(monkeypatch):
    monkeypatch.delenv("DIVEKIT_BOOK_QUICK", raising=False)
    loader = _util.BoundedLoader(list(range(10)))
    assert _util.quick_epochs(10) == 10 and len(loader) == 10 and list(loader) == list(range(10))
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_EPOCHS", "3")
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_BATCHES", "4")
    assert _util.quick_epochs(10) == 3 and _util.quick_epochs(2) == 2
    assert len(loader) == 4 and list(loader) == [0, 1, 2, 3] and list(loader) == [0, 1, 2, 3]
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_BATCHES", "oops")  # a bad value: the default
    assert _util.quick_batches() == 4
