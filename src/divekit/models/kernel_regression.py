"""Nadaraya–Watson kernel regression, the course's first attention model (d2l 11.2).

Given training pairs ``(x_i, y_i)`` (the keys and values) a query ``x`` is answered by
attention pooling, a weighted average of the values

    f(x) = Σ_i α(x, x_i) y_i,    Σ_i α(x, x_i) = 1,

with three choices of the weights ``α``:

* average pooling, ``α = 1/n``: every query gets the mean of the ``y_i``;
* the non-parametric Gaussian kernel, ``α(x, x_i) = softmax_i(−(x − x_i)² / 2)``: nearby
  keys weigh more;
* the parametric kernel, ``α(x, x_i) = softmax_i(−((x − x_i) w)² / 2)`` with a learnable width
  ``w`` (:class:`NWKernelRegression`), trained by SGD on the squared error, each training point
  queried against the *other* points (leave-one-out, as the course does: with itself among the
  keys, ``w → ∞`` would just copy each ``y_i``).

The toy data is the course's: ``y = 2 sin x + x^0.8 + ε``, ``ε ~ N(0, 0.5²)``, 50 sorted
``x`` uniform in ``[0, 5)``, queries ``0, 0.1, …, 4.9``. :func:`kernel_regression_demo` runs all
three and returns the fits and weights that ``divekit kernel-regression`` draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from divekit.errors import DivekitError


def true_function(x: Tensor) -> Tensor:
    """The course's ``f(x) = 2 sin x + x^0.8``."""
    return 2 * torch.sin(x) + x ** 0.8


@dataclass
class ToyData:
    x_train: Tensor  # (n,) sorted
    y_train: Tensor  # (n,)
    x_test: Tensor  # (m,)
    y_truth: Tensor  # (m,)


# the most training points and epochs: the parametric model's leave-one-out keys and values are
# n × (n − 1) each, with their kernel weights and gradients (1.7 GB and a minute at n = 5000;
# --n-train 1e8 was killed for memory), and each epoch is one full-batch step over them
MAX_N_TRAIN = 2000
MAX_EPOCHS = 10_000


def toy_data(n_train: int = 50, seed: int = 0, noise: float = 0.5) -> ToyData:
    """The course's data: ``n_train`` sorted ``x ~ U[0, 5)``, noisy ``y``, a grid of queries."""
    if isinstance(n_train, bool) or not isinstance(n_train, int) or not 2 <= n_train <= MAX_N_TRAIN:
        raise DivekitError(f"n_train (--n-train) must be 2 to {MAX_N_TRAIN} training points, "
                           f"got {n_train!r}")
    g = torch.Generator().manual_seed(seed)
    x_train, _ = torch.sort(torch.rand(n_train, generator=g) * 5)
    y_train = true_function(x_train) + torch.randn(n_train, generator=g) * noise
    x_test = torch.arange(0, 5, 0.1)
    return ToyData(x_train, y_train, x_test, true_function(x_test))


def gaussian_kernel_weights(queries: Tensor, keys: Tensor, w: Tensor | float = 1.0) -> Tensor:
    """``α(q, k_i) = softmax_i(−((q − k_i) w)² / 2)``: queries ``(Q,)`` and keys ``(K,)`` (or
    keys ``(Q, K)``, one row per query) → weights ``(Q, K)``, each row summing to 1."""
    diff = queries[:, None] - (keys if keys.dim() == 2 else keys[None, :])  # (Q, K)
    return torch.softmax(-((diff * w) ** 2) / 2, dim=1)


def average_pooling(queries: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """``f(x) = (1/n) Σ_i y_i`` for every query; the weights ``(Q, n)`` are all ``1/n``."""
    weights = torch.full((len(queries), len(keys)), 1 / len(keys), dtype=values.dtype)
    return weights @ values, weights


def nadaraya_watson(queries: Tensor, keys: Tensor, values: Tensor,
                    w: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """Gaussian-kernel attention pooling: predictions ``(Q,)`` and weights ``(Q, K)``."""
    weights = gaussian_kernel_weights(queries, keys, w)
    return weights @ values, weights


class NWKernelRegression(nn.Module):
    """The parametric Nadaraya–Watson model: one learnable kernel width ``w``.

    ``forward(queries (Q,), keys (Q, K), values (Q, K)) → (Q,)``; the last call's weights are
    kept in ``attention_weights`` ``(Q, K)``, as the course does for its heat map."""

    def __init__(self, w: float | None = None, seed: int = 0):
        super().__init__()
        if w is None:  # the course's torch.rand((1,))
            w = float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))
        self.w = nn.Parameter(torch.tensor([w]))
        self.attention_weights: Tensor | None = None

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        weights = gaussian_kernel_weights(queries, keys, self.w)  # (Q, K)
        self.attention_weights = weights.detach()
        return (weights * values).sum(dim=1)  # (Q,)


def leave_one_out(x: Tensor) -> Tensor:
    """``(n,) → (n, n−1)``: row i holds every entry but the i-th (the course's
    ``X_tile[(1 - eye).bool()]``)."""
    n = len(x)
    keep = ~torch.eye(n, dtype=torch.bool)
    return x[None, :].expand(n, n)[keep].reshape(n, n - 1)


def fit_parametric(x_train: Tensor, y_train: Tensor, epochs: int = 5, lr: float = 0.5,
                   seed: int = 0) -> tuple[NWKernelRegression, list[float]]:
    """Train ``w`` by full-batch SGD on ``½ Σ (f(x_i) − y_i)²`` with leave-one-out keys (the
    course's recipe: SGD at 0.5, 5 epochs); the losses before training and after each epoch."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DivekitError(f"--epochs must be at least 1, got {epochs!r}")
    model = NWKernelRegression(seed=seed)
    keys, values = leave_one_out(x_train), leave_one_out(y_train)  # (n, n-1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def loss_fn() -> Tensor:
        return ((model(x_train, keys, values) - y_train) ** 2 / 2).sum()

    with torch.no_grad():
        losses = [float(loss_fn())]
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            losses.append(float(loss_fn()))
    return model, losses


@dataclass
class KernelRegressionResult:
    """What :func:`kernel_regression_demo` returns: the data, each method's predictions on the
    queries and weights ``(queries, training points)``, test MSEs against the truth, the
    parametric ``w`` and losses, and (filled by the caller that draws them) files written."""

    data: ToyData
    predictions: dict[str, Tensor]
    weights: dict[str, Tensor]
    test_mse: dict[str, float]
    w: float
    losses: list[float]
    files: list[str] = field(default_factory=list)


def kernel_regression(n_train: int = 50, epochs: int = 5, seed: int = 0) -> KernelRegressionResult:
    """All three attention poolings on the course's toy data."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= MAX_EPOCHS:
        raise DivekitError(f"--epochs must be 1 to {MAX_EPOCHS}, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise DivekitError(f"--seed must be in [0, 2^32), got {seed!r}")
    data = toy_data(n_train, seed)
    q, k, v = data.x_test, data.x_train, data.y_train
    preds, weights = {}, {}
    preds["average"], weights["average"] = average_pooling(q, k, v)
    preds["nonparametric"], weights["nonparametric"] = nadaraya_watson(q, k, v)
    model, losses = fit_parametric(k, v, epochs, seed=seed)
    with torch.no_grad():
        m = len(q)
        preds["parametric"] = model(q, k.expand(m, -1), v.expand(m, -1))
        weights["parametric"] = model.attention_weights
    mse = {name: float(((p - data.y_truth) ** 2).mean()) for name, p in preds.items()}
    return KernelRegressionResult(data, preds, weights, mse, float(model.w.detach()), losses)
