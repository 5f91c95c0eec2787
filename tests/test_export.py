"""``divekit export``: ONNX and ``torch.export`` files that compute what the run computes,
Hugging Face and torchvision checkpoints that their own libraries load, and the bad exports.

Every parity test compares against an independent implementation: onnxruntime's kernels, the
``torch.export`` program, ``transformers``' BERT, ``torchvision``'s ResNet, each on random
inputs. Runs are built from random weights (BatchNorm statistics measured on random batches,
as training would leave them) and saved as runs, or trained for one tiny epoch where the task
needs data files (BERT, translation).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from divekit.cli import main
from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.run import load_run
from divekit.errors import DivekitError
from divekit.export import export_run

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from divekit.export.runtime import OnnxModel  # noqa: E402

TOL = 1e-4


# ----------------------------------------------------------------------------- runs
def _calibrate(net: nn.Module, shape: tuple[int, ...], seed: int = 0) -> None:
    """BatchNorm running statistics as training leaves them: torch's BatchNorms average
    two random batches exactly (momentum None); divekit's own (lenet_bn) get random ones."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
        elif hasattr(m, "moving_mean"):
            m.moving_mean.uniform_(-0.2, 0.2, generator=g)
            m.moving_var.uniform_(0.5, 1.5, generator=g)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, *shape, generator=g))
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    net.eval()


def _save_run(run: Path, task: str, config, facts: dict, net: nn.Module) -> Path:
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "task": task, "divekit_version": "test", "command": "",
        "config": dataclasses.asdict(config), **facts}))
    CheckpointDir(run).save(net, {}, "epoch-0001")
    return run


def classify_run(root: Path, model: str, in_ch: int = 1, size: int = 32, classes: int = 5,
                 seed: int = 0, calibrate: bool = True, **cfg) -> tuple[Path, nn.Module]:
    """A classification run of ``model`` with random weights (a checkpoint and config.json)."""
    from divekit.tasks.classify import ClassificationTask, ClassifyConfig

    config = ClassifyConfig(model=model, data="digits", device="cpu", quiet=True, **cfg)
    facts = {"classes": [f"class{i}" for i in range(classes)], "in_channels": in_ch,
             "image_size": [size, size], "mean": [0.1 * (i + 1) for i in range(in_ch)],
             "std": [0.3] * in_ch}
    torch.manual_seed(seed)
    net = ClassificationTask(config, record=facts).build_model()
    if calibrate:
        _calibrate(net, (in_ch, size, size), seed)
    return _save_run(root / f"{model}-{in_ch}x{size}", "classify", config, facts, net), net


def _onnx_parity(path: Path, reference: nn.Module, shape: tuple[int, ...],
                 batches=(1, 7)) -> list[float]:
    """onnxruntime's largest difference from the PyTorch model per batch size. Where it is
    above 1e-4, the deep random networks' float32 noise floor decides: both are compared with
    the model in float64, and onnxruntime may be off by at most 3 times PyTorch's own float32
    error (ResNet-50 at batch 1: 3.0e-4 against 1.5e-4, on logits of about 2; onnxruntime
    folds each BatchNorm into its conv, which rounds differently)."""
    model = OnnxModel(path)
    errors = []
    g = torch.Generator().manual_seed(3)
    for b in batches:
        x = torch.randn(b, *shape, generator=g)
        with torch.no_grad():
            want = reference(x).numpy()
        got = model.run(images=x.numpy())
        assert got.shape == want.shape
        error = float(np.abs(got - want).max())
        if error >= TOL:
            with torch.no_grad():
                exact = copy.deepcopy(reference).double()(x.double()).numpy()
            torch_error = float(np.abs(want - exact).max())
            assert float(np.abs(got - exact).max()) <= 3 * torch_error, (error, torch_error)
            error = 0.0  # as exact as PyTorch itself
        errors.append(error)
    return errors


# ----------------------------------------------------------------------------- ONNX, the zoo
# (model, side, exporter): the heavy ones (tens of millions of weights, 224x224) run with -m slow
ZOO = [("lenet", 28, "torchscript"), ("lenet_bn", 28, "torchscript"),
       ("resnet18", 32, "torchscript"), ("nin", 32, "torchscript"),
       pytest.param("googlenet", 32, "torchscript", marks=pytest.mark.slow),
       pytest.param("densenet121", 32, "torchscript", marks=pytest.mark.slow),
       pytest.param("resnet34", 32, "torchscript", marks=pytest.mark.slow),
       pytest.param("resnet50", 32, "torchscript", marks=pytest.mark.slow),
       pytest.param("alexnet", 224, "auto", marks=pytest.mark.slow),
       pytest.param("vgg11", 224, "auto", marks=pytest.mark.slow)]


def test_the_zoo_list_is_the_whole_zoo():
    from divekit.models import list_models

    named = {p.values[0] if hasattr(p, "values") else p[0] for p in ZOO}
    assert named == set(list_models("classify"))


@pytest.mark.parametrize("model,side,exporter", ZOO)
def test_onnx_equals_the_run_at_batch_1_and_7(tmp_path, model, side, exporter):
    run, net = classify_run(tmp_path, model, size=side)
    result = export_run(run, "onnx", dynamic_batch=True, exporter=exporter)
    assert result.path == run / "export" / "model.onnx"
    errors = _onnx_parity(result.path, net, (1, side, side))
    assert max(errors) < TOL, errors
    meta = OnnxModel(result.path).meta  # the preprocessing travels inside the file and beside
    assert meta == json.loads(result.meta_path.read_text())
    assert meta["classes"] == [f"class{i}" for i in range(5)] and meta["mean"] == [0.1]
    assert meta["input_size"] == [side, side] and meta["exporter"] == result.exporter


def test_the_dynamo_exporter_is_tried_first_and_named(tmp_path):
    run, net = classify_run(tmp_path, "lenet", size=28)
    result = export_run(run, "onnx", tmp_path / "lenet.onnx", dynamic_batch=True)
    assert result.exporter == "dynamo" and OnnxModel(result.path).meta["exporter"] == "dynamo"
    assert max(_onnx_parity(result.path, net, (1, 28, 28))) < TOL


def test_flip_tta_is_in_the_graph_and_a_fixed_batch_runs_row_by_row(tmp_path):
    run, net = classify_run(tmp_path, "lenet_bn", size=28, tta="flip")
    result = export_run(run, "onnx", exporter="torchscript")  # no --dynamic-batch: batch 1
    model = OnnxModel(result.path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():  # log of the mean of the image's and its mirror's probabilities
        want = torch.logaddexp(net(x).log_softmax(1), net(x.flip(-1)).log_softmax(1)) - np.log(2)
    assert np.abs(model.run(images=x.numpy()) - want.numpy()).max() < TOL
    assert model.meta["inputs"]["images"][0] == 1 and model.meta["tta"] == "flip"


def test_predict_onnx_prints_what_predict_run_prints(tmp_path, capsys):
    from PIL import Image

    run, _ = classify_run(tmp_path, "lenet_bn", size=28)
    images = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        pixels = np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)  # RGB, another size: converted as training did
        images.append(str(path))
    onnx_file = tmp_path / "lenet.onnx"
    assert main(["export", str(run), "--format", "onnx", "-o", str(onnx_file),
                 "--dynamic-batch", "--exporter", "torchscript"]) == 0
    capsys.readouterr()
    assert main(["predict", str(run), *images, "--top-k", "4", "--device", "cpu"]) == 0
    from_run = capsys.readouterr().out
    assert main(["predict", str(onnx_file), *images, "--top-k", "4"]) == 0
    from_onnx = capsys.readouterr().out
    assert from_onnx == from_run and from_run.count("\n") == 3


# ----------------------------------------------------------------------------- other tasks
def test_fcn_onnx_equals_the_run(tmp_path):
    from divekit.tasks.segment import SegmentationTask, SegmentConfig

    config = SegmentConfig(model="fcn_resnet18", data="shapes-seg", image_size=32, quiet=True)
    facts = {"classes": ["background", "disc", "square"],
             "colormap": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop": None}
    torch.manual_seed(0)
    net = SegmentationTask(config, record=facts).build_model()
    _calibrate(net, (3, 32, 32))
    run = _save_run(tmp_path / "fcn", "segment", config, facts, net)
    result = export_run(run, "onnx", dynamic_batch=True, exporter="torchscript")
    errors = _onnx_parity(result.path, net, (3, 32, 32))
    assert max(errors) < TOL, errors
    assert OnnxModel(result.path).meta["classes"] == facts["classes"]


def _text_batch(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, 2000, (b, t), generator=g)
    segments = (torch.arange(t) >= t // 2).long().expand(b, t).clone()
    valid = torch.randint(2, t + 1, (b,), generator=g)
    valid[0] = t
    return tokens, segments, valid


def test_bert_classify_head_onnx_equals_the_run_and_predicts_alike(bert_run, tmp_path, capsys):
    path = tmp_path / "bert.onnx"
    export_run(bert_run, "onnx", path, dynamic_batch=True, exporter="torchscript")
    model, run = OnnxModel(path), load_run(bert_run)
    for b, t in ((1, 5), (7, 13)):  # the batch and the length both vary
        tokens, segments, valid = _text_batch(b, t, seed=b)
        with torch.no_grad():
            want = run.model(tokens, segments, valid).numpy()
        got = model.run(tokens=tokens.numpy(), segments=segments.numpy(),
                        valid_lens=valid.numpy())
        assert np.abs(got - want).max() < TOL
    texts = ["This kettle is great.", "Awful, it broke after a day and smells."]
    capsys.readouterr()
    assert main(["predict", str(bert_run), *texts, "--device", "cpu"]) == 0
    from_run = [line for line in capsys.readouterr().out.splitlines()  # less the model's
                if not line.startswith("trainable params")]             # building notes
    assert main(["predict", str(path), *texts]) == 0
    assert capsys.readouterr().out.splitlines() == from_run and len(from_run) == 2


def test_bert_hugging_face_layout_loads_in_transformers_with_the_same_logits(bert_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    result = export_run(bert_run, "hf", tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(result.path)).eval()
    run = load_run(bert_run)
    tokens, segments, valid = _text_batch(5, 11, seed=0)
    mask = (torch.arange(11)[None, :] < valid[:, None]).long()
    with torch.no_grad():
        want = run.model(tokens, segments, valid)
        got = hf(input_ids=tokens, token_type_ids=segments, attention_mask=mask).logits
    assert (got - want).abs().max() < TOL
    assert hf.config.id2label == dict(enumerate(run.task.labels))
    from divekit.models.bert_checkpoint import minilm_path

    with pytest.raises(DivekitError, match="files the export reads"):  # never the base's folder
        export_run(bert_run, "hf", minilm_path(), overwrite=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(result.path))
    assert tok("This kettle is great.")["input_ids"] == run.task.tokenizer.encode(
        "This kettle is great.")[0]


def test_transformer_encoder_onnx_equals_the_run(tmp_path):
    from divekit.engine.run import make_config, train
    from divekit.tasks.translate import TranslateConfig, TranslationTask

    cfg = make_config(TranslateConfig, {
        "model": "transformer", "data": "numbers-fr", "max_examples": 200, "batch_size": 64,
        "bleu_examples": 10, "quiet": True, "device": "cpu", "epochs": 1, "num_hiddens": 32,
        "ffn_num_hiddens": 64, "num_heads": 2, "num_blks": 2, "dropout": 0.1,
        "out": str(tmp_path / "mt")})
    run_dir = train(TranslationTask(cfg)).run_dir
    path = tmp_path / "encoder.onnx"
    export_run(run_dir, "onnx", path, dynamic_batch=True, exporter="torchscript")
    model, run = OnnxModel(path), load_run(run_dir)
    assert model.meta["src_vocab"] == run.task.src_vocab.to_dict()
    for b, t in ((1, 4), (7, 9)):
        g = torch.Generator().manual_seed(t)
        tokens = torch.randint(4, len(run.task.src_vocab), (b, t), generator=g)
        valid = torch.randint(1, t + 1, (b,), generator=g)
        with torch.no_grad():
            want = run.model.encoder(tokens, valid).numpy()
        got = model.run(tokens=tokens.numpy(), valid_lens=valid.numpy())
        assert np.abs(got - want).max() < TOL


# ----------------------------------------------------------------------------- torch.export
def test_pt2_round_trips_through_torch_export_load(tmp_path):
    run, net = classify_run(tmp_path, "lenet_bn", size=28)
    result = export_run(run, "pt2", dynamic_batch=True)
    extra = {"divekit.json": ""}
    program = torch.export.load(str(result.path), extra_files=extra)
    assert json.loads(extra["divekit.json"])["classes"] == [f"class{i}" for i in range(5)]
    for b in (1, 7):
        x = torch.randn(b, 1, 28, 28)
        with torch.no_grad():
            assert (program.module()(x) - net(x)).abs().max() < TOL


# ----------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("channels,tol", [
    (3, 1e-5),
    # a grey run: the stem's weights split over R, G, B (rounding of w/3 summed three times)
    pytest.param(1, 1e-4, marks=pytest.mark.slow)])
def test_torchvision_resnet18_loads_the_export_and_matches(tmp_path, channels, tol):
    torchvision = pytest.importorskip("torchvision")
    run, net = classify_run(tmp_path, "resnet18", in_ch=channels, size=32, classes=7)
    result = export_run(run, "torchvision")
    tv = torchvision.models.resnet18(num_classes=7)
    tv.load_state_dict(torch.load(result.path, weights_only=True))
    x = torch.randn(4, channels, 32, 32)
    with torch.no_grad():
        want, got = net(x), tv.eval()(x.expand(4, 3, 32, 32))
    assert (got - want).abs().max() < tol


@pytest.mark.parametrize("model", ["alexnet", "googlenet"])
def test_torchvision_refuses_an_architecture_that_is_not_torchvisions(tmp_path, model, capsys):
    from divekit.tasks.classify import ClassifyConfig

    run = tmp_path / "run"  # refused from the record alone, before any weights are read
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "task": "classify", "config": dataclasses.asdict(ClassifyConfig(model=model))}))
    assert main(["export", str(run), "--format", "torchvision"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torchvision" in err and "course's" in err


# ----------------------------------------------------------------------------- bad exports
def test_an_operator_the_exporter_cannot_translate_is_named_in_one_line(tmp_path, capsys):
    run, _ = classify_run(tmp_path, "lenet_bn", size=32)  # adaptive pool 5x5 -> 4x4
    assert main(["export", str(run), "--format", "onnx", "--exporter", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "operator adaptive_avg_pool2d" in err
    assert not (run / "export" / "model.onnx").exists()


def test_an_existing_output_needs_overwrite_and_an_input_is_never_replaced(tmp_path, capsys):
    run, _ = classify_run(tmp_path, "lenet_bn", size=28)
    out = tmp_path / "m.pt2"
    out.write_bytes(b"keep")
    assert main(["export", str(run), "--format", "pt2", "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["export", str(run), "--format", "pt2", "-o", str(out), "--overwrite"]) == 0
    assert torch.export.load(str(out)) is not None
    weights = CheckpointDir(run).latest() / "model.safetensors"
    before = weights.read_bytes()
    for target in (weights, run / "config.json"):
        with pytest.raises(DivekitError, match="input"):
            export_run(run, "onnx", target, overwrite=True)
    with pytest.raises(DivekitError, match="files the export reads"):
        export_run(run, "hf", run, overwrite=True)
    assert weights.read_bytes() == before
    with pytest.raises(DivekitError, match="--format"):
        export_run(run, "tflite")
