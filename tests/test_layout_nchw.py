"""Layers that stay NCHW inside a channels_last model on the CPU (divekit.models.layout).

The wide ResNet blocks and the FCN's upsampling keep contiguous weights through
``model.to(memory_format=torch.channels_last)``; the numbers must not change: forward,
gradients and several fused-SGD steps agree with plain NCHW torch code within float
reordering, and the optimizer's state always shares its weight's layout (the fused kernels
read them as flat buffers)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divekit.models import create_model
from divekit.models.fcn import Upsampling
from divekit.models.layout import nchw_strides
from divekit.models.resnet import Residual
from divekit.tasks.segment import pixel_classes

CL = torch.channels_last


def is_nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def layouts(model: nn.Module) -> dict[str, bool]:
    """Which 4-D weights are stored NHWC (those whose layouts differ: more than one input
    channel and more than a 1x1 kernel)."""
    return {n: is_nhwc(p) for n, p in model.named_parameters()
            if p.dim() == 4 and p.shape[1] > 1 and p[0, 0].numel() > 1}


def test_resnet18_keeps_its_512_channel_stage_nchw():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=1).to(memory_format=CL)
    nhwc = layouts(model)
    assert nhwc and all(not v for n, v in nhwc.items() if n.startswith("features.b5."))
    assert all(v for n, v in nhwc.items() if not n.startswith(("features.b5.", "head")))
    assert [m.keeps_nchw for m in model.modules() if isinstance(m, Residual)] == [False] * 6 + [True] * 2
    # the 1x1 shortcut too, by its strides (is_contiguous() cannot tell 1x1 layouts apart)
    shortcut = model.features.b5[0].conv3.weight
    assert shortcut.stride() == nchw_strides(shortcut) == (256, 1, 1, 1)


def reference_resnet_block(block: Residual, x: torch.Tensor) -> torch.Tensor:
    """The basic block written with torch.nn.functional on NCHW tensors (the paper's formula)."""
    def bn(m: nn.BatchNorm2d, y: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(y, m.running_mean.clone(), m.running_var.clone(), m.weight, m.bias,
                            training=True, momentum=0.0, eps=m.eps)

    c1, c2, c3 = block.conv1, block.conv2, block.conv3
    y = F.relu(bn(block.bn1, F.conv2d(x, c1.weight, None, c1.stride, c1.padding)))
    y = bn(block.bn2, F.conv2d(y, c2.weight, None, c2.stride, c2.padding))
    short = x if c3 is None else F.conv2d(x, c3.weight, c3.bias, c3.stride)
    return F.relu(y + short)


@pytest.mark.parametrize("in_ch,ch,stride", [(256, 512, 2), (512, 512, 1), (64, 128, 2)])
def test_residual_block_in_a_channels_last_model_equals_the_nchw_formula(in_ch, ch, stride):
    torch.manual_seed(0)
    block = Residual(in_ch, ch, use_1x1conv=stride != 1 or in_ch != ch, strides=stride)
    ref = copy.deepcopy(block)
    block.to(memory_format=CL)
    x = torch.randn(4, in_ch, 6, 6)
    x_cl = x.contiguous(memory_format=CL).requires_grad_()
    x_ref = x.clone().requires_grad_()
    out = block(x_cl)
    expected = reference_resnet_block(ref, x_ref)
    assert is_nhwc(out) == (not block.keeps_nchw)  # the wide block hands NCHW on
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    torch.testing.assert_close(x_cl.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
        assert p.grad.stride() == p.stride(), name  # gradients share their weight's layout


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, *,
                fused: bool, loss_fn) -> nn.Module:
    """``steps`` SGD steps with momentum; BatchNorm on its running statistics (``eval``): in
    training mode a batch of a few images amplifies float reordering step after step (NHWC
    throughout as much), which would hide what is checked here, the layouts' bookkeeping."""
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-3,
                          fused=fused, foreach=None if fused else False)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    for p in model.parameters():  # every state tensor laid out as its weight
        buf = opt.state[p].get("momentum_buffer")
        assert buf is None or buf.stride() == p.stride()
    return model


def test_resnet18_channels_last_trains_as_the_nchw_model_with_fused_sgd():
    """Three steps of fused SGD with momentum: the channels_last model (stage b5 NCHW) against
    the same weights in NCHW with the per-parameter SGD loop."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=1)
    ref = copy.deepcopy(model)
    x, y = torch.rand(6, 1, 32, 32), torch.randint(0, 10, (6,))
    ours = train_steps(model.to(memory_format=CL), x.contiguous(memory_format=CL), y, 3,
                       fused=True, loss_fn=F.cross_entropy)
    theirs = train_steps(ref, x, y, 3, fused=False, loss_fn=F.cross_entropy)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_upsampling_keeps_nchw_and_equals_torch_conv_transpose():
    torch.manual_seed(0)
    up = Upsampling(5, 5, kernel_size=16, padding=4, stride=8)
    ref = nn.ConvTranspose2d(5, 5, kernel_size=16, padding=4, stride=8)
    ref.load_state_dict(up.state_dict())  # the same parameters and state_dict keys
    up.to(memory_format=CL)
    assert up.weight.is_contiguous() and isinstance(up.weight, nn.Parameter)
    x = torch.randn(2, 5, 3, 4)
    out = up(x.contiguous(memory_format=CL))
    assert out.is_contiguous() and out.shape == (2, 5, 24, 32)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)


def test_fcn_channels_last_trains_as_the_nchw_model():
    """The FCN in channels_last (ResNet-18 body NHWC but its last stage, upsampling NCHW)
    against plain NCHW torch: its body, then ``nn.Conv2d`` and ``nn.ConvTranspose2d`` holding
    the same weights, 2 steps of SGD with momentum (fused against the per-parameter loop)."""
    torch.manual_seed(0)
    fcn = create_model("fcn_resnet18", num_classes=4, backbone="resnet18")
    final, tconv = fcn.head.final_conv, fcn.head.transpose_conv
    plain_tconv = nn.ConvTranspose2d(4, 4, tconv.kernel_size, tconv.stride, tconv.padding)
    plain_tconv.load_state_dict(tconv.state_dict())
    ref = nn.Sequential(copy.deepcopy(fcn.features), copy.deepcopy(final), plain_tconv)
    fcn.to(memory_format=CL)
    assert not is_nhwc(fcn.head.transpose_conv.weight)
    assert is_nhwc(fcn.features.b2[0].conv1.weight)
    x, y = torch.rand(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    logits = fcn(x.contiguous(memory_format=CL))
    assert logits.is_contiguous()  # the scores reach the loss in NCHW: no copy for log_softmax
    torch.testing.assert_close(logits, ref(x), rtol=1e-4, atol=1e-4)
    ours = train_steps(fcn, x.contiguous(memory_format=CL), y, 2, fused=True,
                       loss_fn=F.cross_entropy)
    theirs = train_steps(ref, x, y, 2, fused=False, loss_fn=F.cross_entropy)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_layers_follow_the_model_on_cuda_semantics_without_a_gpu():
    """Off the CPU nothing is kept NCHW: the rule is the CPU's (checked on the meta device)."""
    with torch.device("meta"):
        block = Residual(512, 512)
    block.to(memory_format=CL)
    assert is_nhwc(block.conv1.weight)
    x = torch.empty(2, 512, 3, 3, device="meta").contiguous(memory_format=CL)
    assert block.nchw_input(x) is x


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_pixel_classes_equals_argmax_ties_included(fmt):
    torch.manual_seed(0)
    scores = torch.randn(3, 7, 9, 11)
    scores[:, 4] = scores[:, 2]  # ties: the first maximum wins, as argmax's
    scores[0, :, 0, 0] = 1.0
    scores = scores.contiguous(memory_format=fmt).requires_grad_()
    assert torch.equal(pixel_classes(scores), scores.detach().argmax(1))
    assert int(pixel_classes(scores)[0, 0, 0]) == 0


def test_d2l_compat_moves_optimizer_state_to_each_weights_layout():
    """compat's channels_last switch lays each momentum buffer out as its weight now is, the
    FCN upsampling's NCHW one included, so that fused SGD reads them in the same order."""
    from divekit.compat.d2l._train import _to_channels_last

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Upsampling(4, 4, 4, padding=1, stride=2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)
    F.mse_loss(net(torch.randn(2, 3, 5, 5)), torch.zeros(2, 4, 10, 10)).backward()
    opt.step()
    assert _to_channels_last(net, "cpu", opt)
    assert is_nhwc(net[0].weight) and not is_nhwc(net[1].weight)
    for p in net.parameters():
        assert opt.state[p]["momentum_buffer"].stride() == p.stride()
