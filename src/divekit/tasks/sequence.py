"""Sequence models on a noisy sine series, the course's section "Working with Sequences".

Data: ``x_t = sin(0.01 t) + ε_t``, ``ε_t ~ N(0, 0.2²)``, ``t = 1, ..., T``.

* **Autoregression** under the Markov assumption: ``x̂_t = f(x_{t-τ}, ..., x_{t-1})`` with an MLP
  on ``τ`` lagged features, trained on the first ``n_train`` examples.
* **A latent-variable model**: ``h_t = g(h_{t-1}, x_{t-1})``, ``x̂_t = W h_t + b`` (a GRU), whose
  state summarises the whole past rather than the last ``τ`` values.

``k``-step-ahead prediction feeds a model its own predictions: ``x̂_t^{(k)}`` uses observations up
to ``t - k`` only. Errors compound, so the ``k = 64`` curve decays to a constant. Both models are
compared on the same test targets (``t ≥ n_train``).

``divekit sequence -o DIR`` trains both, prints the MSE table and writes ``DIR/kstep.png``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.config import option
from divekit.data.loader import TensorBatchLoader
from divekit.engine.config import TaskConfig, finite
from divekit.engine.task import Task
from divekit.engine.trainer import Trainer
from divekit.errors import DivekitError
from divekit.io import atomic_write_json
from divekit.models.sequence import LatentRNN, mlp

STEPS = (1, 4, 16, 64)


def parse_steps(text: str) -> tuple[int, ...]:
    """``"1,4,16"`` → ``(1, 4, 16)``: the k of the k-step predictions, as typed."""
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise DivekitError(f"--steps takes comma-separated integers such as 1,4,16,64, got {text!r}") from None


@dataclass(frozen=True)
class SequenceConfig:
    """The experiment's options; each is a ``divekit sequence`` option unless marked not."""

    T: int = option(1000, "series length", aliases=["-T"])
    tau: int = option(4, "lagged features of the MLP")
    noise: float = option(0.2, "σ of the Gaussian noise", cli=False)
    n_train: int = option(600, "training examples")
    epochs: int = option(5, "MLP epochs")  # the course's
    rnn_epochs: int = option(10, "GRU epochs")
    hidden: int = option(16, "GRU state size")
    window: int = option(32, "the GRU's training subsequences", cli=False)
    batch_size: int = option(16, "minibatch size", cli=False)
    lr: float = option(0.01, "Adam learning rate")
    steps: tuple[int, ...] = option(STEPS, "k of the k-step predictions", type=parse_steps,
                                    metavar="K,K,...")
    seed: int = option(0, "random seed")
    device: str = option("cpu", "cpu, cuda or auto")
    out: str | None = option("runs/sequence", "output folder", aliases=["-o"], metavar="DIR")

    def validate(self) -> None:
        steps = self.steps
        checks = [
            (self.tau >= 1, f"--tau must be at least 1, got {self.tau}"),
            (self.epochs >= 1 and self.rnn_epochs >= 1, "--epochs and --rnn-epochs must be at least 1"),
            (self.hidden >= 1 and self.batch_size >= 1 and self.window >= 2,
             "--hidden, --batch-size must be >= 1 and --window >= 2"),
            (finite(self.lr) and self.lr > 0 and finite(self.noise) and self.noise >= 0,
             f"--lr must be positive and --noise non-negative, got {self.lr} and {self.noise}"),
            (bool(steps) and min(steps) >= 1, f"--steps must be positive, got {steps}"),
            (self.tau + self.window < self.n_train < self.T,
             f"need tau + window < n_train < T, got tau={self.tau}, window={self.window}, "
             f"n_train={self.n_train}, T={self.T}"),
            (bool(steps) and max(steps) < self.T - self.n_train,
             f"the largest k ({max(steps, default=0)}) must be shorter than the test part "
             f"({self.T - self.n_train})"),
        ]
        for ok, message in checks:
            if not ok:
                raise DivekitError(message)


def sine_series(T: int = 1000, noise: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(time, x)``: ``time = 1..T`` and ``x_t = sin(0.01 t) + N(0, noise²)``, both ``(T,)``."""
    if T < 2:
        raise DivekitError(f"T must be at least 2, got {T}")
    g = torch.Generator().manual_seed(seed)
    time = torch.arange(1, T + 1, dtype=torch.float32)
    return time, torch.sin(0.01 * time) + torch.randn(T, generator=g) * noise


def lagged_features(x: Tensor, tau: int) -> tuple[Tensor, Tensor]:
    """Features ``(T - τ, τ)`` whose row ``i`` is ``x_i, ..., x_{i+τ-1}``, and labels ``x_{i+τ}``."""
    if not 1 <= tau < len(x):
        raise DivekitError(f"tau must be in [1, {len(x) - 1}] for a series of {len(x)}, got {tau}")
    features = torch.stack([x[i : len(x) - tau + i] for i in range(tau)], 1)
    return features, x[tau:]


class RegressionTask(Task, name="sequence_regression"):
    """Squared loss ``(ŷ - y)²`` on ``(inputs, targets)`` pairs, for a model from ``build``;
    ``model(x)`` may return ``(ŷ, state)`` (a recurrent one). ``val``: optional held-out pairs,
    reported as their mean squared error."""

    Config = TaskConfig

    def __init__(self, config: TaskConfig, build: Callable[[], nn.Module], x: Tensor, y: Tensor,
                 val: tuple[Tensor, Tensor] | None = None):
        super().__init__(config)
        self.build, self.x, self.y, self.val = build, x, y, val

    def build_model(self) -> nn.Module:
        return self.build()

    def train_data(self) -> TensorBatchLoader:
        cfg = self.config
        return TensorBatchLoader(self.x, self.y, batch_size=cfg.batch_size, shuffle=True,
                                 seed=cfg.seed)

    def val_data(self) -> TensorBatchLoader | None:
        if self.val is None:
            return None
        return TensorBatchLoader(*self.val, batch_size=max(len(self.val[0]), 1))

    @staticmethod
    def _prediction(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        out = model(x)
        return (out[0] if isinstance(out, tuple) else out).reshape(y.shape)

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        loss = F.mse_loss(self._prediction(model, x, y), y)
        return loss, {"loss": loss.detach()}

    def validation_step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Any]:
        x, y = batch
        return {"mse": F.mse_loss(self._prediction(model, x, y), y, reduction="sum"),
                "count": y.numel()}


def _fit(build: Callable[[], nn.Module], x: Tensor, y: Tensor, cfg: SequenceConfig,
         epochs: int) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train a fresh ``build()`` with Adam through the Trainer: the model and its history."""
    train_cfg = TaskConfig(epochs=epochs, lr=cfg.lr, optimizer="adam", batch_size=cfg.batch_size,
                           seed=cfg.seed, device=cfg.device, quiet=True)
    trainer = Trainer(RegressionTask(train_cfg, build, x, y), train_cfg)
    history = trainer.fit()
    return trainer.model, history


# ----------------------------------------------------------------------------- k-step predictions


@torch.no_grad()
def mlp_k_step(net: nn.Module, x: Tensor, tau: int, steps: Sequence[int]) -> dict[int, Tensor]:
    """``{k: x̂^{(k)}}``, each ``(T,)`` with NaN where undefined (``t < τ + k - 1``).

    As the course: columns ``P_0..P_{τ-1}`` are observations, ``P_{τ+j} = f(P_j, ..., P_{τ+j-1})``;
    row ``i`` of ``P_{τ+k-1}`` predicts ``x_{i+τ+k-1}`` from ``x_i, ..., x_{i+τ-1}`` alone.
    """
    T, n = len(x), len(x) - tau
    cols = [x[i : i + n] for i in range(tau)]
    for j in range(max(steps)):
        cols.append(net(torch.stack(cols[j : j + tau], 1)).reshape(-1))
    out = {}
    for k in steps:
        pred = torch.full((T,), math.nan)
        start = tau + k - 1
        pred[start:] = cols[start][: T - start]
        out[k] = pred
    return out


@torch.no_grad()
def rnn_k_step(model: LatentRNN, x: Tensor, steps: Sequence[int]) -> dict[int, Tensor]:
    """``{k: x̂^{(k)}}``, each ``(T,)``: the state after reading ``x_1..x_s`` (teacher forcing),
    then ``k`` steps on the model's own predictions, all starts ``s`` at once as one batch."""
    T = len(x)
    outs, _ = model.rnn(x.view(T, 1, 1))  # (T, 1, H): h after each observation
    h = outs.transpose(0, 1).contiguous()  # (1, T, H): every start s in the batch
    y = model.head(h)  # (1, T, 1): one step ahead of each s
    preds = {}
    for j in range(1, max(steps) + 1):
        if j > 1:
            o, h = model.rnn(y, h)
            y = model.head(o)
        if j in steps:
            pred = torch.full((T,), math.nan)
            pred[j:] = y.reshape(-1)[: T - j]  # start s predicts x_{s+j}
            preds[j] = pred
    return preds


def test_mse(preds: dict[int, Tensor], x: Tensor, n_train: int) -> dict[int, float]:
    """Mean squared error of each ``k``-step prediction on the test targets ``t ≥ n_train``."""
    return {k: float(((p[n_train:] - x[n_train:]) ** 2).mean()) for k, p in preds.items()}


# ----------------------------------------------------------------------------- the experiment


def run(cfg: SequenceConfig | None = None) -> dict[str, Any]:
    """Train the MLP and the GRU, compute k-step predictions and MSEs; save the plot under ``out``."""
    cfg = cfg or SequenceConfig()
    cfg.validate()
    time, x = sine_series(cfg.T, cfg.noise, cfg.seed)
    features, labels = lagged_features(x, cfg.tau)
    n = cfg.n_train
    net, mlp_history = _fit(lambda: mlp(cfg.tau), features[:n], labels[:n].unsqueeze(1), cfg,
                            cfg.epochs)
    starts = torch.arange(n - cfg.window)  # GRU windows inside the training part
    index = starts[:, None] + torch.arange(cfg.window)  # (N, L)
    latent, rnn_history = _fit(lambda: LatentRNN(cfg.hidden), x[index], x[index + 1], cfg,
                               cfg.rnn_epochs)
    net, latent = net.cpu().eval(), cast(LatentRNN, latent.cpu().eval())
    mlp_preds, rnn_preds = mlp_k_step(net, x, cfg.tau, cfg.steps), rnn_k_step(latent, x, cfg.steps)
    result = {
        "config": asdict(cfg),
        "mse": {"mlp": test_mse(mlp_preds, x, n), "rnn": test_mse(rnn_preds, x, n)},
        "noise_variance": cfg.noise**2,
        "train_loss": {"mlp": mlp_history[-1]["train_loss"], "rnn": rnn_history[-1]["train_loss"]},
        "time": time, "x": x, "mlp_preds": mlp_preds, "rnn_preds": rnn_preds,
        "mlp_multistep": multistep(net, x, cfg.tau, n),
    }
    if cfg.out is not None:
        from divekit.viz import plot_k_step

        out = Path(cfg.out)
        result["plot"] = str(plot_k_step(result, out / "kstep.png"))
        atomic_write_json(out / "mse.json", {"mse": result["mse"], "config": result["config"]})
    return result


@torch.no_grad()
def multistep(net: nn.Module, x: Tensor, tau: int, n_train: int) -> Tensor:
    """The course's multistep prediction: observations up to ``n_train``, then only predictions."""
    seq = list(x[:n_train])
    for _ in range(len(x) - n_train):
        seq.append(net(torch.stack(seq[-tau:]).view(1, tau)).reshape(()))
    pred = torch.full((len(x),), math.nan)
    pred[n_train:] = torch.stack(seq[n_train:])
    return pred
