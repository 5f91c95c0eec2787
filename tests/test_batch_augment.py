"""Batched augmentation against torchvision's functional ops applied image by image with the
same random parameters, and its parameter distributions against the v2 transforms'."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from divekit.data.augment import PRESETS
from divekit.data.batch_augment import (
    BatchAugment,
    Blur,
    Crop,
    Elastic,
    Erase,
    Flip,
    Gray,
    Jitter,
    Posterize,
    Rotate,
    Sharpness,
    Solarize,
)
from divekit.errors import DivekitError


def batch(n=12, c=3, h=20, w=24, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def params(op, x, seed=1):
    return op.sample(x, torch.Generator().manual_seed(seed))


def per_sample(fn, x):
    return torch.stack([fn(i, x[i]) for i in range(len(x))])


@pytest.mark.parametrize("dim", [-1, -2])
def test_flips_match_torchvision(dim):
    x = batch()
    op = Flip(0.5, dim)
    p = params(op, x)
    assert 0 < p["flip"].sum() < len(x)
    ref_fn = TF.horizontal_flip if dim == -1 else TF.vertical_flip
    ref = per_sample(lambda i, im: ref_fn(im) if p["flip"][i] else im, x)
    assert torch.equal(op.apply(x, **p), ref)


@pytest.mark.parametrize("shape", [(3, 20, 24), (1, 28, 28), (3, 7, 5)])
def test_crop_equals_resized_crop(shape):
    x = batch(c=shape[0], h=shape[1], w=shape[2])
    op = Crop((0.08, 1.0), (3 / 4, 4 / 3))
    p = params(op, x)
    ref = per_sample(lambda i, im: TF.resized_crop(
        im, int(p["top"][i]), int(p["left"][i]), int(p["height"][i]), int(p["width"][i]),
        list(shape[1:]), antialias=True), x)
    torch.testing.assert_close(op.apply(x, **p), ref, atol=1e-5, rtol=0)


def test_crop_parameters_follow_random_resized_crop():
    """Boxes lie inside the image; their area fraction and aspect have v2's distribution."""
    n, h, w = 4000, 32, 32
    x = torch.zeros(n, 1, h, w)
    op = Crop((0.3, 1.0), (3 / 4, 4 / 3))
    p = params(op, x)
    assert (p["top"] >= 0).all() and (p["top"] + p["height"] <= h).all()
    assert (p["left"] >= 0).all() and (p["left"] + p["width"] <= w).all()
    ours = (p["height"] * p["width"]).double() / (h * w)
    torch.manual_seed(0)
    ref = v2.RandomResizedCrop(h, scale=(0.3, 1.0))
    boxes = [ref.make_params([x[0]]) for _ in range(n)]
    theirs = torch.tensor([b["height"] * b["width"] / (h * w) for b in boxes], dtype=torch.float64)
    assert abs(ours.mean() - theirs.mean()) < 0.02 and abs(ours.std() - theirs.std()) < 0.02
    tops = torch.tensor([b["top"] for b in boxes], dtype=torch.float64)
    assert abs(p["top"].double().mean() - tops.mean()) < 0.5


def test_crop_falls_back_to_a_central_crop_when_no_box_fits():
    """A 2x40 image cannot hold a box of aspect 3/4-4/3 and area ≥ 90%: ten misses → v2's fallback."""
    x = torch.rand(5, 1, 2, 40)
    op = Crop((0.9, 1.0), (3 / 4, 4 / 3))
    p = params(op, x)
    torch.manual_seed(0)
    ref = v2.RandomResizedCrop((2, 40), scale=(0.9, 1.0)).make_params([x[0]])
    assert (p["height"] == ref["height"]).all() and (p["width"] == ref["width"]).all()
    assert (p["top"] == ref["top"]).all() and (p["left"] == ref["left"]).all()


def test_rotate_matches_torchvision_nearest():
    x = batch(h=21, w=21)
    op = Rotate(40.0)
    p = params(op, x)
    ours = op.apply(x, **p)
    ref = per_sample(lambda i, im: TF.rotate(im, float(p["angle"][i]), InterpolationMode.NEAREST), x)
    # nearest-neighbour ties (a source coordinate at exactly .5) may round either way
    assert (ours == ref).float().mean() > 0.99
    assert (ours - ref).abs().amax(dim=(1, 2, 3)).lt(1).all()


def test_rotate_by_ninety_degrees_is_a_transpose():
    x = batch(n=2, h=9, w=9)
    ours = Rotate(90.0).apply(x, angle=torch.tensor([90.0, -90.0], dtype=torch.float64))
    assert torch.equal(ours[0], torch.rot90(x[0], 1, dims=(1, 2)))
    assert torch.equal(ours[1], torch.rot90(x[1], -1, dims=(1, 2)))


def test_elastic_matches_torchvision_with_the_same_field():
    x = batch(h=32, w=32)
    op = Elastic(40.0, 4.0, 1.0)
    p = params(op, x)
    ref = per_sample(lambda i, im: TF.elastic(im, p["displacement"][i:i + 1]), x)
    torch.testing.assert_close(op.apply(x, **p), ref, atol=1e-5, rtol=0)


def test_elastic_field_has_the_v2_scale():
    x = torch.zeros(64, 1, 32, 32)
    ours = params(Elastic(40.0, 4.0, 1.0), x)["displacement"]
    torch.manual_seed(0)
    ref = torch.cat([v2.ElasticTransform(40.0, 4.0).make_params([x[0]])["displacement"] for _ in range(64)])
    assert ours.shape == ref.shape == (64, 32, 32, 2)
    assert abs(ours.std() - ref.std()) / ref.std() < 0.1


def test_blur_matches_gaussian_blur():
    x = batch(h=16, w=16)
    op = Blur((0.1, 2.0), 0.7)
    p = params(op, x)
    assert 0 < p["on"].sum() < len(x)
    ref = per_sample(lambda i, im: TF.gaussian_blur(im, [13, 13], [float(p["sigma"][i])] * 2)
                     if p["on"][i] else im, x)
    torch.testing.assert_close(op.apply(x, **p), ref, atol=1e-5, rtol=0)


def test_blur_kernel_shrinks_on_small_images_as_the_per_sample_path():
    x = batch(h=6, w=6)
    op = Blur((1.0, 2.0), 1.0)
    p = params(op, x)
    ref = per_sample(lambda i, im: TF.gaussian_blur(im, [5, 5], [float(p["sigma"][i])] * 2), x)
    torch.testing.assert_close(op.apply(x, **p), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0])
def test_sharpness_matches_adjust_sharpness(factor):
    x = batch()
    op = Sharpness(factor, 0.5)
    p = params(op, x)
    ref = per_sample(lambda i, im: TF.adjust_sharpness(im, factor) if p["on"][i] else im, x)
    torch.testing.assert_close(op.apply(x, **p), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_matches_the_functional_ops_in_each_samples_order(channels):
    x = batch(c=channels)
    op = Jitter(0.4, 0.5, 0.6, 0.2)
    p = params(op, x)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]

    def ref_one(i, im):
        for op_index in p["order"][i].tolist():
            im = fns[op_index](im, float(p["factors"][i, op_index]))
        return im

    torch.testing.assert_close(op.apply(x, **p), per_sample(ref_one, x), atol=2e-5, rtol=0)
    assert len({tuple(o) for o in p["order"].tolist()}) > 1  # orders differ between samples


def test_jitter_factor_ranges():
    x = torch.zeros(2000, 3, 2, 2)
    p = params(Jitter(0.4, None, None, 0.1), x)
    f = p["factors"]
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and f[:, 3].abs().max() <= 0.1
    assert abs(f[:, 0].mean() - 1.0) < 0.02
    zero = params(Jitter(0.0, 0.0, 0.0, 0.0), x)
    assert torch.equal(Jitter(0.0, 0.0, 0.0, 0.0).apply(x, **zero), x)


def test_hue_round_trip_on_saturated_and_gray_pixels():
    from divekit.data.batch_augment import adjust_hue

    x = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1]])
    x = x.T.reshape(1, 3, 2, 3)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(1)), x)
    torch.testing.assert_close(adjust_hue(x, torch.tensor([1 / 3])), TF.adjust_hue(x[0], 1 / 3)[None],
                               atol=1e-6, rtol=0)


def test_gray_posterize_solarize_match_torchvision():
    x = batch()
    gray, post, sol = Gray(0.5), Posterize(3, 0.5), Solarize(0.6, 0.5)
    pg, pp, ps = params(gray, x, 1), params(post, x, 2), params(sol, x, 3)
    torch.testing.assert_close(
        gray.apply(x, **pg),
        per_sample(lambda i, im: TF.rgb_to_grayscale(im, 3) if pg["on"][i] else im, x), atol=1e-6, rtol=0)
    assert torch.equal(post.apply(x, **pp), per_sample(lambda i, im: TF.posterize(im, 3) if pp["on"][i] else im, x))
    assert torch.equal(sol.apply(x, **ps), per_sample(lambda i, im: TF.solarize(im, 0.6) if ps["on"][i] else im, x))


def test_erase_matches_torchvision_erase():
    x = batch(n=40)
    op = Erase(0.5, (0.02, 0.33))
    p = params(op, x)
    on = p["height"] > 0
    assert 0 < on.sum() < len(x)
    ref = per_sample(lambda i, im: TF.erase(im, int(p["top"][i]), int(p["left"][i]), int(p["height"][i]),
                                            int(p["width"][i]), torch.zeros(1)) if on[i] else im, x)
    assert torch.equal(op.apply(x, **p), ref)
    area = (p["height"] * p["width"])[on].double() / (20 * 24)
    assert area.min() >= 0.01 and area.max() <= 0.36  # rounding of h and w around [0.02, 0.33]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_runs_batched_keeps_shape_range_and_is_reproducible(preset):
    x = batch(n=6, h=32, w=32)
    aug = BatchAugment(preset)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    if preset != "none":
        assert not torch.equal(a, x)
        assert not torch.equal(a, aug(x, torch.Generator().manual_seed(6)))
    assert BatchAugment(preset).is_identity == (preset == "none")


def test_bad_batches_and_specs_give_one_line_errors():
    with pytest.raises(DivekitError, match="expected a batch"):
        BatchAugment("flip")(torch.rand(3, 32, 32))
    with pytest.raises(DivekitError, match="float images"):
        BatchAugment("flip")(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(DivekitError, match="unknown augmentation 'twirl'"):
        BatchAugment("hflip,twirl")
    assert BatchAugment("strong")(torch.rand(0, 3, 8, 8)).shape == (0, 3, 8, 8)


# ----------------------------------------------------------------------------- in training
def _weights(run):
    from divekit.engine.checkpoint import CheckpointDir, load_weights
    from divekit.models import create_model

    model = create_model("lenet_bn", num_classes=10, in_channels=1)
    load_weights(model, CheckpointDir(run).latest() / "model.safetensors")
    return model.state_dict()


def test_batched_augmentation_trains_and_resumes_bit_identically(tmp_path, capsys):
    from divekit.cli import main

    # no schedule: a cosine one (lenet_bn's recipe) spans the planned total, so 1 epoch + resume
    # to 3 is a different run from 3 straight by design
    common = ["--data", "digits", "--limit", "160", "--batch-size", "32", "--lr", "0.05", "--device",
              "cpu", "--quiet", "--seed", "3", "--scheduler", "none", "--augment", "hflip,crop:0.6-1,rotate:10,jitter:0.3,erase"]
    assert main(["train", "lenet_bn", *common, "--epochs", "3", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "lenet_bn", *common, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert main(["train", "lenet_bn", "--resume", "--epochs", "3", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    capsys.readouterr()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batch_and_sample_modes_both_learn(tmp_path):
    from divekit.tasks import classify, train

    for mode in ("batch", "sample"):
        result = train(classify.ClassifyConfig(
            model="lenet_bn", data="digits", epochs=2, limit=320, batch_size=32, lr=0.1,
            augment="standard", augment_mode=mode, quiet=True, device="cpu", seed=0,
            out=str(tmp_path / mode)))
        assert result.history[-1]["train_loss"] < result.history[0]["train_loss"], mode
        config = json.loads((tmp_path / mode / "config.json").read_text())
        assert config["config"]["augment_mode"] == mode


# ----------------------------------------------------------------------------- masks (segmentation)
def _masks(n=12, h=20, w=24, k=5, seed=0):
    return torch.randint(0, k, (n, h, w), generator=torch.Generator().manual_seed(seed))


def _mask_ref(fn, m):
    return torch.stack([fn(i, tv_tensors.Mask(m[i:i + 1])).as_subclass(torch.Tensor)[0] for i in range(len(m))])


def test_masks_follow_crops_as_torchvision_moves_a_mask():
    x, m = batch(), _masks()
    op = Crop((0.08, 1.0), (3 / 4, 4 / 3))
    p = params(op, x)
    ours = op.apply_mask(m.unsqueeze(1), **p)[:, 0]
    ref = _mask_ref(lambda i, mi: TF.resized_crop(mi, int(p["top"][i]), int(p["left"][i]), int(p["height"][i]),
                                                  int(p["width"][i]), [20, 24]), m)
    assert torch.equal(ours, ref)


def test_masks_follow_rotations_and_elastic_deformations():
    x, m = batch(h=21, w=21), _masks(h=21, w=21)
    rot = Rotate(40.0)
    p = params(rot, x)
    ours = rot.apply_mask(m.unsqueeze(1), **p)[:, 0]
    ref = _mask_ref(lambda i, mi: TF.rotate(mi, float(p["angle"][i])), m)
    assert (ours == ref).float().mean() > 0.99  # nearest ties, as for images
    el = Elastic(40.0, 4.0, 1.0)
    p = params(el, x)
    ours = el.apply_mask(m.unsqueeze(1), **p)[:, 0]
    ref = _mask_ref(lambda i, mi: TF.elastic(mi, p["displacement"][i:i + 1]), m)
    assert (ours == ref).float().mean() > 0.99


def test_images_and_masks_stay_aligned_and_colour_ops_leave_masks_alone():
    """An image that *is* its mask (value = class / 4) goes through nearest-only geometry with
    the mask: afterwards the two still agree pixel for pixel; jitter changes the image only."""
    m = _masks(n=16, h=24, w=24)
    x = (m.float() / 4).unsqueeze(1)
    aug = BatchAugment("hflip,vflip,rotate:30")
    xa, ma = aug(x, m, generator=torch.Generator().manual_seed(0))
    assert ma.shape == m.shape and ma.dtype == m.dtype and not torch.equal(ma, m)
    assert torch.equal((xa[:, 0] * 4).round().long(), ma)
    xj, mj = BatchAugment("jitter:0.5,blur:0.5-1:1,erase:1")(x, m, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mj, m) and not torch.equal(xj, x)
    instance = torch.stack([m == c for c in range(5)], dim=1)  # (N, K, H, W) bool
    _, mi = BatchAugment("strong")(x.expand(-1, 3, -1, -1).contiguous(), instance)
    assert mi.shape == instance.shape and mi.dtype == torch.bool


def test_masks_of_the_wrong_shape_are_refused():
    with pytest.raises(DivekitError, match="do not match images"):
        BatchAugment("hflip")(torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 9, dtype=torch.long))


@pytest.mark.parametrize("spec", ["hflip,crop:0.3-1", "vflip:0.5,crop:0.2-1,jitter:0.4",
                                  "hflip,vflip,crop:0.1-1:0.5-2"])
def test_a_flip_folded_into_the_next_crop_equals_flipping_first(spec):
    """BatchAugment folds a flip that comes just before a crop into the crop's resampling
    matrices; the same draws applied one operation after the other (each op's own ``apply``)
    give the same images up to float rounding."""
    x = batch(n=16, h=20, w=24)
    folded = BatchAugment(spec)(x, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    step = x
    for op in BatchAugment(spec).ops:
        step = op.apply(step, **op.sample(step, g))
    torch.testing.assert_close(folded, step, atol=1e-6, rtol=0)
