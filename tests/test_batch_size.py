"""--batch-size auto: doubling and backing off, the memory estimate, the cap."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from divekit.cli import main
from divekit.engine.batch_size import (
    HEADROOM,
    choose_batch_size,
    largest_fitting,
    parse_memory,
    step_memory,
)
from divekit.errors import DivekitError
from divekit.models import create_model


def test_doubling_and_backing_off_finds_the_brute_force_answer():
    rng = random.Random(0)
    for _ in range(200):
        threshold, limit = rng.randint(2, 5000), rng.randint(2, 6000)
        calls: list[int] = []

        def fits(b: int, t: int = threshold, seen: list[int] = calls) -> bool:
            seen.append(b)
            return b <= t

        expected = max(b for b in range(2, limit + 1) if b <= threshold)
        assert largest_fitting(fits, start=2, limit=limit) == expected
        assert len(calls) <= 2 * limit.bit_length() + 2  # logarithmic, not a scan
    with pytest.raises(DivekitError, match="not even a batch of 2"):
        largest_fitting(lambda b: False, start=2)


def test_a_dense_layer_costs_its_input_twice_and_its_output_per_sample():
    # saved for backward: the input (the weight gradient needs it); plus the batch itself and
    # the output: (2 * in + out) float32 values per sample, times the headroom factor
    net = nn.Linear(300, 70)
    per_sample = (step_memory(net, (300,), 65) - step_memory(net, (300,), 1)) / 64
    assert per_sample == pytest.approx(HEADROOM * 4 * (2 * 300 + 70), rel=1e-3)


def test_the_estimate_grows_linearly_with_the_batch():
    net = create_model("lenet_bn", num_classes=10, in_channels=1)
    m = [step_memory(net, (1, 28, 28), b) for b in (8, 16, 32)]
    assert m[2] - m[1] == pytest.approx(2 * (m[1] - m[0]), rel=1e-3) and m[0] < m[1] < m[2]


def test_auto_picks_the_largest_batch_within_the_budget_then_caps_it():
    net = create_model("lenet_bn", num_classes=10, in_channels=1)
    budget = 40 * 2**20
    free = choose_batch_size(net, (1, 28, 28), 10, memory_budget="40MiB", cap=False)
    b = free.batch_size
    assert step_memory(net, (1, 28, 28), b) <= budget < step_memory(net, (1, 28, 28), b + 1)
    assert "40 MiB" in free.reason
    capped = choose_batch_size(net, (1, 28, 28), 10, memory_budget=budget, cap=True)
    assert capped.batch_size == 100 and capped.largest_fitting == b and "10 × 10 classes" in capped.reason


@pytest.mark.parametrize("text, expected", [("2GB", 2 * 2**30), ("512MiB", 512 * 2**20),
                                            ("1.5g", int(1.5 * 2**30)), ("1000", 1000)])
def test_memory_budgets_parse(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "2XB", "0"])
def test_bad_memory_budgets_are_refused(text):
    with pytest.raises(DivekitError, match="memory-budget"):
        parse_memory(text)


def test_cli_batch_size_auto_says_what_it_chose_and_why(tmp_path, capsys):
    out = tmp_path / "auto"
    args = ["train", "lenet", "--data", "digits", "--limit", "120", "--epochs", "1", "--quiet",
            "--device", "cpu", "--batch-size", "auto", "--memory-budget", "64MB", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "--batch-size auto: 100 (largest batch fitting a CPU RAM budget of 64 MiB" in printed
    assert json.loads((out / "config.json").read_text())["config"]["batch_size"] == 100
    assert main(["train", "lenet", "--batch-size", "many", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "positive integer or auto, got 'many'" in err


def test_step_memory_leaves_the_model_untouched():
    net = create_model("lenet", num_classes=10, in_channels=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    step_memory(net, (1, 28, 28), 4)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert next(net.parameters()).device.type == "cpu"
