"""Sequence models on the noisy sine: lagged features, k-step predictions, the experiment."""

from __future__ import annotations

import json
import math

import pytest
import torch

from divekit.cli import main
from divekit.cli.text import format_sequence_table
from divekit.engine import Trainer
from divekit.engine.config import TaskConfig
from divekit.errors import DivekitError
from divekit.models.sequence import LatentRNN, mlp
from divekit.tasks import sequence as seq


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    yield
    torch.set_num_threads(threads)


def test_sine_series_is_sin_plus_gaussian_noise():
    time, x = seq.sine_series(1000, noise=0.2, seed=3)
    assert time[0] == 1 and time[-1] == 1000 and x.shape == (1000,)
    residual = x - torch.sin(0.01 * time)
    assert abs(residual.mean()) < 0.03 and residual.std() == pytest.approx(0.2, rel=0.1)
    assert torch.equal(x, seq.sine_series(1000, noise=0.2, seed=3)[1])
    assert torch.equal(seq.sine_series(50, noise=0.0)[1], torch.sin(0.01 * torch.arange(1.0, 51)))


def test_lagged_features_hold_the_previous_tau_values():
    x = torch.randn(30)
    features, labels = seq.lagged_features(x, 4)
    assert features.shape == (26, 4) and labels.shape == (26,)
    for i in range(26):  # brute force: row i is x_i..x_{i+3}, label x_{i+4}
        assert torch.equal(features[i], torch.tensor([x[i + j].item() for j in range(4)]))
        assert labels[i] == x[i + 4]
    with pytest.raises(DivekitError, match="tau"):
        seq.lagged_features(x, 0)


def _brute_mlp_k_step(net, x, tau, t, k):
    """x̂_t^{(k)}: observations up to t-k, then k recursive predictions, one scalar at a time."""
    window = [x[i].item() for i in range(t - k - tau + 1, t - k + 1)]
    for _ in range(k):
        window.append(net(torch.tensor([window[-tau:]])).item())
    return window[-1]


def test_mlp_k_step_matches_a_recursive_brute_force():
    torch.manual_seed(0)
    net, x, tau = mlp(4), torch.randn(120), 4
    preds = seq.mlp_k_step(net, x, tau, (1, 4, 16))
    features, _ = seq.lagged_features(x, tau)
    with torch.no_grad():
        one_step = net(features).reshape(-1)
    torch.testing.assert_close(preds[1][tau:], one_step)  # 1-step = the model on observed lags
    for k in (1, 4, 16):
        assert math.isnan(preds[k][tau + k - 2]) and not math.isnan(preds[k][tau + k - 1])
        for t in (tau + k - 1, 60, 119):
            assert preds[k][t].item() == pytest.approx(_brute_mlp_k_step(net, x, tau, t, k), abs=1e-5)


def test_rnn_k_step_matches_a_step_by_step_rollout():
    torch.manual_seed(0)
    model, x = LatentRNN(8).eval(), torch.randn(50)
    preds = seq.rnn_k_step(model, x, (1, 3, 8))
    cell = torch.nn.GRUCell(1, 8)  # independent recurrence: the same weights in a GRUCell
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(model.rnn, f"{name}_l0"))
        for s, k in ((0, 1), (10, 3), (30, 8), (41, 8)):
            h = torch.zeros(1, 8)
            for v in x[: s + 1]:  # read x_0..x_s
                h = cell(v.view(1, 1), h)
            y = model.head(h)
            for _ in range(k - 1):  # then feed the predictions back
                h = cell(y, h)
                y = model.head(h)
            assert preds[k][s + k].item() == pytest.approx(y.item(), abs=1e-5)


def test_the_experiment_writes_the_plot_and_orders_the_errors(tmp_path):
    cfg = seq.SequenceConfig(epochs=3, rnn_epochs=2, out=str(tmp_path))
    result = seq.run(cfg)
    mlp, rnn = result["mse"]["mlp"], result["mse"]["rnn"]
    assert set(mlp) == set(rnn) == {1, 4, 16, 64}
    # one step ahead is close to the noise floor σ² = 0.04; 64 steps ahead drifts far off
    assert 0.03 < mlp[1] < 0.1 and mlp[1] < mlp[16] < mlp[64]
    assert rnn[1] < 0.15 and rnn[1] < rnn[64]
    assert (tmp_path / "kstep.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "mse.json").read_text())
    assert saved["mse"]["mlp"]["1"] == pytest.approx(mlp[1])
    table = format_sequence_table(result).splitlines()
    assert table[0].startswith("test MSE") and len(table) == 2 + 4
    assert table[2].split() == ["1", f"{mlp[1]:.4f}", f"{rnn[1]:.4f}"]


def test_regression_task_fits_a_line_and_reports_its_mse():
    x = torch.linspace(-1, 1, 64).unsqueeze(1)
    y = 3 * x - 1
    cfg = TaskConfig(epochs=30, lr=0.1, optimizer="adam", batch_size=16, device="cpu", quiet=True)
    task = seq.RegressionTask(cfg, lambda: torch.nn.Linear(1, 1), x, y, val=(x, y))
    history = Trainer(task, cfg).fit()
    assert history[-1]["val_mse"] < 0.01 < history[0]["val_mse"]
    out = LatentRNN(4)(torch.randn(2, 5))  # a recurrent model's (ŷ, state) is taken apart
    batch = (torch.randn(2, 5), torch.randn(2, 5))
    loss, _ = task.training_step(lambda x: (out[0], out[1]), batch)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(out[0], batch[1]).item())


def test_bad_configs_are_refused():
    for bad, message in [({"tau": 0}, "--tau"), ({"lr": math.nan}, "--lr"),
                         ({"noise": -1.0}, "--noise"), ({"steps": ()}, "--steps"),
                         ({"steps": (1, 500)}, "largest k")]:
        with pytest.raises(DivekitError, match=message):
            seq.SequenceConfig(**bad).validate()
    with pytest.raises(DivekitError, match="--steps takes comma-separated integers"):
        seq.parse_steps("1,x")


def test_cli_prints_the_table_and_rejects_bad_options(tmp_path, capsys):
    args = ["sequence", "--epochs", "1", "--rnn-epochs", "1", "-T", "400", "--n-train", "250",
            "--steps", "1,8", "-o", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test MSE" in out and "kstep.png" in out
    assert main(["sequence", "--tau", "0", "-o", str(tmp_path)]) == 2
    assert "--tau must be at least 1" in capsys.readouterr().err
    assert main(["sequence", "--steps", "1,500", "-o", str(tmp_path)]) == 2
    assert "largest k" in capsys.readouterr().err
