"""Batch normalization from scratch (Ioffe & Szegedy 2015), as the course writes it.

``batch_norm`` is the equation; ``BatchNorm`` holds the learnable scale ``gamma`` and shift
``beta`` and the moving statistics. It follows PyTorch's conventions so that it equals
``nn.BatchNorm1d`` on ``(N, F)`` inputs and ``nn.BatchNorm2d`` on ``(N, C, H, W)`` inputs (outputs
and running statistics alike):

* ``eps = 1e-5``;
* ``momentum = 0.1`` weighs the *new* batch: ``moving = (1 - momentum) * moving + momentum * batch``;
* the batch is normalised with its biased variance, but the moving variance is fed the unbiased
  one (``n / (n - 1)`` times larger, ``n`` the number of values per channel).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_LAYOUT = {2: "(N, F) for fully connected layers", 4: "(N, C, H, W) for convolutions"}


def batch_norm(
    X: Tensor,
    gamma: Tensor,
    beta: Tensor,
    moving_mean: Tensor,
    moving_var: Tensor,
    eps: float,
    momentum: float,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise ``X`` per feature (2-D) or per channel (4-D); return ``(Y, moving_mean, moving_var)``.

    ``gamma``, ``beta`` and the moving statistics broadcast against ``X``: shape ``(1, F)`` or
    ``(1, C, 1, 1)``. The returned moving statistics are updated (training) or unchanged (eval).
    """
    if X.ndim not in _LAYOUT:
        raise ValueError(f"batch_norm expects a 2-D (N, F) or 4-D (N, C, H, W) input, got shape "
                         f"{tuple(X.shape)}")
    if not training:
        # Prediction: use the moving averages gathered during training.
        #   X_hat = (X - moving_mean) / sqrt(moving_var + eps)
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        # Training: statistics of the minibatch B, per feature / per channel.
        #   mu_B = 1/|B| sum_x x,   sigma_B^2 = 1/|B| sum_x (x - mu_B)^2
        dims = (0,) if X.ndim == 2 else (0, 2, 3)
        n = X.numel() // X.shape[1]  # values per channel
        if n < 2:
            raise ValueError(f"batch_norm in training needs more than 1 value per channel, got "
                             f"input shape {tuple(X.shape)}")
        mean = X.mean(dim=dims, keepdim=True)
        var = ((X - mean) ** 2).mean(dim=dims, keepdim=True)
        #   X_hat = (x - mu_B) / sqrt(sigma_B^2 + eps)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        with torch.no_grad():
            # Moving averages; like PyTorch the variance fed in is the unbiased one.
            moving_mean = (1.0 - momentum) * moving_mean + momentum * mean
            moving_var = (1.0 - momentum) * moving_var + momentum * var * (n / (n - 1))
    #   BN(x) = gamma * X_hat + beta
    Y = gamma * X_hat + beta
    return Y, moving_mean, moving_var


class BatchNorm(nn.Module):
    """Batch normalization for ``num_dims = 2`` (``(N, F)``) or ``4`` (``(N, C, H, W)``) inputs.

    ``gamma`` (scale, ones) and ``beta`` (shift, zeros) are parameters; ``moving_mean`` (zeros)
    and ``moving_var`` (ones) are buffers, so they move with ``.to(device)`` and are saved in
    the state dict. Shapes are ``(1, F)`` or ``(1, C, 1, 1)`` as in the course.
    """

    def __init__(self, num_features: int, num_dims: int, *, eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__()
        if num_dims not in _LAYOUT:
            raise ValueError(f"num_dims must be 2 {_LAYOUT[2]} or 4 {_LAYOUT[4]}, got {num_dims}")
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.num_features, self.num_dims, self.eps, self.momentum = (
            num_features, num_dims, eps, momentum)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.register_buffer("moving_mean", torch.zeros(shape))
        self.register_buffer("moving_var", torch.ones(shape))

    def forward(self, X: Tensor) -> Tensor:
        if X.ndim != self.num_dims or X.shape[1] != self.num_features:
            expected = _LAYOUT[self.num_dims].split(" for ")[0]
            raise ValueError(
                f"BatchNorm({self.num_features}, num_dims={self.num_dims}) expects input {expected} "
                f"with {self.num_features} features/channels, got shape {tuple(X.shape)}"
            )
        Y, moving_mean, moving_var = batch_norm(
            X, self.gamma, self.beta, self.moving_mean, self.moving_var,
            eps=self.eps, momentum=self.momentum, training=self.training,
        )
        if self.training:
            self.moving_mean.copy_(moving_mean)
            self.moving_var.copy_(moving_var)
        return Y

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_dims={self.num_dims}, eps={self.eps}, momentum={self.momentum}"
