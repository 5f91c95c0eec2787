"""Nadaraya–Watson kernel regression: the weights are the formula's, rows sum to 1, the
parametric width learns, and `divekit kernel-regression` draws the fits and heat maps."""

from __future__ import annotations

import math

import pytest
import torch

from divekit.cli import main
from divekit.errors import DivekitError
from divekit.models.attention import (
    NWKernelRegression,
    average_pooling,
    gaussian_kernel_weights,
    kernel_regression,
    nadaraya_watson,
)
from divekit.models.kernel_regression import fit_parametric, leave_one_out, toy_data


def test_nonparametric_weights_are_the_gaussian_kernel_formula():
    q, k = torch.rand(7, dtype=torch.float64) * 5, torch.rand(9, dtype=torch.float64) * 5
    weights = gaussian_kernel_weights(q, k)
    for i in range(7):  # brute force: exp(-(x - x_j)^2 / 2) / Σ_j exp(-(x - x_j)^2 / 2)
        e = [math.exp(-((q[i] - k[j]).item() ** 2) / 2) for j in range(9)]
        assert weights[i].tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-12)


def test_every_row_of_weights_sums_to_one_and_predictions_pool_the_values():
    d = toy_data(30, seed=2)
    for w in (0.5, 1.0, 8.0):
        y, weights = nadaraya_watson(d.x_test, d.x_train, d.y_train, w)
        torch.testing.assert_close(weights.sum(1), torch.ones(len(d.x_test)))
        torch.testing.assert_close(y, weights @ d.y_train)
    y, weights = average_pooling(d.x_test, d.x_train, d.y_train)
    torch.testing.assert_close(y, d.y_train.mean().expand(len(d.x_test)))


def test_the_parametric_model_learns_w_and_its_loss_falls():
    d = toy_data(50)
    model, losses = fit_parametric(d.x_train, d.y_train, epochs=5)
    assert losses[-1] < losses[0] / 2 and all(b <= a for a, b in zip(losses, losses[1:]))
    # with w = 1 the parametric model is the non-parametric one
    one = NWKernelRegression(w=1.0)
    m = len(d.x_test)
    with torch.no_grad():
        y = one(d.x_test, d.x_train.expand(m, -1), d.y_train.expand(m, -1))
    torch.testing.assert_close(y, nadaraya_watson(d.x_test, d.x_train, d.y_train)[0])


def test_leave_one_out_keys_drop_the_query_itself():
    x = torch.arange(4.0)
    assert leave_one_out(x).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_a_learned_kernel_fits_the_truth_better_than_average_pooling():
    r = kernel_regression()
    assert r.test_mse["parametric"] < r.test_mse["nonparametric"] < r.test_mse["average"]
    assert r.weights["parametric"].shape == (50, 50)


def test_bad_sizes_are_refused():
    with pytest.raises(DivekitError, match="n_train"):
        toy_data(1)
    with pytest.raises(DivekitError, match="--epochs"):
        fit_parametric(torch.rand(5), torch.rand(5), epochs=0)


def test_the_cli_writes_fits_and_heat_maps(tmp_path, capsys):
    assert main(["kernel-regression", "-o", str(tmp_path / "kr")]) == 0
    out = capsys.readouterr().out
    assert "parametric w =" in out and "test MSE" in out
    names = sorted(p.name for p in (tmp_path / "kr").iterdir())
    assert names == sorted(f"{kind}_{m}.png" if kind == "attention" else f"kernel_{m}_fit.png"
                           for m in ("average", "nonparametric", "parametric")
                           for kind in ("attention", "kernel"))
    assert all((tmp_path / "kr" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    (tmp_path / "file").write_text("x", encoding="utf-8")
    assert main(["kernel-regression", "-o", str(tmp_path / "file")]) == 2
    assert "not a folder" in capsys.readouterr().err
