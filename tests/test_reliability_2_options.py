"""issue 25, item 6: options silently dropped or accepted out of range are refused in one line
(exit 2), from the user's commands:

* ``hw simulate --config X.cfg`` ignored ``--array``/``--dataflow``; ``lenet --config`` ignored
  the config; ``--plot`` with ``--topology`` wrote nothing; ``--clock-ghz nan|inf`` and
  ``--bandwidth-gbs nan`` printed ``nan ms``;
* ``--lora-targets`` without ``--lora``, ``--unfreeze`` alone, ``embed --top-k`` without
  ``--similar`` and ``--text-columns a,b,c`` on embedded data were accepted;
* ``predict`` on a text run classified ``file.jsonl``, ``.json``, ``.txt`` or a binary file's
  name as a sentence.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from divekit.cli import main

HW = Path(__file__).parent / "fixtures" / "hardware"
TOPOLOGY, CFG = str(HW / "test.csv"), str(HW / "scale_32x32_ws.cfg")


def _refused(capsys: pytest.CaptureFixture[str], code: int, *words: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    for word in words:
        assert word in err[0], (word, err[0])
    return err[0]


@pytest.mark.parametrize("argv,words", [
    (["--topology", TOPOLOGY, "--config", CFG, "--array", "8x8"], ["--config", "--array"]),
    (["--topology", TOPOLOGY, "--config", CFG, "--dataflow", "os"], ["--dataflow"]),
    (["lenet", "--config", CFG], ["--config", "--topology"]),
    (["--topology", TOPOLOGY, "--plot", "x.png"], ["--plot"]),
    (["lenet", "--clock-ghz", "nan"], ["--clock-ghz", "finite"]),
    (["lenet", "--clock-ghz", "inf"], ["--clock-ghz", "finite"]),
    (["lenet", "--bandwidth-gbs", "nan"], ["--bandwidth-gbs", "finite"]),
])
def test_hw_simulate_refuses_dropped_and_non_finite_options(argv, words, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, main(["hw", "simulate", *argv]), *words)
    assert not (tmp_path / "x.png").exists()


def test_hw_simulate_still_takes_each_option_alone(capsys):
    assert main(["hw", "simulate", "--topology", TOPOLOGY, "--config", CFG]) == 0
    assert "32x32 ws array" in capsys.readouterr().out
    assert main(["hw", "simulate", "--topology", TOPOLOGY, "--array", "8x8", "--dataflow",
                 "os"]) == 0
    assert "8x8 os array" in capsys.readouterr().out
    assert main(["hw", "simulate", "lenet", "--array", "16x16", "--clock-ghz", "0.7"]) == 0


@pytest.mark.parametrize("extra,words", [
    (["--lora-targets", "key"], ["--lora-targets", "--lora R"]),
    (["--lora-alpha", "8"], ["--lora-alpha"]),
    (["--unfreeze"], ["--unfreeze"]),
    (["--text-columns", "a,b,c"], ["--text-columns", "one column or two"]),
    (["--text-columns", "body"], ["--text-columns", "csv:PATH"]),
    (["--label-column", "stars"], ["--label-column", "csv:PATH"]),
])
def test_finetune_refuses_options_without_the_one_they_need(extra, words, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "minilm", "--task", "classify", "--out", str(out), "--device",
                 "cpu", *extra])
    _refused(capsys, code, *words)
    assert not out.exists()


def test_embed_refuses_top_k_without_similar_and_similar_with_output(tmp_path, capsys):
    _refused(capsys, main(["embed", "minilm", "a text", "--top-k", "3"]), "--top-k", "--similar")
    _refused(capsys, main(["embed", "minilm", "a text", "--similar", "q", "-o",
                           str(tmp_path / "e.npy")]), "--similar", "-o")
    assert not (tmp_path / "e.npy").exists()


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    pytest.importorskip("tokenizers")
    from test_reliability_2_base_hash import write_tiny_base

    root = tmp_path_factory.mktemp("text")
    base = write_tiny_base(root / "base", seed=0)
    out = root / "run"
    assert main(["finetune", str(base), "--task", "classify", "--epochs", "1", "--limit", "8",
                 "--batch-size", "8", "--max-len", "32", "--device", "cpu", "--quiet", "--out",
                 str(out)]) == 0
    return out


def test_predict_on_a_text_run_refuses_file_names_as_sentences(text_run, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("a great kettle\n")
    Path("blob.bin").write_bytes(bytes(range(256)))
    capsys.readouterr()
    for name in ["reviews.jsonl", "reviews.json", "notes.txt", "blob.bin"]:
        _refused(capsys, main(["predict", str(text_run), name, "--device", "cpu"]), repr(name))
    assert main(["predict", str(text_run), "a great kettle", "--device", "cpu"]) == 0
    assert "a great kettle:" in capsys.readouterr().out


def test_segmentation_limit_keeps_a_validation_set_worth_a_mean_iou(capsys):
    """`--limit 8` cut segmentation's validation to one image; it now keeps N/5, at least 16,
    and --help says so."""
    from divekit.data import load_dataset

    data = load_dataset("shapes-seg", limit=8, size=32)
    assert len(data.train_images) == 8 and len(data.val_images) == 16
    big = load_dataset("shapes-seg", limit=100, size=32)
    assert len(big.val_images) == 20
    with pytest.raises(SystemExit):
        main(["train", "fcn_resnet18", "--help"])
    assert "validation keeps N/5 of its images, at least 16" in " ".join(
        capsys.readouterr().out.split())


def test_val_size_with_val_fraction_is_refused(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    """``train seq2seq --val-size 4 --val-fraction 0.2`` held out 4 pairs and dropped the
    fraction silently (found by the option-pair fuzz); now one line, before any data loads."""
    code = main(["train", "seq2seq", "--data", "numbers-fr", "--val-size", "4",
                 "--val-fraction", "0.2", "--out", str(tmp_path / "run")])
    _refused(capsys, code, "--val-size 4", "--val-fraction 0.2", "give one")
    assert not (tmp_path / "run").exists()
