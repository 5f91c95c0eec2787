"""Augmentation: boxes and masks move with the pixels; mixup/cutmix targets; presets; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from divekit.cli import main
from divekit.data.augment import (
    OPS,
    PRESETS,
    Augment,
    BatchMix,
    cutmix,
    mixup,
    mosaic,
)
from divekit.errors import DivekitError


def _scene(c: int = 3, h: int = 31, w: int = 45, box=(6, 5, 20, 17)):
    """A black image with one white rectangle, its corner box and its mask."""
    x1, y1, x2, y2 = box
    image = torch.zeros(c, h, w)
    image[:, y1:y2, x1:x2] = 1.0
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[y1:y2, x1:x2] = 1
    return image, torch.tensor([list(map(float, box))]), mask


def _bbox_of(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_a_horizontally_flipped_image_has_its_box_mirrored_exactly():
    image, boxes, mask = _scene()
    w = image.shape[-1]
    out = Augment("hflip:1")(image, boxes=boxes, masks=mask)
    x1, y1, x2, y2 = boxes[0].tolist()
    assert out.boxes.tolist() == [[w - x2, y1, w - x1, y2]]  # x' = W - x, corners swap
    assert torch.equal(out.image, image.flip(-1))
    assert torch.equal(out.masks, mask.flip(-1))
    assert torch.equal(_bbox_of(out.masks), out.boxes[0])


def test_a_crop_moves_and_clips_boxes_and_masks_consistently_with_the_pixels():
    torch.manual_seed(0)
    aug = Augment("crop:0.3-0.6")
    checked = clipped = 0
    for _ in range(40):
        image, boxes, mask = _scene(1, 40, 52, box=(10, 8, 38, 30))
        out = aug(image, boxes=boxes, masks=mask)
        h, w = out.image.shape[-2:]
        assert (h, w) == (40, 52)  # RandomResizedCrop back to the input's size
        b = out.boxes[0]
        assert (b[0::2] >= 0).all() and (b[0::2] <= w).all() and (b[1::2] <= h).all()
        if out.masks.sum() == 0:
            assert (b[2] - b[0]) * (b[3] - b[1]) < 4  # the object left the crop: box collapsed
            continue
        # the mask (nearest) and the pixels (bilinear) agree away from the blurred edge
        m = out.masks.bool()
        assert m[out.image[0] > 0.99].all() and not m[out.image[0] < 0.01].any()
        # the box is the mask's bounding box, up to one resampled pixel
        assert torch.allclose(b, _bbox_of(out.masks), atol=1.5), (b, _bbox_of(out.masks))
        checked += 1
        clipped += bool(b[0] == 0 or b[1] == 0 or b[2] == w or b[3] == h)
    assert checked >= 20 and clipped >= 5  # both moved and clipped boxes were seen


def test_rotation_gives_the_enclosing_axis_aligned_box():
    torch.manual_seed(1)
    image, boxes, mask = _scene(1, 41, 41, box=(14, 14, 27, 27))
    out = Augment("rotate:30")(image, boxes=boxes, masks=mask)
    assert (out.boxes[0] - _bbox_of(out.masks)).abs().max() <= 2.0
    side = (out.boxes[0, 2] - out.boxes[0, 0]).item()
    assert 13 - 1e-4 <= side <= 13 * 2**0.5 + 1e-4  # the enclosing box only grows


def test_boxes_leaving_the_image_are_dropped_with_their_labels():
    image, _, _ = _scene(3, 20, 20)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 15.0, 15.0]])
    torch.manual_seed(0)
    out = Augment("hflip:1")(image, boxes=boxes, labels=torch.tensor([1, 2]))
    assert out.labels.tolist() == [1, 2] and out.boxes.shape == (2, 4)
    gone = Augment("none")(image, boxes=torch.tensor([[3.0, 3.0, 3.0, 9.0]]), labels=torch.tensor([4]))
    assert gone.boxes.shape == (0, 4) and gone.labels.numel() == 0


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_preset_runs_on_odd_sized_images(preset, channels):
    torch.manual_seed(0)
    for h, w in ((9, 13), (17, 23), (33, 7)):
        image = torch.rand(channels, h, w)
        out = Augment(preset)(image)
        assert out.shape == (channels, h, w) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        s = Augment(preset)(image, boxes=torch.tensor([[1.0, 1.0, 5.0, 5.0]]),
                            masks=torch.zeros(h, w, dtype=torch.uint8))
        assert s.image.shape == (channels, h, w) and s.masks.shape == (h, w)


def test_every_operation_runs_at_its_defaults():
    torch.manual_seed(0)
    for name in OPS:
        assert Augment(name)(torch.rand(3, 15, 19)).shape == (3, 15, 19), name


def test_test_transforms_are_deterministic_and_never_augment():
    image = torch.rand(3, 21, 27)
    for spec in (*PRESETS, "hflip:1,crop:0.2-0.4,jitter:0.9"):
        test = Augment(spec, train=False)
        assert torch.equal(test(image), image) and torch.equal(test(image), test(image))
    assert not torch.equal(Augment("hflip:1")(image), image)  # while training it does augment


@pytest.mark.parametrize("spec, needle", [
    ("sparkle", "choose presets none, flip, standard, strong or operations hflip"),
    ("crop:0.5", "range like 0.5-1"),
    ("crop:0.9-0.2", "low > high"),
    ("hflip:1.5", "p must be in [0, 1]"),
    ("posterize:2.5", "must be an integer"),
    ("jitter:a", "must be a number"),
    ("hflip:0.5:0.5", "at most 1 parameter"),
    ("mixup", "--mixup ALPHA"),
])
def test_bad_specs_say_what_is_valid(spec, needle):
    with pytest.raises(DivekitError, match=None) as e:
        Augment(spec)
    assert needle in str(e.value)


def test_mosaic_tiles_four_images_and_carries_boxes_and_masks():
    images = [torch.full((3, 20, 30), float(k + 1) / 4) for k in range(4)]
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 20.0]]) for _ in range(4)]  # each whole image
    masks = [torch.full((20, 30), k + 1, dtype=torch.uint8) for k in range(4)]
    out = mosaic(images, boxes, masks, [torch.tensor([k]) for k in range(4)], size=(40, 60),
                 center=(0.25, 0.75))
    cx, cy = 15, 30
    expected = [[0, 0, cx, cy], [cx, 0, 60, cy], [0, cy, cx, 40], [cx, cy, 60, 40]]
    assert out.boxes.tolist() == expected and out.labels.tolist() == [0, 1, 2, 3]
    for k, (x1, y1, x2, y2) in enumerate(expected):
        assert torch.allclose(out.image[:, y1:y2, x1:x2], torch.tensor((k + 1) / 4))
        assert (out.masks[y1:y2, x1:x2] == k + 1).all()


def test_mixup_targets_sum_to_one_and_mix_the_pixels_with_the_same_weight():
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 5, (16,))
    mixed, targets, lam = mixup(x, y, 5, alpha=0.4)
    assert torch.allclose(targets.sum(1), torch.ones(16))
    # each mixed image is λ x_i + (1 - λ) x_j for the j whose label carries weight 1 - λ
    for i in range(16):
        js = [j for j in range(16) if torch.allclose(mixed[i], lam * x[i] + (1 - lam) * x[j], atol=1e-6)]
        assert js, i
        expected = lam * torch.eye(5)[y[i]] + (1 - lam) * torch.eye(5)[y[js[0]]]
        assert torch.allclose(targets[i], expected, atol=1e-6)


def test_the_mixing_weight_follows_beta_alpha_alpha():
    torch.manual_seed(123)
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])
    for alpha in (0.2, 1.0):
        lams = [mixup(x, y, 2, alpha=alpha)[2] for _ in range(1500)]
        assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 0.01
        assert stats.kstest(lams, stats.beta(4 * alpha, 4 * alpha).cdf).pvalue < 1e-6  # it can tell


def test_cutmix_weight_is_the_fraction_of_pixels_kept():
    torch.manual_seed(0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 10, 12).clone()
    y = torch.arange(4)
    for _ in range(20):
        mixed, targets, lam = cutmix(x, y, 4, alpha=1.0)
        assert torch.allclose(targets.sum(1), torch.ones(4))
        for i in range(4):
            kept = (mixed[i] == x[i]).float().mean().item()
            if targets[i].max() < 1:  # a different image was pasted in
                assert targets[i, i].item() == pytest.approx(kept, abs=1e-6)


def test_batch_mix_refuses_negative_alpha_and_the_loss_takes_soft_targets(tmp_path):
    with pytest.raises(DivekitError, match="--mixup"):
        BatchMix(10, mixup_alpha=-1)
    from divekit.tasks import classify, train

    result = train(classify.ClassifyConfig(
        model="lenet_bn", data="digits", epochs=2, limit=160, batch_size=32, lr=0.1,
        augment="crop:0.7-1,jitter:0.3", mixup=0.4, cutmix=1.0, quiet=True, device="cpu",
        out=str(tmp_path / "mix"), seed=3))
    rows = result.history
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (tmp_path / "mix" / "confusion_matrix.png").is_file()


def test_cli_augment_draws_a_grid_and_refuses_unknown_names(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "cat.png"
    Image.fromarray((torch.rand(37, 51, 3) * 255).byte().numpy()).save(src)
    out = tmp_path / "grid.png"
    assert main(["augment", str(src), "--preset", "strong", "--n", "5", "-o", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert main(["augment", str(src), "--preset", "wobble", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown augmentation 'wobble'" in err and "standard" in err


def test_skewed_data_tools_balance_sampling_weights_and_confusion_matrix():
    from sklearn.metrics import confusion_matrix as sk_confusion
    from sklearn.utils.class_weight import compute_class_weight

    from divekit.data.loader import TensorBatchLoader
    from divekit.tasks import classify

    labels = torch.tensor([0] * 900 + [1] * 100)
    weights = 1.0 / torch.bincount(labels).double()[labels]
    loader = TensorBatchLoader(labels, batch_size=100, shuffle=True, weights=weights, seed=0)
    drawn = torch.cat([b[0] for b in loader])
    assert len(drawn) == 1000 and abs((drawn == 1).float().mean().item() - 0.5) < 0.05

    task = classify.ClassificationTask(classify.ClassifyConfig(
        data="digits", limit=300, class_weights=True, classes="0-2", device="cpu"))
    y = task.data.train_labels.numpy()
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=y)
    assert torch.allclose(task.loss_weight.double(), torch.tensor(expected), atol=1e-6)

    truth, pred = torch.randint(0, 4, (200,)), torch.randint(0, 4, (200,))
    ours = classify.confusion_matrix(truth, pred, 4)
    assert ours.tolist() == sk_confusion(truth, pred, labels=[0, 1, 2, 3]).tolist()


@pytest.mark.parametrize("spec", ["standard", "hflip,vflip:0.3,crop:0.1-1:0.5-2,jitter:0.4:0.3:0.2:0.1",
                                  "jitter:0.5:0:0.3"])
def test_the_direct_image_path_draws_and_computes_as_torchvision_v2(spec):
    """An image alone skips v2's dispatch (Augment.direct): with the same seed it gives exactly
    the image ``v2.Compose`` gives on a ``tv_tensors.Image``, sample after sample."""
    from torchvision import tv_tensors

    aug = Augment(spec)
    assert aug.direct is not None
    images = torch.rand(40, 3, 12, 10)
    torch.manual_seed(11)
    fast = [aug(im) for im in images]
    torch.manual_seed(11)
    slow = [aug.transform(tv_tensors.Image(im)).as_subclass(torch.Tensor) for im in images]
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    assert not all(torch.equal(a, im) for a, im in zip(fast, images, strict=True))
    assert Augment("hflip,rotate:10").direct is None  # no direct form: v2 runs it
