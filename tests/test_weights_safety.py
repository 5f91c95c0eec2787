"""Nothing executes from a weights file, wherever it comes from (issue 18).

Each hostile file is a pickle whose loading would create a marker file; every test asserts the
marker never appears and that the refusal is one line naming the file. Downloads run against
the local HTTP server of conftest.py; torch's hub cache is a temporary TORCH_HOME.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import pytest
import torch

from divekit import weights
from divekit.cli import main
from divekit.engine.checkpoint import CheckpointDir
from divekit.errors import DivekitError


class Payload:
    """Unpickling this creates ``marker`` (``open(marker, 'w')``): code run from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """torch's hub cache in a temporary TORCH_HOME: ``<TORCH_HOME>/hub/checkpoints``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.set_dir() was never called
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    assert weights.weights_dir() == folder
    return folder


def write_payload(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload(marker)}, path)
    return path


def one_line(message: str) -> str:
    assert "\n" not in message.strip() and "\x1b" not in message, message
    return message


def refused(fn, marker: Path, match: str) -> str:
    with pytest.raises(DivekitError, match=match) as info:
        fn()
    assert not marker.exists(), "the payload ran"
    return one_line(str(info.value))


def sha256_named(folder: Path, stem: str, obj) -> Path:
    """``obj`` saved as ``<stem>-<first 8 hex of its sha256>.pth`` (torch.hub's naming)."""
    tmp = folder / f"{stem}.tmp"
    torch.save(obj, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = folder / f"{stem}-{digest[:8]}.pth"
    tmp.rename(path)
    return path


# ----------------------------------------------------------------------------- the hub cache
def test_payload_under_a_torchvision_name_is_refused_by_its_hash(hub_cache, marker):
    from divekit.tasks.finetune import resolve_source

    planted = write_payload(hub_cache / "resnet18-f37072fd.pth", marker)
    before = planted.read_bytes()
    msg = refused(lambda: resolve_source("resnet18:IMAGENET1K_V1"), marker, "refusing")
    assert str(planted) in msg and "sha256" in msg and "f37072fd" in msg
    assert planted.read_bytes() == before  # left in place


def test_finetune_command_refuses_the_planted_file_in_one_line(hub_cache, marker, capsys):
    write_payload(hub_cache / "resnet18-f37072fd.pth", marker)
    code = main(["finetune", "resnet18:IMAGENET1K_V1", "--data", "digits", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert one_line(err).startswith("error: refusing") and "resnet18-f37072fd.pth" in err


def test_rcnn_weights_name_never_reaches_torchvisions_loader(hub_cache, marker):
    from divekit.models import create_model

    name = "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"
    write_payload(hub_cache / name, marker)
    msg = refused(lambda: create_model("fasterrcnn_mobilenet", weights="COCO_V1"), marker, "refusing")
    assert name in msg


def test_payload_whose_name_matches_its_hash_is_refused_by_weights_only(hub_cache, marker):
    from types import SimpleNamespace

    path = sha256_named(hub_cache, "tiny", {"w": torch.zeros(2), "evil": Payload(marker)})
    fake = SimpleNamespace(url=f"https://example.invalid/models/{path.name}", name="V1")
    msg = refused(lambda: weights.torchvision_state(fake, download_missing=False), marker,
                  "holds objects a checkpoint must not hold")
    assert str(path) in msg and "(io.open)" in msg


def test_download_is_verified_then_cached_hash_checked_before_every_use(server, tmp_path):
    url, www, requests = server
    good = sha256_named(www, "tiny", {"w": torch.arange(3.0)})
    cache = tmp_path / "cache"
    path = weights.weights_file(url + good.name, cache_dir=cache, progress=False)
    assert path == cache / good.name and requests == ["/" + good.name]
    state = weights.load_state_file(path)
    assert torch.equal(state["w"], torch.arange(3.0))
    assert weights.weights_file(url + good.name, cache_dir=cache) == path  # from the cache
    assert len(requests) == 1
    path.write_bytes(path.read_bytes() + b"tampered")  # changed in the cache
    with pytest.raises(DivekitError, match="refusing .*sha256") as info:
        weights.weights_file(url + good.name, cache_dir=cache)
    one_line(str(info.value))
    assert len(requests) == 1 and path.is_file()  # not fetched again, not replaced


def test_a_download_with_the_wrong_hash_is_not_saved(server, tmp_path):
    url, www, _ = server
    (www / "tiny-0123abcd.pth").write_bytes(b"not the file its name promises")
    with pytest.raises(DivekitError, match="expected 0123abcd"):
        weights.weights_file(url + "tiny-0123abcd.pth", cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "tiny-0123abcd.pth").exists()


def test_a_name_without_a_hash_prefix_cannot_be_checked(tmp_path):
    with pytest.raises(DivekitError, match="carries no sha256 prefix"):
        weights.weights_file("https://example.invalid/weights.pth", cache_dir=tmp_path)


# ----------------------------------------------------------------------------- weights files
def test_finetune_source_file_with_a_payload(tmp_path, marker):
    from divekit.tasks.finetune import resolve_source

    evil = write_payload(tmp_path / "resnet18-weights.pth", marker)
    msg = refused(lambda: resolve_source(str(evil)), marker, "holds objects a checkpoint must not")
    assert str(evil) in msg


def test_rcnn_weights_file_with_a_payload(tmp_path, marker):
    from divekit.models import create_model

    evil = write_payload(tmp_path / "rcnn.pth", marker)
    refused(lambda: create_model("fasterrcnn_mobilenet", weights=str(evil)), marker, "rcnn.pth holds")


def test_stylize_vgg19_name_goes_through_divekits_loader(hub_cache, marker):
    style = pytest.importorskip("divekit.models.style")
    write_payload(hub_cache / "vgg19-dcbb9e9d.pth", marker)
    msg = refused(lambda: style.resolve_vgg19("IMAGENET1K_V1"), marker, "refusing")
    assert "vgg19-dcbb9e9d.pth" in msg


def test_stylize_weights_file_with_a_payload(tmp_path, marker):
    style = pytest.importorskip("divekit.models.style")
    evil = write_payload(tmp_path / "vgg19.pth", marker)
    msg = refused(lambda: style.resolve_vgg19(str(evil)), marker, "vgg19.pth")
    assert "holds objects a checkpoint must not hold" in msg


# ----------------------------------------------------------------------------- run directories
@pytest.fixture
def run_copy(trained_lenet_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained_lenet_run, out)
    return out


def test_checkpoint_files_are_readable_by_their_owner_only(trained_lenet_run):
    ckpt = CheckpointDir(trained_lenet_run).latest()
    files = [ckpt / "model.safetensors", ckpt / "state.pt", ckpt.parent / "latest"]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}


def test_state_pt_with_a_payload_is_refused_on_resume(run_copy, marker, capsys):
    state = CheckpointDir(run_copy).latest() / "state.pt"
    write_payload(state, marker)
    code = main(["train", "lenet_bn", "--data", "digits", "--out", str(run_copy), "--resume",
                 "--epochs", "3", "--limit", "400", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert one_line(err).startswith(f"error: checkpoint state {state} holds objects")


def test_evaluate_and_finetune_refuse_bad_records_in_one_line(run_copy, capsys):
    from divekit.tasks.finetune import resolve_source

    path = run_copy / "config.json"
    record = json.loads(path.read_text())
    bad = {
        "a list": ([record], "a JSON list, not an object"),
        "no config": ({k: v for k, v in record.items() if k != "config"}, "lacks 'config'"),
        "epochs as text": ({**record, "config": {**record["config"], "epochs": "ten"}},
                           "epochs is 'ten', not int"),
        "task as a number": ({**record, "task": 3}, "'task' is a number, not a str"),
    }
    for what, (content, message) in bad.items():
        path.write_text(json.dumps(content))
        assert main(["evaluate", str(run_copy)]) == 2, what
        err = capsys.readouterr().err.strip()
        assert one_line(err).startswith("error:") and message in err and str(path) in err, err
    for content, message in [
        ({k: v for k, v in record.items() if k != "classes"}, "lacks 'classes'"),
        ({**record, "classes": "0123"}, "'classes' is a string, not a list"),
    ]:
        path.write_text(json.dumps(content))
        with pytest.raises(DivekitError, match=message) as info:
            resolve_source(str(run_copy))
        one_line(str(info.value))


def test_load_run_checks_the_task_record_keys(run_copy):
    from divekit.engine.run import load_run

    path = run_copy / "config.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "classes"}))
    with pytest.raises(DivekitError, match="lacks 'classes', which a classify run needs"):
        load_run(run_copy)
    for key, value, found in [("mean", 0.5, "number"), ("in_channels", "1", "string"),
                              ("image_size", {"h": 8}, "object")]:
        path.write_text(json.dumps({**record, key: value}))
        with pytest.raises(DivekitError, match=f"'{key}' is a {found}, not a") as info:
            load_run(run_copy)
        one_line(str(info.value))


def test_a_class_list_that_does_not_fit_the_weights_names_key_and_shapes(run_copy, capsys):
    path = run_copy / "config.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "classes": record["classes"] + ["x", "y"]}))
    assert main(["evaluate", str(run_copy)]) == 2
    err = one_line(capsys.readouterr().err.strip())
    n = len(record["classes"])
    assert "do not fit the model built from" in err and f"({n}," in err and f"({n + 2}," in err


# ----------------------------------------------------------------------------- R-CNN parity
@pytest.mark.parametrize("model", ["fasterrcnn_mobilenet", "maskrcnn"])
def test_rcnn_pretrained_network_is_torchvisions(model, hub_cache, monkeypatch):
    """The network built for a weights name equals torchvision's builder given the same file
    (torchvision may read this benign file itself): modules, frozen parameters, values."""
    from torchvision.models.detection import (
        FasterRCNN_MobileNet_V3_Large_FPN_Weights,
        MaskRCNN_ResNet50_FPN_Weights,
        fasterrcnn_mobilenet_v3_large_fpn,
        maskrcnn_resnet50_fpn,
    )

    from divekit.models import rcnn

    builder, enum = {
        "fasterrcnn_mobilenet": (fasterrcnn_mobilenet_v3_large_fpn, FasterRCNN_MobileNet_V3_Large_FPN_Weights),
        "maskrcnn": (maskrcnn_resnet50_fpn, MaskRCNN_ResNet50_FPN_Weights),
    }[model]
    torch.manual_seed(0)
    state = builder(weights=None, weights_backbone=None, num_classes=91).state_dict()
    state = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in state.items()}
    file = hub_cache / enum.COCO_V1.url.rsplit("/", 1)[-1]
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, file)
    monkeypatch.setattr(rcnn.weight_files, "torchvision_state",
                        lambda w, **_: weights.load_state_file(file))  # the name's hash is not ours
    settings = rcnn.small_image_settings(64)
    ours = rcnn._pretrained_net(enum, "COCO_V1", settings)
    theirs = builder(weights=enum.COCO_V1, **settings)
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
    assert ({n: p.requires_grad for n, p in ours.named_parameters()}
            == {n: p.requires_grad for n, p in theirs.named_parameters()})
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    eps = {(n, m.eps) for n, m in ours.named_modules() if hasattr(m, "eps")}
    assert eps == {(n, m.eps) for n, m in theirs.named_modules() if hasattr(m, "eps")}
