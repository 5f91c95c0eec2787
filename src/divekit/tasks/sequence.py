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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.data.loader import TensorBatchLoader
from divekit.io import atomic_write_json
from divekit.engine.trainer import TrainConfig, Trainer
from divekit.errors import DivekitError

STEPS = (1, 4, 16, 64)


@dataclass
class SequenceConfig:
    T: int = 1000  # series length
    tau: int = 4  # lagged features of the autoregressive MLP
    noise: float = 0.2  # σ of the Gaussian noise
    n_train: int = 600  # training examples (the rest is the test part)
    epochs: int = 5  # MLP epochs (the course's)
    rnn_epochs: int = 10
    hidden: int = 16  # the GRU's latent state size
    window: int = 32  # the GRU's training subsequences
    batch_size: int = 16
    lr: float = 0.01
    steps: tuple[int, ...] = field(default=STEPS)
    seed: int = 0
    device: str = "cpu"
    out: str | None = "runs/sequence"

    def validate(self) -> None:
        checks = [
            (self.tau >= 1, f"--tau must be at least 1, got {self.tau}"),
            (self.epochs >= 1 and self.rnn_epochs >= 1, "--epochs and --rnn-epochs must be at least 1"),
            (self.hidden >= 1 and self.batch_size >= 1 and self.window >= 2,
             "--hidden, --batch-size must be >= 1 and --window >= 2"),
            (self.lr > 0 and self.noise >= 0, "--lr must be positive and --noise non-negative"),
            (bool(self.steps) and min(self.steps) >= 1, f"--steps must be positive, got {self.steps}"),
            (self.tau + self.window < self.n_train < self.T,
             f"need tau + window < n_train < T, got tau={self.tau}, window={self.window}, "
             f"n_train={self.n_train}, T={self.T}"),
            (max(self.steps) < self.T - self.n_train,
             f"the largest k ({max(self.steps)}) must be shorter than the test part ({self.T - self.n_train})"),
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


class LatentRNN(nn.Module):
    """``h_t = GRU(h_{t-1}, x_{t-1})``, ``x̂_t = W h_t + b``. Input ``(B, L)`` → predictions ``(B, L)``."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.rnn = nn.GRU(1, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out, state = self.rnn(x.T.unsqueeze(-1), state)  # (L, B, H)
        return self.head(out).squeeze(-1).T, state  # (B, L)


class RegressionTask:
    """Squared loss on ``(inputs, targets)`` pairs; ``model(x)`` may return ``(ŷ, state)``."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, batch_size: int, seed: int):
        self._model, self.x, self.y = model, x, y
        self.batch, self.seed = batch_size, seed

    def model(self) -> nn.Module:
        return self._model

    def train_data(self) -> TensorBatchLoader:
        return TensorBatchLoader(self.x, self.y, batch_size=self.batch, shuffle=True, seed=self.seed)

    def val_data(self) -> None:
        return None

    def step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        out = model(x)
        pred = out[0] if isinstance(out, tuple) else out
        loss = F.mse_loss(pred.reshape(y.shape), y)
        return loss, {"loss": loss.detach()}

    def evaluate(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        return {}


def _fit(model: nn.Module, x: Tensor, y: Tensor, cfg: SequenceConfig, epochs: int) -> list[dict[str, Any]]:
    train_cfg = TrainConfig(epochs=epochs, lr=cfg.lr, optimizer="adam", seed=cfg.seed,
                            device=cfg.device, quiet=True)
    trainer = Trainer(RegressionTask(model, x, y, cfg.batch_size, cfg.seed), train_cfg)
    return trainer.fit()


def mlp(tau: int) -> nn.Module:
    """The course's autoregressive model: ``Linear(τ, 10) → ReLU → Linear(10, 1)``."""
    return nn.Sequential(nn.Linear(tau, 10), nn.ReLU(), nn.Linear(10, 1))


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
    torch.manual_seed(cfg.seed)
    net = mlp(cfg.tau)
    n = cfg.n_train
    mlp_history = _fit(net, features[:n], labels[:n].unsqueeze(1), cfg, cfg.epochs)
    starts = torch.arange(n - cfg.window)  # GRU windows inside the training part
    index = starts[:, None] + torch.arange(cfg.window)  # (N, L)
    latent = LatentRNN(cfg.hidden)
    rnn_history = _fit(latent, x[index], x[index + 1], cfg, cfg.rnn_epochs)
    net, latent = net.cpu().eval(), latent.cpu().eval()
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


def plot_k_step(result: dict[str, Any], path: str | Path) -> Path:
    """Three panels: data with 1-step and multistep predictions; MLP k-step; GRU k-step."""
    from divekit.viz import plt, save_figure

    cfg, t, x = result["config"], result["time"], result["x"]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(t, x, color="0.7", lw=1, label="data")
    axes[0].plot(t, result["mlp_preds"][1], lw=1, label="MLP 1-step")
    axes[0].plot(t, result["mlp_multistep"], lw=1.5, label=f"MLP multistep (from t={cfg['n_train']})")
    for ax, key, name in ((axes[1], "mlp_preds", f"MLP, τ={cfg['tau']}"), (axes[2], "rnn_preds", "GRU (latent state)")):
        ax.plot(t, x, color="0.8", lw=1, label="data")
        for k, pred in result[key].items():
            mse = result["mse"]["mlp" if key == "mlp_preds" else "rnn"][k]
            ax.plot(t, pred, lw=1, label=f"{k}-step (test MSE {mse:.3f})")
        ax.set_title(name, fontsize=10)
    for ax in axes:
        ax.axvline(cfg["n_train"], color="k", ls=":", lw=0.8)
        ax.set_ylabel("x")
        ax.set_ylim(-2, 2)
        ax.legend(fontsize=7, loc="lower left", ncol=2)
    axes[0].set_title("noisy sine: x_t = sin(0.01 t) + N(0, 0.2²)", fontsize=10)
    axes[2].set_xlabel("time")
    fig.tight_layout()
    return save_figure(fig, path)


def format_table(result: dict[str, Any]) -> str:
    mse = result["mse"]
    lines = [f"test MSE (t ≥ {result['config']['n_train']}; noise variance {result['noise_variance']:.3f})",
             f"{'k':>4}  {'MLP τ=' + str(result['config']['tau']):>10}  {'GRU':>8}"]
    lines += [f"{k:>4}  {mse['mlp'][k]:>10.4f}  {mse['rnn'][k]:>8.4f}" for k in mse["mlp"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _parse_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise DivekitError(f"--steps takes comma-separated integers such as 1,4,16,64, got {text!r}") from None


def add_commands(sub, parent) -> None:
    d = SequenceConfig()
    p = sub.add_parser(
        "sequence", parents=[parent], help="autoregression vs a latent-variable RNN on a noisy sine",
        description="Train an MLP on τ lagged values and a GRU on x_t = sin(0.01 t) + N(0, 0.2²), "
        "predict 1, 4, 16 and 64 steps ahead, print the test MSEs and save the plot as DIR/kstep.png.",
    )
    p.add_argument("--tau", type=int, default=d.tau, help=f"lagged features of the MLP (default: {d.tau})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"MLP epochs (default: {d.epochs})")
    p.add_argument("--rnn-epochs", type=int, default=d.rnn_epochs, help=f"GRU epochs (default: {d.rnn_epochs})")
    p.add_argument("--hidden", type=int, default=d.hidden, help=f"GRU state size (default: {d.hidden})")
    p.add_argument("-T", type=int, default=d.T, dest="T", help=f"series length (default: {d.T})")
    p.add_argument("--n-train", type=int, default=d.n_train, help=f"training examples (default: {d.n_train})")
    p.add_argument("--steps", type=_parse_steps, default=d.steps, metavar="K,K,...",
                   help="k of the k-step predictions (default: 1,4,16,64)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default: {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("-o", "--out", default=d.out, metavar="DIR", help=f"output folder (default: {d.out})")
    p.set_defaults(handler=_cmd_sequence)


def _cmd_sequence(args) -> None:
    cfg = SequenceConfig(T=args.T, tau=args.tau, epochs=args.epochs, rnn_epochs=args.rnn_epochs,
                         hidden=args.hidden, n_train=args.n_train, steps=args.steps, lr=args.lr,
                         seed=args.seed, device=args.device, out=args.out)
    result = run(cfg)
    print(format_table(result))
    print(f"plot: {result['plot']}")
