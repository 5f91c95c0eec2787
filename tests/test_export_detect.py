"""``divekit export`` of detection runs: the network in ONNX or ``torch.export``, the decoding
in Python, and ``divekit predict FILE.onnx`` printing what ``divekit predict RUN`` prints.

Each parity test compares an independent implementation with the run's PyTorch model on random
inputs: onnxruntime's kernels (raw outputs, then the decoded rows), the ``torch.export``
program, torchvision's R-CNN traced to ONNX with its NMS in the graph. Runs are built from
seeded random weights (BatchNorm statistics measured on random batches, as training leaves
them) and saved as runs, which is all ``export`` and ``predict`` read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from divekit.cli import main
from divekit.engine.checkpoint import CheckpointDir
from divekit.errors import DivekitError
from divekit.export import export_run

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from divekit.export.runtime import OnnxDetector, OnnxModel  # noqa: E402

TOL = 1e-4
SIZE = 64
CLASSES = ["disc", "square"]
NATIVE = ["tiny_ssd", "centernet_tiny", "yolo_grid"]


def detect_run(root: Path, model: str, seed: int = 0) -> tuple[Path, nn.Module]:
    """A detection run of ``model`` with seeded random weights: a checkpoint and config.json."""
    from divekit.tasks.detect import DetectConfig, DetectionTask

    config = DetectConfig(model=model, data="shapes", image_size=SIZE, device="cpu", quiet=True)
    facts = {"classes": CLASSES, "image_size": SIZE}
    torch.manual_seed(seed)
    net = DetectionTask(config, record=facts).build_model()
    g = torch.Generator().manual_seed(seed)
    batchnorms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in batchnorms:  # running statistics: the mean of two random batches' statistics
        m.reset_running_stats()
        m.momentum = None
    if batchnorms and not hasattr(net, "net"):  # (the R-CNNs' backbones have frozen ones)
        net.train()
        with torch.no_grad():
            for _ in range(2):
                net.raw(torch.rand(2, 3, SIZE, SIZE, generator=g))
    for m in batchnorms:
        m.momentum = 0.1
    if model == "centernet_tiny":  # peaks above predict's thresholds, as a trained net has
        nn.init.zeros_(net.heat[-1].bias)  # (its initial prior of 0.01 gives none)
    net.eval()
    run = root / model
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "task": "detect", "divekit_version": "test", "command": "",
        "config": dataclasses.asdict(config), **facts}))
    CheckpointDir(run).save(net, {}, "epoch-0001")
    return run, net


def _images(root: Path, count: int = 2) -> list[str]:
    """PNG files of other sizes than the model's, with a bright square and a disc on noise."""
    from PIL import Image

    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        h, w = 90 + 10 * i, 70
        pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        pixels[10:40, 8:38] = (230, 40, 40)
        yy, xx = np.mgrid[:h, :w]
        pixels[(yy - 60) ** 2 + (xx - 45) ** 2 < 15 ** 2] = (40, 220, 60)
        path = root / f"scene{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


# ----------------------------------------------------------------------------- ONNX parity
@pytest.mark.parametrize("model", NATIVE)
def test_onnx_raw_outputs_and_decoded_rows_equal_the_run_at_batch_1_and_7(tmp_path, model):
    run, net = detect_run(tmp_path, model)
    result = export_run(run, "onnx", dynamic_batch=True, exporter="torchscript")
    onnx_model = OnnxModel(result.path)
    meta = onnx_model.meta
    assert meta == json.loads(result.meta_path.read_text())
    assert meta["task"] == "detect" and meta["classes"] == CLASSES
    assert meta["input_size"] == [SIZE, SIZE] and meta["inputs"]["images"][0] == "batch"
    assert meta["outputs"] == list(net.raw_outputs)
    assert meta["decoder"]["model"] == model and meta["decoder"]["kwargs"]["num_classes"] == 2
    detector = OnnxDetector(onnx_model)
    g = torch.Generator().manual_seed(5)
    for b in (1, 7):
        x = torch.rand(b, 3, SIZE, SIZE, generator=g)
        with torch.no_grad():
            want = _as_tuple(net.raw(x))
            rows = net.detect(x, 0.5)
        got = onnx_model.run_all(images=x.numpy())
        assert len(got) == len(want)
        for name, a, w in zip(meta["outputs"], got, want):
            assert a.shape == tuple(w.shape), name
            assert np.abs(a - w.numpy()).max() < TOL, name
        # the model's own decode on onnxruntime's outputs: the same boxes, classes and scores
        found = detector.detect(x, 0.5)
        assert found.shape == rows.shape
        assert torch.equal(found[..., 0], rows[..., 0])
        assert (found - rows).abs().max() < TOL


@pytest.mark.slow
def test_the_dynamo_exporter_writes_a_detector_too(tmp_path):
    run, net = detect_run(tmp_path, "tiny_ssd", seed=3)
    result = export_run(run, "onnx", dynamic_batch=True)  # auto: dynamo first
    assert result.exporter == "dynamo"
    x = torch.rand(7, 3, SIZE, SIZE)
    with torch.no_grad():
        want = net.raw(x)
    got = OnnxModel(result.path).run_all(images=x.numpy())
    assert all(np.abs(a - w.numpy()).max() < TOL for a, w in zip(got, want))


# ----------------------------------------------------------------------------- predict
@pytest.mark.parametrize("model,options", [
    ("tiny_ssd", []),  # exported for batches of 1: the images run row by row
    ("yolo_grid", ["--dynamic-batch"]), ("centernet_tiny", ["--dynamic-batch"])])
def test_predict_onnx_prints_what_predict_run_prints(tmp_path, capsys, model, options):
    run, _ = detect_run(tmp_path, model)
    images = _images(tmp_path)
    onnx_file = tmp_path / f"{model}.onnx"
    assert main(["export", str(run), "--format", "onnx", "-o", str(onnx_file),
                 "--exporter", "torchscript", *options]) == 0
    capsys.readouterr()
    # a low threshold, so that untrained models print boxes (and NMS has work to do); one
    # detector draws its pictures too (matplotlib is slow here)
    shown = ["--threshold", "0.2"]
    out = tmp_path / "out"
    if model == "yolo_grid":
        shown += ["-o", str(out), "--overwrite"]
    assert main(["predict", str(run), *images, *shown, "--device", "cpu"]) == 0
    from_run = capsys.readouterr().out
    made = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert main(["predict", str(onnx_file), *images, *shown]) == 0
    from_onnx = capsys.readouterr().out
    assert from_onnx == from_run and from_run.count("\n") == 2 and " at [" in from_run
    if model == "yolo_grid":  # the same pictures, replaced (both runs draw the same boxes)
        assert made == ["scene0.pred.png", "scene1.pred.png"] and "-> " in from_onnx
        assert sorted(p.name for p in out.iterdir()) == made
    if not options:
        onnx_model = OnnxModel(onnx_file)
        assert onnx_model.meta["inputs"]["images"][0] == 1
        anchors, cls, _ = onnx_model.run_all(images=np.random.rand(3, 3, SIZE, SIZE)
                                             .astype(np.float32))
        assert anchors.shape[0] == 1 and cls.shape[0] == 3  # the anchors once, the rest joined
    assert main(["predict", str(onnx_file), *images, "--top-k", "2"]) == 2  # a classifier's
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--top-k" in err and "--threshold" in err


# ----------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("model", NATIVE)
def test_pt2_round_trips_through_torch_export_load(tmp_path, model):
    run, net = detect_run(tmp_path, model, seed=2)
    result = export_run(run, "pt2", dynamic_batch=True)
    extra = {"divekit.json": ""}
    program = torch.export.load(str(result.path), extra_files=extra)
    assert json.loads(extra["divekit.json"])["decoder"]["model"] == model
    for b in (1, 7):
        x = torch.rand(b, 3, SIZE, SIZE)
        with torch.no_grad():
            got, want = _as_tuple(program.module()(x)), _as_tuple(net.raw(x))
        assert len(got) == len(want)
        assert all((a - w).abs().max() < TOL for a, w in zip(got, want))


# ----------------------------------------------------------------------------- R-CNN
def test_faster_rcnn_exports_with_torchvisions_nms_in_the_graph(tmp_path, capsys):
    run, net = detect_run(tmp_path, "fasterrcnn_mobilenet")
    with pytest.raises(DivekitError, match="one image at a time: leave out --dynamic-batch"):
        export_run(run, "onnx", dynamic_batch=True)
    result = export_run(run, "onnx")  # auto: torchvision's route, the TorchScript exporter
    assert result.exporter == "torchscript"
    onnx_model = OnnxModel(result.path)
    assert onnx_model.meta["nms_in_graph"] and onnx_model.meta["nms_iou"] == 0.5
    detector = OnnxDetector(onnx_model)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        rows = net.detect(x, 0.5)
        boxes, labels, scores = onnx_model.sess.run(None, {"images": x[:1].numpy()})
        want = net.net([x[0]])[0]
    assert np.abs(boxes - want["boxes"].numpy()).max() < TOL
    assert np.array_equal(labels, want["labels"].numpy())
    assert np.abs(scores - want["scores"].numpy()).max() < TOL
    found = detector.detect(x, 0.5)
    assert (rows[..., 0] >= 0).sum() > 0 and torch.equal(found[..., 0], rows[..., 0])
    assert (found - rows).abs().max() < TOL
    with pytest.raises(DivekitError, match="NMS in its graph at IoU 0.5"):
        detector.detect(x, 0.3)
    images = _images(tmp_path, 1)
    assert main(["predict", str(run), *images, "--threshold", "0.05", "--device", "cpu"]) == 0
    from_run = capsys.readouterr().out
    assert main(["predict", str(result.path), *images, "--threshold", "0.05"]) == 0
    assert capsys.readouterr().out == from_run and " at [" in from_run


@pytest.mark.slow
def test_mask_rcnn_exports_its_boxes_and_pt2_is_refused_naming_the_operator(tmp_path, capsys):
    run, net = detect_run(tmp_path, "maskrcnn")
    result = export_run(run, "onnx")
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        rows = net.detect(x, 0.5)
    found = OnnxDetector(OnnxModel(result.path)).detect(x, 0.5)
    assert torch.equal(found[..., 0], rows[..., 0]) and (found - rows).abs().max() < TOL
    assert main(["export", str(run), "--format", "pt2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "operator" in err
