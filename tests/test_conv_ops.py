"""Transposed convolution, the matrix view of convolution and the bilinear kernel (d2l 14.10)."""

import pytest
import torch
import torch.nn.functional as F

from divekit.errors import DivekitError
from divekit.ops.conv import bilinear_kernel, conv_matrix, trans_conv


def test_course_example():
    """The course's 2x2 input and kernel: Y = [[0, 0, 1], [0, 4, 6], [4, 12, 9]]."""
    X = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    K = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert torch.equal(trans_conv(X, K), torch.tensor([[0.0, 0, 1], [0, 4, 6], [4, 12, 9]]))
    # padding 1 removes the first and last row and column; stride 2 spreads the copies apart
    assert torch.equal(trans_conv(X, K, padding=1), torch.tensor([[4.0]]))
    assert trans_conv(X, K, stride=2).shape == (4, 4)


@pytest.mark.parametrize("seed", range(12))
def test_trans_conv_matches_pytorch(seed):
    """Random sizes, paddings, strides and channels: equal to F.conv_transpose2d within 1e-5."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    n, c_in, c_out = draw(1, 3), draw(1, 4), draw(1, 4)
    H, W, h, w, stride = draw(1, 7), draw(1, 7), draw(1, 5), draw(1, 5), draw(1, 3)
    full = min((H - 1) * stride + h, (W - 1) * stride + w)
    padding = draw(0, (full - 1) // 2)
    X = torch.randn(n, c_in, H, W, generator=g)
    K = torch.randn(c_in, c_out, h, w, generator=g)
    want = F.conv_transpose2d(X, K, stride=stride, padding=padding)
    got = trans_conv(X, K, stride=stride, padding=padding)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_trans_conv_unbatched_shapes():
    X, K = torch.randn(2, 3, 3), torch.randn(2, 5, 2, 2)
    assert trans_conv(X, K).shape == (5, 4, 4)
    torch.testing.assert_close(trans_conv(X, K), F.conv_transpose2d(X[None], K)[0])


@pytest.mark.parametrize("seed", range(8))
def test_conv_matrix_is_convolution_and_its_transpose(seed):
    """V @ x == conv2d(x, K); V.T @ y == conv_transpose2d(y, K) back to the input's shape."""
    g = torch.Generator().manual_seed(100 + seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    c_in, c_out, H, W = draw(1, 3), draw(1, 3), draw(3, 8), draw(3, 8)
    h, w, stride = draw(1, 3), draw(1, 3), draw(1, 3)
    padding = draw(0, min(h, w) - 1)
    K = torch.randn(c_out, c_in, h, w, generator=g, dtype=torch.float64)
    x = torch.randn(c_in, H, W, generator=g, dtype=torch.float64)
    V = conv_matrix(K, (c_in, H, W), stride=stride, padding=padding)
    y = F.conv2d(x[None], K, stride=stride, padding=padding)[0]  # (C_out, Ho, Wo)
    torch.testing.assert_close(V @ x.flatten(), y.flatten())
    z = torch.randn(y.shape, generator=g, dtype=torch.float64)
    Ho, Wo = y.shape[-2:]
    pad_out = (H - ((Ho - 1) * stride - 2 * padding + h), W - ((Wo - 1) * stride - 2 * padding + w))
    back = F.conv_transpose2d(z[None], K, stride=stride, padding=padding, output_padding=pad_out)[0]
    torch.testing.assert_close(V.T @ z.flatten(), back.flatten())


def test_conv_matrix_course_example():
    """The course's kernel2matrix: a 2x2 kernel on a 3x3 input gives a 4x9 matrix."""
    K = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    want = torch.tensor([
        [1, 2, 0, 3, 4, 0, 0, 0, 0],
        [0, 1, 2, 0, 3, 4, 0, 0, 0],
        [0, 0, 0, 1, 2, 0, 3, 4, 0],
        [0, 0, 0, 0, 1, 2, 0, 3, 4],
    ], dtype=torch.float32)
    assert torch.equal(conv_matrix(K, (3, 3)), want)


@pytest.mark.parametrize("scale", [2, 4, 32])
def test_bilinear_transposed_conv_is_bilinear_upsampling(scale):
    """kernel 2s, stride s, padding s/2 with the bilinear kernel == F.interpolate on the interior."""
    torch.manual_seed(scale)
    c = 3
    x = torch.rand(2, c, 5, 6)
    w = bilinear_kernel(c, c, 2 * scale)
    up = F.conv_transpose2d(x, w, stride=scale, padding=scale // 2)
    ref = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    assert up.shape == ref.shape
    m = scale  # the outermost input pixel's reach: there interpolate clamps, the conv fades out
    torch.testing.assert_close(up[..., m:-m, m:-m], ref[..., m:-m, m:-m], atol=1e-4, rtol=0)
    # the scratch transposed convolution agrees too
    torch.testing.assert_close(trans_conv(x, w, stride=scale, padding=scale // 2), up,
                               atol=1e-5, rtol=1e-5)


def test_bilinear_kernel_course_values():
    """k = 4: factor 2, centre 1.5, rows (0.25, 0.75, 0.75, 0.25); channels stay apart."""
    w = bilinear_kernel(2, 2, 4)
    line = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(w[0, 0], line[:, None] * line[None, :])
    assert w[0, 1].abs().sum() == 0 and w[1, 0].abs().sum() == 0


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(DivekitError, match="stride"):
        trans_conv(torch.ones(2, 2), torch.ones(2, 2), stride=0)
    with pytest.raises(DivekitError, match="input channels"):
        trans_conv(torch.ones(3, 2, 2), torch.ones(2, 1, 2, 2))
    with pytest.raises(DivekitError, match="larger than the padded input"):
        conv_matrix(torch.ones(5, 5), (3, 3))
    with pytest.raises(DivekitError, match="must equal out_channels"):
        bilinear_kernel(2, 3, 4)
