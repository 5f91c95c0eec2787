"""Models of a time series, the course's section "Working with Sequences".

Two ways to predict ``x_t`` from the past of a series:

* **autoregression** under the Markov assumption, :func:`mlp`: ``x̂_t = f(x_{t-τ}, ...,
  x_{t-1})``, an MLP on the ``τ`` last values only;
* **a latent-variable model**, :class:`LatentRNN`: ``h_t = g(h_{t-1}, x_{t-1})``,
  ``x̂_t = W h_t + b`` (``g`` a GRU), whose state summarises the whole past rather than the last
  ``τ`` values.

The experiment that trains and compares them (k-step-ahead predictions, their errors) is
:mod:`divekit.tasks.sequence`.
"""

from __future__ import annotations

from torch import Tensor, nn


def mlp(tau: int) -> nn.Module:
    """The course's autoregressive model: ``Linear(τ, 10) → ReLU → Linear(10, 1)``."""
    return nn.Sequential(nn.Linear(tau, 10), nn.ReLU(), nn.Linear(10, 1))


class LatentRNN(nn.Module):
    """``h_t = GRU(h_{t-1}, x_{t-1})``, ``x̂_t = W h_t + b``. Input ``(B, L)`` → predictions
    ``(B, L)`` and the GRU's last state; ``rnn`` and ``head`` are used one step at a time for
    k-step predictions (:func:`divekit.tasks.sequence.rnn_k_step`)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.rnn = nn.GRU(1, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out, state = self.rnn(x.T.unsqueeze(-1), state)  # (L, B, H)
        return self.head(out).squeeze(-1).T, state  # (B, L)
