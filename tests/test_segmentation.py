"""Semantic segmentation: VOC data in its real format, shapes-seg, crops, FCN, IoU, the task."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divekit.data.detection import SHAPE_COLOURS, make_shapes
from divekit.data.segmentation import (
    IGNORE_INDEX,
    VOC_BORDER,
    VOC_COLORMAP,
    colormap_to_label,
    crop_batch,
    label_to_colormap,
    load_voc,
    pad_batch,
    random_crop,
    read_label_png,
    shapes_seg,
)
from divekit.errors import DivekitError
from divekit.models import create_model
from divekit.ops.conv import bilinear_kernel
from divekit.tasks.segment import SegmentationTask, SegmentConfig, confusion_matrix, iou_metrics

VOC = Path(__file__).parent / "fixtures" / "voc"


# ----------------------------------------------------------------------------- colour map
def test_voc_colour_map_round_trips():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 21, (30, 40), generator=g, dtype=torch.uint8)
    label[::7, ::5] = IGNORE_INDEX
    rgb = label_to_colormap(label)
    assert tuple(rgb[:, 0, 0].tolist()) == VOC_BORDER  # 255 → VOC's border colour
    assert tuple(rgb[:, 1, 1].tolist()) == VOC_COLORMAP[int(label[1, 1])]
    assert torch.equal(colormap_to_label(rgb), label)


def test_colour_outside_the_map_is_one_line():
    rgb = label_to_colormap(torch.zeros(4, 5, dtype=torch.uint8))
    rgb[:, 2, 3] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    with pytest.raises(DivekitError, match=r"colour \(1, 2, 3\) at pixel \(x=3, y=2\)") as e:
        colormap_to_label(rgb, what="bad.png")
    assert "\n" not in str(e.value)


def test_label_png_palette_and_rgb_agree(tmp_path):
    palette_png = VOC / "VOC2012" / "SegmentationClass" / "2007_000001.png"
    assert Image.open(palette_png).mode == "P"
    label = read_label_png(palette_png)
    assert IGNORE_INDEX in label.unique() and (label.unique() < 21).sum() >= 2
    Image.open(palette_png).convert("RGB").save(tmp_path / "rgb.png")  # the course reads RGB
    assert torch.equal(read_label_png(tmp_path / "rgb.png"), label)


def test_label_png_with_foreign_colours_fails(tmp_path):
    pixels = np.zeros((6, 6, 3), dtype=np.uint8)
    pixels[1, 4] = (10, 200, 30)
    Image.fromarray(pixels).save(tmp_path / "odd.png")
    with pytest.raises(DivekitError, match="odd.png: colour \\(10, 200, 30\\)"):
        read_label_png(tmp_path / "odd.png")
    # a palette PNG whose palette is not VOC's is mapped by colour, and fails the same way
    idx = np.zeros((6, 6), dtype=np.uint8)
    idx[0, 0] = 1
    png = Image.fromarray(idx, mode="P")
    png.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    png.save(tmp_path / "pal.png")
    with pytest.raises(DivekitError, match="colour \\(9, 9, 9\\)"):
        read_label_png(tmp_path / "pal.png")


# ----------------------------------------------------------------------------- voc loader
def test_voc_loader_reads_the_real_layout():
    data = load_voc(data_dir=str(VOC))
    assert (len(data.train_images), len(data.val_images)) == (4, 2)
    assert data.num_classes == 21 and data.classes[15] == "person"
    for x, y in zip(data.train_images + data.val_images, data.train_labels + data.val_labels):
        assert x.dtype == torch.uint8 and x.shape[0] == 3 and y.shape == x.shape[1:]
        assert set(y.unique().tolist()) <= set(range(21)) | {IGNORE_INDEX}
    # found as VOCdevkit/VOC2012 under --data-dir too, and a missing folder says where it looked
    with pytest.raises(DivekitError, match="ImageSets/Segmentation/train.txt"):
        load_voc(data_dir=str(VOC / "nowhere"))


def test_images_smaller_than_the_crop_are_dropped_and_counted(caplog):
    data = load_voc(data_dir=str(VOC))
    with caplog.at_level(logging.WARNING, logger="divekit"):
        data.filter_by_crop((32, 40))
    assert len(data.train_images) == 3 and data.dropped["train"] == 1
    assert "dropped 1 of 4 training images smaller than the 32x40 crop" in caplog.text
    with pytest.raises(DivekitError, match="--crop 100x100 is larger than every training image"):
        load_voc(data_dir=str(VOC)).filter_by_crop((100, 100))


# ----------------------------------------------------------------------------- crops
def test_random_crop_keeps_image_and_label_aligned():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        image = torch.randint(0, 256, (3, 37, 53), generator=g, dtype=torch.uint8)
        label = image[0] % 21  # the label is a function of the image's own pixels
        x, y = random_crop(image, label, (16, 24), generator=g)
        assert x.shape == (3, 16, 24) and torch.equal(y, x[0] % 21)


def test_crop_batch_and_pad_batch_on_images_of_different_sizes():
    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
              for h, w in [(40, 50), (33, 70), (64, 32)]]
    labels = [x[1] % 21 for x in images]
    x, y = crop_batch(images, labels, [2, 0, 1, 0], (30, 30), generator=g)
    assert x.shape == (4, 3, 30, 30) and torch.equal(y, x[:, 1] % 21)
    x, y = pad_batch(images, labels, [0, 1])
    assert x.shape == (2, 3, 64, 96)  # the largest, rounded up to multiples of 32
    assert torch.equal(y[1, :33, :70], labels[1]) and (y[1, 33:] == IGNORE_INDEX).all()
    assert (x[0, :, 40:] == 0).all() and torch.equal(x[0, :, :40, :50], images[0])


# ----------------------------------------------------------------------------- shapes-seg
def test_shapes_seg_labels_are_the_detection_generators_masks():
    images, labels = shapes_seg(6, 64, seed=5)
    ref_images, boxes, masks = make_shapes(6, 64, seed=5, with_masks=True)
    assert torch.equal(images, ref_images.mul(255).round().to(torch.uint8))
    for i in range(6):
        want = torch.zeros(64, 64, dtype=torch.uint8)
        for g in range(boxes.shape[1]):
            if boxes[i, g, 0] >= 0:
                want[masks[i, g].bool()] = int(boxes[i, g, 0]) + 1
        assert torch.equal(labels[i], want)
    # every labelled pixel shows its class's colour
    for c in range(3):
        on = labels == c + 1
        colour = torch.from_numpy(SHAPE_COLOURS[c] * 255).round().to(torch.uint8)
        assert on.any() and (images.permute(0, 2, 3, 1)[on] == colour).all()


# ----------------------------------------------------------------------------- metrics
def test_mean_iou_matches_torchmetrics_with_ignore_index():
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(3)
    k = 6
    labels = torch.randint(0, k - 1, (4, 20, 30), generator=g)  # class 5 never in the labels ...
    labels[torch.rand(labels.shape, generator=g) < 0.1] = IGNORE_INDEX
    preds = torch.randint(0, k - 2, (4, 20, 30), generator=g)  # ... nor predicted: left out
    preds[labels == 1] = 1  # class 1 partly right
    ours = iou_metrics(confusion_matrix(labels, preds, k))
    ref = MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE_INDEX, average="macro")
    assert abs(ours["mean_iou"] - float(ref(preds, labels))) < 1e-6
    per_class = MulticlassJaccardIndex(num_classes=k, ignore_index=IGNORE_INDEX, average="none")(preds, labels)
    np.testing.assert_allclose(ours["iou"][:5], per_class[:5].double().numpy(), atol=1e-6)
    assert np.isnan(ours["iou"][5])
    valid = labels != IGNORE_INDEX
    assert abs(ours["pixel_acc"] - float((preds[valid] == labels[valid]).double().mean())) < 1e-12


# ----------------------------------------------------------------------------- FCN
def test_fcn_head_is_bilinear_and_outputs_match_the_input_size():
    model = create_model("fcn_resnet18", num_classes=5)
    conv = model.head.transpose_conv
    assert (conv.kernel_size, conv.stride, conv.padding) == ((64, 64), (32, 32), (16, 16))
    assert torch.equal(conv.weight.detach(), bilinear_kernel(5, 5, 64))
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 64)).shape == (2, 5, 32, 64)
        assert model(torch.rand(1, 3, 45, 40)).shape == (1, 5, 45, 40)  # padded, cropped back
    other = create_model("fcn_resnet18", num_classes=3, backbone="vgg11")  # any classifier's features
    assert other.stride == 32 and other.head.final_conv.in_channels == 512
    with pytest.raises(DivekitError, match="detect model"):
        create_model("fcn_resnet18", num_classes=3, backbone="tiny_ssd")


def test_backbone_weights_from_a_torchvision_file(tmp_path):
    import torchvision

    from divekit.tasks.segment import pretrained_body

    torch.manual_seed(4)
    net = torchvision.models.resnet18(weights=None, num_classes=7)
    torch.save(net.state_dict(), tmp_path / "resnet18.pth")
    body = pretrained_body("torchvision:resnet18", tmp_path / "resnet18.pth")
    torch.testing.assert_close(body.stem[0].weight, net.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(body.layer4[1].conv2.weight, net.layer4[1].conv2.weight, rtol=0, atol=0)
    torch.save({"x": torch.zeros(2)}, tmp_path / "wrong.pth")
    with pytest.raises(DivekitError):
        pretrained_body("resnet18", tmp_path / "wrong.pth")


def _task(**kw):
    cfg = SegmentConfig(model="fcn_resnet18", data="shapes-seg", image_size=32, limit=8,
                        batch_size=4, quiet=True, **kw)
    return SegmentationTask(cfg)


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    task = _task(augment="none")
    model = task.build_model()
    x, y = crop_batch(task.data.train_images, task.data.train_labels, range(4), None)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss, logs = task.training_step(model, (x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert 0 <= float(logs["pixel_acc"]) <= 1
    assert losses[-1] < 0.5 * losses[0]


def test_ignored_pixels_carry_no_loss():
    """The loss is the cross-entropy averaged over the labelled pixels only."""
    import torch.nn.functional as F

    task = _task(augment="none")
    model = task.build_model().eval()
    x, y = crop_batch(task.data.train_images, task.data.train_labels, range(2), None)
    y = y.clone()
    y[:, :, 20:] = IGNORE_INDEX
    loss, _ = task.training_step(model, (x, y))
    with torch.no_grad():
        logits = model(task.normalize(x))
    want = F.cross_entropy(logits[..., :20], y[:, :, :20].long())
    torch.testing.assert_close(loss, want)


def test_train_evaluate_predict_through_the_engine(tmp_path):
    from divekit.engine.run import evaluate, predict, train

    task = _task(epochs=1, out=str(tmp_path / "run"))
    result = train(task)
    assert "val_mean_iou" in result.final and 0 <= result.final["val_mean_iou"] <= 1
    for name in ("confusion_matrix.png", "per_class_iou.csv", "metrics.csv"):
        assert (tmp_path / "run" / name).is_file()
    metrics = evaluate(tmp_path / "run", device="cpu")
    assert set(metrics["iou"]) == {"background", "square", "disc", "triangle"}
    # two inputs of the same file name, in different folders: two overlays, inputs untouched
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    images, _ = shapes_seg(2, 40, seed=9)
    for folder, img in zip("ab", images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / folder / "scene.png")
    before = (tmp_path / "a" / "scene.png").read_bytes()
    inputs = [str(tmp_path / "a" / "scene.png"), str(tmp_path / "b" / "scene.png")]
    out = predict(tmp_path / "run", inputs, device="cpu", output=str(tmp_path / "a"))
    overlays = [item["overlay"] for item in out]
    assert len(set(overlays)) == 2 and all(Path(p).is_file() for p in overlays)
    assert (tmp_path / "a" / "scene.png").read_bytes() == before
    assert out[0]["label_map"].shape == (40, 40) and abs(sum(out[0]["fractions"].values()) - 1) < 1e-6
    with pytest.raises(DivekitError, match="cannot read image"):
        predict(tmp_path / "run", [str(tmp_path / "missing.png")], device="cpu")
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(DivekitError, match="cannot read image"):
        predict(tmp_path / "run", [str(tmp_path / "junk.png")], device="cpu")


def test_config_checks_name_the_option():
    with pytest.raises(DivekitError, match="--crop must be HxW"):
        SegmentConfig(crop="big").validate()
    with pytest.raises(DivekitError, match="--image-size"):
        SegmentConfig(image_size=8).validate()
    with pytest.raises(DivekitError, match="not a segmentation one"):
        SegmentationTask(SegmentConfig(model="resnet18"))
