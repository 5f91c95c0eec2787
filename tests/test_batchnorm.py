"""The course's batch normalization from scratch equals PyTorch's nn.BatchNorm1d / nn.BatchNorm2d."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from divekit.models.batchnorm import BatchNorm, batch_norm

TOL = dict(atol=1e-5, rtol=1e-5)

CASES = {
    "fully connected (N, F)": (2, (16, 5), nn.BatchNorm1d),
    "convolution (N, C, H, W)": (4, (4, 3, 5, 6), nn.BatchNorm2d),
}


def _pair(num_dims: int, shape: tuple[int, ...], reference: type[nn.Module], seed: int):
    """Our BatchNorm and PyTorch's with the same random gamma and beta."""
    torch.manual_seed(seed)
    ours, ref = BatchNorm(shape[1], num_dims=num_dims), reference(shape[1])
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.normal_()
        ours.gamma.copy_(ref.weight.view_as(ours.gamma))
        ours.beta.copy_(ref.bias.view_as(ours.beta))
    return ours, ref


def _batch(shape: tuple[int, ...]) -> torch.Tensor:
    # Features with their own offsets and scales, so the statistics matter.
    per_feature = (1, shape[1]) + (1,) * (len(shape) - 2)
    return torch.randn(shape) * torch.rand(per_feature).mul(3).add(0.5) + torch.randn(per_feature) * 2


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_training_and_eval_match_pytorch_batchnorm(case, seed):
    num_dims, shape, reference = CASES[case]
    ours, ref = _pair(num_dims, shape, reference, seed)
    for _ in range(4):  # training steps: outputs and moving statistics agree after each
        x = _batch(shape)
        torch.testing.assert_close(ours(x), ref(x), **TOL)
        torch.testing.assert_close(ours.moving_mean.flatten(), ref.running_mean, **TOL)
        torch.testing.assert_close(ours.moving_var.flatten(), ref.running_var, **TOL)
    ours.eval(), ref.eval()
    x = _batch(shape)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    before = ours.moving_mean.clone()
    ours(x)
    assert torch.equal(ours.moving_mean, before), "eval must not update the moving statistics"


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_pytorch_batchnorm(case):
    num_dims, shape, reference = CASES[case]
    ours, ref = _pair(num_dims, shape, reference, seed=2)
    x = _batch(shape)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(shape)
    (ours(x1) * weights).sum().backward()
    (ref(x2) * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    torch.testing.assert_close(ours.gamma.grad.flatten(), ref.weight.grad, **TOL)
    torch.testing.assert_close(ours.beta.grad.flatten(), ref.bias.grad, **TOL)


def test_moving_statistics_are_buffers_that_move_with_the_module():
    bn = BatchNorm(3, num_dims=4).to(torch.float64)
    assert {"moving_mean", "moving_var", "gamma", "beta"} <= set(bn.state_dict())
    assert [name for name, _ in bn.named_parameters()] == ["gamma", "beta"]
    assert bn.moving_var.dtype == torch.float64 and bn.moving_var.shape == (1, 3, 1, 1)
    bn(torch.randn(2, 3, 4, 4, dtype=torch.float64))


def test_the_functional_form_leaves_statistics_alone_in_eval():
    x = torch.randn(8, 4)
    mean, var = torch.zeros(1, 4), torch.ones(1, 4)
    y, new_mean, new_var = batch_norm(x, torch.ones(1, 4), torch.zeros(1, 4), mean, var,
                                      eps=1e-5, momentum=0.1, training=False)
    torch.testing.assert_close(y, x / (1 + 1e-5) ** 0.5)
    assert new_mean is mean and new_var is var


@pytest.mark.parametrize(
    "num_dims, shape, needle",
    [
        (4, (2, 3), r"\(N, C, H, W\)"),
        (2, (2, 3, 4, 4), r"\(N, F\)"),
        (4, (2, 5, 4, 4), "got shape"),  # wrong channel count
    ],
)
def test_input_of_the_wrong_shape_is_refused(num_dims, shape, needle):
    with pytest.raises(ValueError, match=needle):
        BatchNorm(3, num_dims=num_dims)(torch.randn(shape))


def test_bad_construction_and_tiny_batches_are_refused():
    with pytest.raises(ValueError, match="num_dims must be 2"):
        BatchNorm(3, num_dims=3)
    with pytest.raises(ValueError, match="2-D .* or 4-D"):
        batch_norm(torch.randn(2, 3, 4), *(torch.ones(1, 3, 1),) * 4, eps=1e-5, momentum=0.1,
                   training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm(3, num_dims=2)(torch.randn(1, 3))  # as nn.BatchNorm1d refuses
