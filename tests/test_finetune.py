"""Fine-tuning: copied features, fresh head, frozen stages, per-group learning rates, sources."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
import torchvision

from divekit.cli import main
from divekit.engine.trainer import Trainer
from divekit.errors import DivekitError
from divekit.models import create_model, list_models
from divekit.models import surgery as ft
from divekit.tasks import evaluate
from divekit.tasks.experiments import transfer_experiment
from divekit.tasks.finetune import (
    FinetuneConfig,
    FinetuneTask,
    finetune,
    resolve_source,
)


def _config(source, **kw) -> FinetuneConfig:
    base = dict(source=str(source), data="digits", classes="5-9", shots=8, epochs=1, batch_size=8,
                lr=0.05, quiet=True, device="cpu", seed=1)
    return FinetuneConfig(**{**base, **kw})


def _task(cfg: FinetuneConfig) -> FinetuneTask:
    source = resolve_source(cfg.source, cfg.arch)
    return FinetuneTask(dataclasses.replace(cfg, model=source.model_name, resize=28), source)


def test_frozen_parameters_stay_bit_identical_while_the_head_learns(trained_lenet_run):
    cfg = _config(trained_lenet_run, freeze=2, weight_decay=0.01, momentum=0.9)
    task = _task(cfg)
    trainer = Trainer(task, task.config)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    running = trainer.model.features[1].moving_mean.clone()  # BatchNorm of a frozen stage
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    frozen = [k for k in before if k.startswith(("features.0.", "features.1."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert torch.equal(trainer.model.features[1].moving_mean, running)  # statistics kept too
    for k in before:
        if k.startswith(("head.", "features.4.")):
            assert not torch.equal(before[k], after[k]), k


def test_the_head_learns_at_ten_times_the_base_rate_and_layers_decay(trained_lenet_run):
    cfg = _config(trained_lenet_run, lr=0.02, freeze=1, head_lr_mult=10, lr_decay=0.5)
    task = _task(cfg)
    trainer = Trainer(task, task.config)
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups["head"] == pytest.approx(10 * 0.02)
    stages = [n for n, m in trainer.model.features.named_children() if list(m.parameters())]
    assert stages == ["0", "1", "4", "5"]  # LeNet-BN: conv, BN, conv, BN
    expected = {"features.1": 0.02 * 0.5**2, "features.4": 0.02 * 0.5, "features.5": 0.02}
    assert {k: v for k, v in groups.items() if k != "head"} == pytest.approx(expected)
    assert "features.0" not in groups  # frozen: no optimizer ever sees it


def test_features_are_copied_and_the_head_is_fresh_for_the_new_classes(trained_lenet_run):
    task = _task(_config(trained_lenet_run))
    model = task.build_model()
    source = create_model("lenet_bn", num_classes=10, in_channels=1)
    from divekit.engine.checkpoint import load_weights
    from divekit.engine.task import Run

    load_weights(source, Run(trained_lenet_run, None).latest_weights())
    for (k, a), b in zip(model.features.state_dict().items(), source.features.state_dict().values()):
        assert torch.equal(a, b), k
    assert model.head[-1].out_features == 5
    assert not torch.equal(model.head[1].weight, source.head[1].weight)


@pytest.mark.parametrize("name", list_models("classify"))
def test_every_zoo_classifier_freezes_by_stage_and_groups_all_parameters(name):
    model = create_model(name, num_classes=4, in_channels=1)
    names = ft.freeze_stages(model, 1)
    assert names == [next(iter(model.features.named_children()))[0]]
    groups = ft.param_groups(model, 0.1, head_lr_mult=10)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(DivekitError, match="--freeze must be in 0.."):
        ft.freeze_stages(model, len(model.features) + 1)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_split_into_features_and_head_compute_the_same(arch):
    torch.manual_seed(0)
    net = torchvision.models.get_model(arch, weights=None, num_classes=6).eval()
    ours = ft.torchvision_classifier(arch, 6, 3, state=net.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), net(x), atol=1e-5)
    gray = ft.torchvision_classifier(arch, 6, 1, state=net.state_dict()).eval()
    with torch.no_grad():  # summing the RGB filters: a gray image equals R = G = B
        assert torch.allclose(gray(x[:, :1]), net(x[:, :1].expand(-1, 3, -1, -1)), atol=1e-4)


def test_a_torchvision_weights_file_fine_tunes_and_evaluates(tmp_path, capsys):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "resnet18-0123abcd.pth"
    torch.save(net.state_dict(), path)
    out = tmp_path / "tv"
    result = finetune(_config(path, classes="0-2", shots=4, batch_size=12, resize=32, out=str(out)))
    assert result.model.head[-1].out_features == 3
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
    assert "confusion matrix" in capsys.readouterr().out and (out / "confusion_matrix.png").is_file()


def test_a_file_that_is_not_a_state_dict_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    evil = tmp_path / "resnet18-evil.pth"
    torch.save({"fc.weight": Payload()}, evil)
    with pytest.raises(DivekitError, match="refused without executing it"):
        resolve_source(str(evil))
    assert not marker.exists()
    bare = tmp_path / "resnet18-bare.pth"
    torch.save(torch.zeros(3), bare)
    with pytest.raises(DivekitError, match="does not hold a state dict"):
        resolve_source(str(bare))


def test_mismatched_sources_say_what_mismatched(tmp_path, trained_lenet_run):
    path = tmp_path / "weights.pth"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), path)
    with pytest.raises(DivekitError, match=r"torchvision's resnet34 does not match .*missing layer1\.2"):
        resolve_source(str(path), "resnet34")
    with pytest.raises(DivekitError, match="cannot tell the architecture"):
        resolve_source(str(path))
    with pytest.raises(DivekitError, match="trained 'lenet_bn'; --arch 'resnet18' does not match"):
        resolve_source(str(trained_lenet_run), "resnet18")
    with pytest.raises(DivekitError, match="neither a run directory"):
        resolve_source(str(tmp_path / "nothing"))
    with pytest.raises(DivekitError, match="unknown weights 'V9' for resnet18; choose one of: IMAGENET1K_V1"):
        resolve_source("resnet18:V9")  # resolved offline, before any download


def test_cli_finetune_from_a_run_directory(trained_lenet_run, tmp_path, capsys):
    out = tmp_path / "ft"
    code = main(["finetune", str(trained_lenet_run), "--data", "digits", "--classes", "5-9",
                 "--shots", "6", "--epochs", "2", "--freeze", "2", "--batch-size", "10",
                 "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0 and "run directory" in capsys.readouterr().out
    metrics = evaluate(out, device="cpu")
    assert set(metrics["per_class_acc"]) == {"5", "6", "7", "8", "9"}
    assert main(["finetune", str(trained_lenet_run), "--freeze", "99", "--out", str(tmp_path / "x"),
                 "--quiet", "--device", "cpu"]) == 2
    assert "--freeze must be in 0..8" in capsys.readouterr().err


# slow: 4 + 20 epochs on two models (a quality result; test_cli_finetune_* keep fine-tuning in make test)
@pytest.mark.slow
def test_transfer_fine_tuning_beats_scratch_on_a_few_shot_target():
    # pretrain LeNet-BN on digits 0-4, then learn 5-9 from 3 images per class; same budget
    r = transfer_experiment(shots=3, epochs=20, source_epochs=4, seed=2, out=None, threads=2)
    assert r["source_val_acc"] > 0.9
    assert r["finetune_val_acc"] > r["scratch_val_acc"] + 0.03, r["table"]
