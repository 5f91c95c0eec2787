"""issue 25, item 8: refusals that were not one line.

* a BERT directory whose ``pytorch_model.bin`` is a pickle asking for more than tensors was
  refused with torch's multi-line message, which advises ``weights_only=False``;
* binary or UTF-16 topology and ``.cfg`` files, and SQuAD (QA) data files, gave a
  ``UnicodeDecodeError`` (exit 1);
* a long text gave one warning per text, by the hundred.
"""

from __future__ import annotations

import datetime
import shutil
import warnings

import pytest
import torch

from divekit.cli import main

pytest.importorskip("tokenizers")
from test_reliability_2_base_hash import write_tiny_base  # noqa: E402


def _one_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def test_a_pickled_bert_bin_is_refused_in_divekits_line_without_torchs_advice(tmp_path, capsys):
    base = write_tiny_base(tmp_path / "base", seed=0)
    state = {k: torch.zeros(1) for k in ["x"]}
    state["made"] = datetime.date(2020, 1, 1)  # a global weights_only refuses
    (base / "model.safetensors").unlink()
    torch.save(state, base / "pytorch_model.bin")
    line = _one_line(capsys, main(["embed", str(base), "a text"]))
    assert "pytorch_model.bin" in line and "safetensors" in line
    assert "weights_only=False" not in line


@pytest.mark.parametrize("encoding", ["utf-16", "binary"])
def test_binary_or_utf16_topology_and_config_are_one_line(tmp_path, capsys, encoding):
    from pathlib import Path

    hw = Path(__file__).parent / "fixtures" / "hardware"
    for name, argv in [("t.csv", ["--topology"]), ("c.cfg", ["--config"])]:
        path = tmp_path / name
        source = hw / ("test.csv" if name == "t.csv" else "scale_32x32_ws.cfg")
        path.write_bytes(source.read_text().encode("utf-16") if encoding == "utf-16"
                         else bytes(range(256)) * 4)
        extra = [] if name == "t.csv" else ["--topology", str(hw / "test.csv")]
        line = _one_line(capsys, main(["hw", "simulate", *extra, *argv, str(path)]))
        assert str(path) in line and "not UTF-8 text" in line


def test_many_long_texts_give_one_warning(tmp_path):
    from divekit.tokenizers import BertTokenizer

    base = write_tiny_base(tmp_path / "base", seed=0)
    tok = BertTokenizer.load(base, max_len=16)
    texts = [f"great kettle number {i} " * 20 for i in range(200)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = tok.encode_batch(texts)
    assert all(len(ids) == 16 for ids, _ in rows)
    shown = [w for w in caught if "truncated" in str(w.message)]
    assert len(shown) == 1 and "199 more text(s)" in str(shown[0].message)
    shutil.rmtree(base)


def test_an_overflowing_seed_is_one_line(tmp_path, capsys):
    line = _one_line(capsys, main(["kernel-regression", "--seed", str(10**20), "-o",
                                   str(tmp_path / "k")]))
    assert "--seed must be in [0, 2^32)" in line


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_in_proc_is_one_line(capsys):
    line = _one_line(capsys, main(["hw", "simulate", "--topology",
                                   str(__import__("pathlib").Path(__file__).parent / "fixtures"
                                       / "hardware" / "test.csv"), "--csv", "/proc/x.csv"]))
    assert "cannot write /proc/x.csv" in line


def test_a_csv_field_over_128_kb_is_one_line(tmp_path, capsys):
    path = tmp_path / "big.csv"
    path.write_text("text,label\n" + "a" * 200_000 + ",positive\nok,negative\n")
    line = _one_line(capsys, main(["finetune", "minilm", "--task", "classify", "--data",
                                   f"csv:{path}", "--out", str(tmp_path / "r"), "--device",
                                   "cpu"]))
    assert str(path) in line and "field larger than field limit" in line


@pytest.mark.parametrize("encoding", ["utf-16", "binary"])
def test_a_non_utf8_squad_file_is_one_line(tmp_path, capsys, encoding):
    """A SQuAD v1.1 file saved as UTF-16 (or not text at all) gave a bare UnicodeDecodeError
    (exit 1): now one line naming the file, and no run directory."""
    import json

    from divekit.data.text_tasks import read_squad
    from divekit.errors import DivekitError

    doc = {"data": [{"paragraphs": [{"context": "anna lives in paris .", "qas": [
        {"id": "q1", "question": "where does anna live",
         "answers": [{"text": "paris", "answer_start": 14}]}]}]}]}
    data = tmp_path / "squad"
    data.mkdir()
    text = json.dumps(doc)
    (data / "train-v1.1.json").write_bytes(text.encode("utf-16") if encoding == "utf-16"
                                           else bytes(range(256)) * 4)
    (data / "dev-v1.1.json").write_text(text, encoding="utf-8")
    assert [e.answers for e in read_squad(data / "dev-v1.1.json")] == [["paris"]]
    with pytest.raises(DivekitError, match="is not UTF-8 text"):
        read_squad(data / "train-v1.1.json")
    base = write_tiny_base(tmp_path / "base", seed=0)
    line = _one_line(capsys, main(["finetune", str(base), "--task", "qa", "--data", "squad",
                                   "--data-dir", str(data), "--epochs", "1", "--out",
                                   str(tmp_path / "r"), "--device", "cpu", "--quiet"]))
    assert str(data / "train-v1.1.json") in line and "not UTF-8 text" in line
    assert not (tmp_path / "r").exists()
