"""RoI max pooling (d2l 14.8): the course's example, and exact parity with torchvision."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from divekit.errors import DivekitError
from divekit.ops.roi import roi_pool


def random_rois(
    k: int, n: int, height: int, width: int, scale: float, g: torch.Generator
) -> torch.Tensor:
    """``(k, 5)`` regions in image coordinates; some reach past the feature map's edges."""
    size = torch.tensor([width, height]) / scale
    xy = torch.rand(k, 2, generator=g) * size * 1.4 - 0.2 * size
    wh = torch.rand(k, 2, generator=g) * size * 0.8
    index = torch.randint(0, n, (k, 1), generator=g).float()
    return torch.cat((index, xy, xy + wh), dim=1)


def test_the_course_example():
    X = torch.arange(16.0).reshape(1, 1, 4, 4)
    rois = torch.tensor([[0, 0, 0, 20, 20], [0, 0, 10, 30, 30]], dtype=torch.float32)
    out = roi_pool(X, rois, output_size=(2, 2), spatial_scale=0.1)
    assert out.tolist() == [[[[5.0, 6.0], [9.0, 10.0]]], [[[9.0, 11.0], [13.0, 15.0]]]]
    assert torch.equal(
        out, torchvision.ops.roi_pool(X, rois, output_size=(2, 2), spatial_scale=0.1)
    )


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    height=st.integers(1, 16),
    width=st.integers(1, 16),
    k=st.integers(0, 9),
    output_size=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    scale=st.sampled_from([1.0, 0.5, 0.25, 1 / 16, 0.3, 2.0]),
    double=st.booleans(),
)
def test_equals_torchvision(seed, height, width, k, output_size, scale, double):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    x = torch.randn(2, 3, height, width, generator=g, dtype=dtype)
    rois = random_rois(k, 2, height, width, scale, g).to(dtype)
    expected = torchvision.ops.roi_pool(x, rois, output_size, scale)
    assert torch.equal(roi_pool(x, rois, output_size, scale), expected)


def test_list_of_boxes_per_image_equals_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 12, 10, generator=g)
    boxes = [random_rois(k, 1, 24, 20, 1.0, g)[:, 1:] for k in (2, 0, 5)]
    expected = torchvision.ops.roi_pool(x, boxes, 3, 0.5)
    assert torch.equal(roi_pool(x, boxes, 3, spatial_scale=0.5), expected)


def test_coordinates_round_half_away_from_zero_like_c():
    # torch.round sends 2.5 to 2; the kernel's C round sends it to 3.
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    rois = torch.tensor(
        [[0, 2.5, 0.5, 5.5, 6.5], [0, -0.5, 1.5, 3.5, 4.5], [0, 0.49999997, 0, 7.5, 7.5]]
    )
    assert torch.equal(roi_pool(x, rois, (3, 2)), torchvision.ops.roi_pool(x, rois, (3, 2)))


def test_cells_outside_the_map_are_zero_and_nan_is_skipped():
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    x[0, 0, 1, 1] = float("nan")
    x[0, 0, 2, 2] = float("-inf")
    rois = torch.tensor([[0, 10.0, 10, 20, 20], [0, 0, 0, 3, 3], [0, 2, 2, 2, 2], [0, 3, 3, 9, 9]])
    out = roi_pool(x, rois, 2)
    assert (out[0] == 0).all()  # wholly outside: every cell is empty
    assert torch.equal(out, torchvision.ops.roi_pool(x, rois, 2))


def test_gradients_reach_the_maxima_as_in_torchvision():
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    rois = random_rois(6, 2, 9, 9, 1.0, g).double()
    weights = torch.randn(6, 3, 2, 3, generator=g, dtype=torch.float64)
    (roi_pool(x1, rois, (2, 3)) * weights).sum().backward()
    (torchvision.ops.roi_pool(x2, rois, (2, 3)) * weights).sum().backward()
    assert torch.allclose(x1.grad, x2.grad)


def test_no_regions_gives_an_empty_result():
    out = roi_pool(torch.randn(1, 3, 4, 4), torch.zeros(0, 5), (2, 2))
    assert out.shape == (0, 3, 2, 2)


def test_bad_regions_are_named():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(DivekitError, match=r"boxes\[1\] has batch index 2"):
        roi_pool(x, torch.tensor([[0, 0, 0, 1, 1], [2, 0, 0, 1, 1.0]]), 2)
    with pytest.raises(DivekitError, match=r"boxes\[0\] .*x2 < x1"):
        roi_pool(x, torch.tensor([[0, 3, 0, 1, 1.0]]), 2)
    with pytest.raises(DivekitError, match=r"boxes\[0\] .*NaN"):
        roi_pool(x, torch.tensor([[1, 0, float("nan"), 1, 1]]), 2)
    with pytest.raises(DivekitError, match="empty list"):
        roi_pool(x, [], 2)
    with pytest.raises(DivekitError, match=r"boxes\[1\] must have shape"):
        roi_pool(x, [torch.zeros(1, 4), torch.zeros(4)], 2)
    with pytest.raises(DivekitError, match="output_size"):
        roi_pool(x, torch.zeros(1, 5), (0, 2))
    with pytest.raises(DivekitError, match="spatial_scale"):
        roi_pool(x, torch.zeros(1, 5), 2, spatial_scale=0)
