"""issue 25, item 2: a LoRA/adapter run records the SHA-256 of its base's weights and refuses,
in one line naming both hashes, to open (evaluate, predict, resume) when the base changed.

The user's finding: training the base further changed the LoRA run's predictions (0.524 ->
0.512) with exit 0. Here the base is a tiny BERT checkpoint written with ``save_pretrained``
(two layers, 32 wide), so a run takes a few seconds; the base then changes (other weights,
same shapes), as it would after more pretraining.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from divekit.cli import main
from divekit.data.text_generated import GENERATED
from divekit.models.bert import BertConfig, BertModel
from divekit.models.bert_checkpoint import save_pretrained
from divekit.tokenizers import SPECIAL_TOKENS, BertTokenizer

pytest.importorskip("tokenizers")


def write_tiny_base(directory: Path, seed: int) -> Path:
    """A tiny BERT checkpoint whose vocabulary is the generated reviews' words."""
    words = sorted({w.lower().strip(".,!?") for e in GENERATED["sentiment-gen"](seed=0).train
                    for w in e.text.split()} - {""} - set(SPECIAL_TOKENS))
    tok = BertTokenizer([*SPECIAL_TOKENS, *words], max_len=64)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tok), num_layers=2, num_hiddens=32, num_heads=2,
                                 ffn_num_hiddens=64, max_len=64, dropout=0.0))
    directory.mkdir(parents=True, exist_ok=True)
    return save_pretrained(model, tok, directory)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finetune(base: Path, out: Path, *extra: str) -> int:
    return main(["finetune", str(base), "--task", "classify", "--lora", "2", "--epochs", "1",
                 "--limit", "12", "--batch-size", "6", "--max-len", "32", "--device", "cpu",
                 "--quiet", "--out", str(out), *extra])


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture()
def lora_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    base = write_tiny_base(tmp_path / "base", seed=0)
    out = tmp_path / "lora"
    assert _finetune(base, out) == 0
    capsys.readouterr()
    return base, out


def test_the_run_records_the_sha256_of_its_base_weights(lora_run):
    base, out = lora_run
    record = json.loads((out / "config.json").read_text())
    assert record["adapter_only"] is True
    assert record["base_checkpoint"] == str(base.resolve())
    assert record["base_sha256"] == _sha(base / "model.safetensors")  # an independent hash


def test_an_unchanged_base_predicts_and_evaluates(lora_run, capsys):
    _, out = lora_run
    assert main(["predict", str(out), "a great kettle", "--device", "cpu"]) == 0
    assert "a great kettle:" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0


def test_a_changed_base_is_refused_in_one_line_naming_both_hashes(lora_run, capsys):
    base, out = lora_run
    then = _sha(base / "model.safetensors")
    write_tiny_base(base, seed=1)  # "trained further": same shapes, other weights
    now = _sha(base / "model.safetensors")
    assert now != then
    for command in (["predict", str(out), "a great kettle"], ["evaluate", str(out)]):
        assert main([*command, "--device", "cpu"]) == 2
        line = _one_error_line(capsys)
        assert then[:16] in line and now[:16] in line, line
        assert "train the run again" in line and "--force-resume" in line
    # a resume refuses too, before any training (the checkpoint is not touched)
    latest = (out / "checkpoint" / "latest").read_text()
    assert _finetune(base, out, "--resume", "--epochs", "2") == 2
    line = _one_error_line(capsys)
    assert then[:16] in line and now[:16] in line and "--force-resume" in line
    assert (out / "checkpoint" / "latest").read_text() == latest


def test_force_resume_continues_on_the_new_base_and_records_the_change(lora_run, capsys):
    base, out = lora_run
    then = _sha(base / "model.safetensors")
    write_tiny_base(base, seed=1)
    now = _sha(base / "model.safetensors")
    assert _finetune(base, out, "--resume", "--epochs", "2", "--force-resume") == 0
    record = json.loads((out / "config.json").read_text())
    assert record["base_sha256"] == now
    assert record["base_changes"] == [{"base_sha256": then, "now": now}]
    capsys.readouterr()
    assert main(["predict", str(out), "a great kettle", "--device", "cpu"]) == 0


def test_a_base_that_is_gone_is_refused_in_one_line(lora_run, capsys):
    base, out = lora_run
    (base / "model.safetensors").unlink()
    assert main(["predict", str(out), "a great kettle", "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "cannot be read" in line and "train the run again" in line


def test_image_fine_tuning_records_the_sha256_of_its_source_weights(tmp_path):
    """The issue's 'fine-tuning from a run or file': the run holds its whole weights (it never
    reads the source again), and records which source it was by hash."""
    torchvision = pytest.importorskip("torchvision")
    from divekit.tasks.finetune import FinetuneConfig, finetune

    torch.manual_seed(0)
    path = tmp_path / "resnet18-0123abcd.pth"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), path)
    out = tmp_path / "tv"
    finetune(FinetuneConfig(source=str(path), data="digits", classes="0-2", shots=4, epochs=1,
                            batch_size=12, resize=32, quiet=True, device="cpu", out=str(out)))
    record = json.loads((out / "config.json").read_text())
    assert record["source_sha256"] == _sha(path)


def test_a_self_contained_run_opens_without_its_base(tmp_path, capsys):
    """``--self-contained``: the LoRA run keeps its base's weights, BERT config and vocabulary,
    so it predicts the same after its base is changed or removed, and records no dependence on
    it (``adapter_only`` false). Its checkpoint holds every parameter of the model."""
    from safetensors.torch import load_file

    from divekit.engine.run import load_run

    base = write_tiny_base(tmp_path / "base", seed=0)
    out = tmp_path / "lora"
    assert _finetune(base, out, "--self-contained") == 0
    record = json.loads((out / "config.json").read_text())
    assert record["self_contained"] is True and record["adapter_only"] is False
    assert record["bert_config"]["num_hiddens"] == 32
    run = load_run(out)
    stored = load_file(str(run.latest_weights()))
    assert set(stored) == set(run.model.state_dict())  # the base's tensors are in the run
    capsys.readouterr()
    assert main(["predict", str(out), "a great kettle", "--device", "cpu"]) == 0
    before = capsys.readouterr().out
    write_tiny_base(base, seed=1)  # the base changes ...
    assert main(["predict", str(out), "a great kettle", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == before
    for f in base.iterdir():  # ... and then is gone
        f.unlink()
    base.rmdir()
    assert main(["predict", str(out), "a great kettle", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == before
    assert main(["evaluate", str(out), "--device", "cpu"]) == 0
