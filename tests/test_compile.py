"""``--compile``: torch.compile on train, evaluate and predict (divekit.engine.compile).

Compiling is slow on the 2-core machine (a LeNet's training and validation graphs take about
45 s), so the default tests compile one tiny MLP once; the compiled evaluate/predict of a LeNet
run are marked slow. The reference is the same loop run eagerly (no compile at all)."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from torch import nn

from divekit.cli import main
from divekit.engine import compile as C
from divekit.engine.checkpoint import CheckpointDir, read_weights
from divekit.engine.config import TrainConfig
from divekit.engine.trainer import Trainer
from divekit.errors import DivekitError
from tensor_task import CrossEntropyTask


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts and ends without graphs cached by another (recompile limits)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Points(CrossEntropyTask):
    """48 points in 6-D, batch 16 (three steps an epoch), validated in the same batches."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(48, 6, generator=g)
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).long()
        self.per_batch, self.val_batch, self.shuffle_seed = 16, 16, 3

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))


def train(tmp, epochs: int, compile: bool | None, resume: bool = False):
    cfg = TrainConfig(epochs=epochs, lr=0.1, quiet=True, device="cpu", compile=compile)
    trainer = Trainer(Points(cfg), cfg, run_dir=tmp)
    return trainer, trainer.fit(resume=resume)


def test_compiled_run_matches_eager_and_resumes_uncompiled(tmp_path, monkeypatch):
    """A compiled epoch gives the eager epoch's losses (1e-5) and a checkpoint with the same
    keys; resumed without --compile, the second epoch matches the eager second epoch.

    The graphs go through TorchDynamo and AOTAutograd (forward and backward captured as the
    Trainer compiles them) but not Inductor's C++ code generation, which costs ~30 s cold on a
    fresh machine; the slow tests below compile a LeNet with Inductor itself."""
    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile",
                        lambda self, *a, **k: compile_module(self, *a, **{**k, "backend": "aot_eager"}))
    _, eager = train(tmp_path / "eager", 2, compile=False)
    trainer, first = train(tmp_path / "compiled", 1, compile=True)
    assert trainer.compiled and C.is_compiled(trainer.model)
    assert not any(k.startswith("_orig_mod") for k in trainer.model.state_dict())
    for key in ("train_loss", "val_loss"):
        assert first[0][key] == pytest.approx(eager[0][key], abs=1e-5, rel=0)
    weights = {}
    for name in ("eager", "compiled"):
        latest = CheckpointDir(tmp_path / name).latest()
        weights[name] = read_weights(latest / "model.safetensors")
    assert weights["compiled"].keys() == weights["eager"].keys()
    trainer, resumed = train(tmp_path / "compiled", 2, compile=False, resume=True)
    assert not trainer.compiled
    assert resumed[-1]["train_loss"] == pytest.approx(eager[-1]["train_loss"], abs=1e-5, rel=0)
    assert resumed[-1]["val_loss"] == pytest.approx(eager[-1]["val_loss"], abs=1e-5, rel=0)


def test_auto_follows_the_family_default(monkeypatch):
    """Neither --compile nor --no-compile: the family's default; never with a strategy it
    cannot go with."""
    assert C.model_family("resnet18") == "resnet" and C.model_family("lenet") == "lenet"
    assert C.model_family("no-such-model") is None
    monkeypatch.setitem(C.FAMILY_DEFAULTS, "lenet", True)
    assert C.resolve(None, "lenet") is True
    assert C.resolve(False, "lenet") is False
    assert C.resolve(None, "lenet", strategy="pipeline") is False
    assert C.resolve(None, "resnet18") is C.FAMILY_DEFAULTS.get("resnet", False)
    assert C.resolve(True, "") is True


@pytest.mark.parametrize("strategy", sorted(C.REFUSED_STRATEGIES))
def test_refused_with_model_parallel_strategies(strategy, capsys):
    with pytest.raises(DivekitError, match=f"--compile does not go with --strategy {strategy}"):
        TrainConfig(compile=True, strategy=strategy).validate()
    TrainConfig(compile=None, strategy=strategy).validate()  # auto never refuses
    assert main(["train", "lenet", "--data", "digits", "--compile", "--strategy", strategy]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --compile does not go with") and "\n" not in err


def test_missing_compiler_is_one_line(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = C.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "C++ compiler" in reason
    with pytest.raises(DivekitError, match="^--compile cannot run here: no C\\+\\+ compiler"):
        C.compile_model(nn.Linear(2, 2))
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(torch, "__version__", "2.3.1")
    assert "older than 2.4" in C.unavailable_reason(torch.device("cpu"))


def test_help_names_the_option(capsys):
    for command in ("train", "evaluate", "predict"):
        with pytest.raises(SystemExit):
            main([command, *(["lenet"] if command == "train" else []), "--help"])
        out = capsys.readouterr().out
        assert "--compile, --no-compile" in out or "--compile | --no-compile" in out
    with pytest.raises(SystemExit):
        main(["train", "lenet", "--help"])
    assert "1.2x" in capsys.readouterr().out


def test_evaluate_refuses_compile_with_int8(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "lenet", "--data", "digits", "--limit", "64", "--epochs", "1",
                 "--batch-size", "32", "--quiet", "--no-compile", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--compile", "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --compile does not go with --quantize int8") and "\n" not in err
    assert main(["predict", str(tmp_path / "x.onnx"), "img.png", "--compile"]) == 2
    assert "not an ONNX file" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_and_predict_compiled_print_the_same(tmp_path, capsys):
    """A LeNet run evaluated and asked for predictions with and without --compile."""
    from PIL import Image

    run = tmp_path / "run"
    assert main(["train", "lenet", "--data", "digits", "--limit", "64", "--epochs", "1",
                 "--batch-size", "32", "--quiet", "--out", str(run)]) == 0
    images = []
    for i in range(2):
        path = tmp_path / f"d{i}.png"
        Image.fromarray((torch.rand(8, 8, generator=torch.Generator().manual_seed(i)) * 255)
                        .to(torch.uint8).numpy()).save(path)
        images.append(str(path))
    capsys.readouterr()
    shown = {}
    for flag in ("--no-compile", "--compile"):
        assert main(["evaluate", str(run), flag]) == 0
        evaluated = capsys.readouterr().out
        torch._dynamo.reset()
        assert main(["predict", str(run), *images, flag]) == 0
        shown[flag] = (evaluated, capsys.readouterr().out)
    assert shown["--compile"] == shown["--no-compile"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="inductor needs MSVC set up")
def test_compiled_lenet_with_channels_last(tmp_path):
    """LeNet (2-D convolutions: channels_last on by default) compiled, as the benchmark runs
    it: the same losses as eager to 1e-5."""
    from divekit.tasks.classify import ClassificationTask, ClassifyConfig

    rows = {}
    for compile in (False, True):
        cfg = ClassifyConfig(model="lenet", data="digits", epochs=1, limit=96, batch_size=32,
                             lr=0.05, quiet=True, device="cpu", compile=compile,
                             scheduler="none")
        trainer = Trainer(ClassificationTask(cfg), cfg)
        assert trainer.channels_last and trainer.compiled == compile
        rows[compile] = trainer.fit()[0]
    for key in ("train_loss", "val_loss"):
        assert rows[True][key] == pytest.approx(rows[False][key], abs=1e-5, rel=0)


def _losses(tmp, compile: bool, **options) -> dict[str, float]:
    torch._dynamo.reset()
    cfg = TrainConfig(epochs=1, lr=0.1, quiet=True, compile=compile, **options)
    return Trainer(Points(cfg), cfg, run_dir=tmp).fit()[0]


@pytest.mark.slow
def test_compiled_with_amp_matches_eager_amp(tmp_path):
    """bfloat16 autocast compiled and eager: the same losses to bfloat16's precision (the
    compiled kernels may round the fused operations differently)."""
    eager = _losses(tmp_path / "e", False, device="cpu", amp=True)
    compiled = _losses(tmp_path / "c", True, device="cpu", amp=True)
    for key in ("train_loss", "val_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_on_cuda_matches_eager(tmp_path):
    """On CUDA (Triton kernels): fp32 compiled = eager to 1e-4 (TF32 off), and with AMP."""
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = _losses(tmp_path / "e", False, device="cuda")
    compiled = _losses(tmp_path / "c", True, device="cuda")
    for key in ("train_loss", "val_loss"):
        assert compiled[key] == pytest.approx(eager[key], abs=1e-4, rel=0)
    eager = _losses(tmp_path / "ea", False, device="cuda", amp=True)
    compiled = _losses(tmp_path / "ca", True, device="cuda", amp=True)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=2e-2)


def test_argparse_tristate():
    """train's --compile is a tristate: absent (auto), --compile, --no-compile."""
    from divekit.config import add_config_options

    p = argparse.ArgumentParser()
    add_config_options(p, TrainConfig)
    assert "compile" not in vars(p.parse_args([]))
    assert p.parse_args(["--compile"]).compile is True
    assert p.parse_args(["--no-compile"]).compile is False
