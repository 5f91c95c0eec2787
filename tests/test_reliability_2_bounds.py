"""issue 25, item 4: every size a user gives has an upper bound, checked before anything is
allocated, refused in one line (exit 2) above it, or the input is cut while it is read.

The user's commands: a 50 MB QA passage (6 GB, time-out), ``embed -i`` on a 50 MB line (95 s,
6 GB, then echoed whole), ``translate --beam 100000`` (time-out), ``hw simulate --mode cycle
--array 2048x2048`` (time-out), ``kernel-regression --n-train 1e8`` (killed for memory) and
``finetune --adapters 1e8`` (a 51 GB allocation error).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from divekit.cli import main
from divekit.errors import DivekitError

pytest.importorskip("tokenizers")
from test_reliability_2_base_hash import write_tiny_base  # noqa: E402  (the tiny BERT base)


def _refused(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def test_translate_beam_and_batch_are_bounded(tmp_path, capsys):
    """Checked before the run is even opened: no run directory is needed to be refused."""
    line = _refused(capsys, main(["translate", str(tmp_path), "x", "--beam", "100000"]))
    assert "--beam" in line and "at most 256" in line and "100000" in line
    line = _refused(capsys, main(["translate", str(tmp_path), "x", "--batch-size", "10000000"]))
    assert "--batch-size" in line and "at most 4096" in line


def test_translate_refuses_more_sentences_than_the_bound_before_decoding():
    """The task layer's bound on the sentences of one call (``translate -i FILE``'s line
    count): refused before the model or the vocabularies are touched."""
    from divekit.tasks.translate_decode import MAX_SENTENCES, translate_sentences

    class Untouchable:
        def __getattr__(self, name: str):
            raise AssertionError(f"touched .{name} before the bound was checked")

    with pytest.raises(DivekitError, match=f"at most {MAX_SENTENCES:,} at a time") as info:
        translate_sentences(Untouchable(), ["un chat ."] * (MAX_SENTENCES + 1), Untouchable(),
                            Untouchable(), 8)
    assert f"{MAX_SENTENCES + 1:,} sentences" in str(info.value)


def test_translate_i_over_the_line_bound_is_one_line(tmp_path, capsys, monkeypatch):
    """``divekit translate RUN -i FILE`` with one line more than the bound (lowered to 5 here):
    one line, exit 2, nothing printed; at the bound it translates every line."""
    import divekit.tasks.translate_decode as decode
    from divekit.engine.run import make_config, train
    from divekit.tasks.translate import TranslateConfig, TranslationTask

    run = tmp_path / "mt"
    train(TranslationTask(make_config(TranslateConfig, {
        "model": "seq2seq", "data": "numbers-fr", "max_examples": 64, "batch_size": 32,
        "bleu_examples": 4, "quiet": True, "device": "cpu", "embed_size": 8, "num_hiddens": 8,
        "num_layers": 1, "epochs": 1, "out": str(run)})))
    monkeypatch.setattr(decode, "MAX_SENTENCES", 5)
    lines = tmp_path / "in.txt"
    lines.write_text("j'ai deux chats .\n" * 6, encoding="utf-8")
    capsys.readouterr()
    line = _refused(capsys, main(["translate", str(run), "-i", str(lines), "--device", "cpu"]))
    assert "more than 5 lines" in line and "at most 5" in line  # read no further
    assert capsys.readouterr().out == ""
    lines.write_text("j'ai deux chats .\n" * 5, encoding="utf-8")
    assert main(["translate", str(run), "-i", str(lines), "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_hw_cycle_mode_is_bounded_by_its_work(capsys):
    line = _refused(capsys, main(["hw", "simulate", "lenet", "--mode", "cycle", "--array",
                                  "2048x2048"]))
    assert "PE-cycles" in line and "--mode analytic" in line
    line = _refused(capsys, main(["hw", "simulate", "lenet", "--array", "100000x4"]))
    assert "at most 65536" in line
    line = _refused(capsys, main(["hw", "simulate", "lenet", "--batch", "100000000"]))
    assert "--batch" in line and "at most 65536" in line
    assert main(["hw", "simulate", "lenet", "--mode", "cycle", "--array", "16x16"]) == 0


def test_hw_cycle_work_is_the_closed_form_cycles_times_the_pes():
    """The bound's estimate, against a count made here: each layer's GEMM through
    gemm_cycles, times R·C, summed (lenet's layers, traced)."""
    from divekit.hardware.analytic import ArraySpec, gemm_cycles
    from divekit.hardware.zoo import cycle_work, trace_model
    from divekit.models import create_model

    traced, _ = trace_model(create_model("lenet", num_classes=10, in_channels=1), (1, 28, 28))
    array = ArraySpec(8, 4, "ws")
    want = sum(gemm_cycles(t.shape.m * 3, t.shape.n, t.shape.k, array).cycles * 32
               for t in traced)
    assert cycle_work(traced, array, batch=3) == want > 0


def test_kernel_regression_sizes_are_bounded(tmp_path, capsys):
    line = _refused(capsys, main(["kernel-regression", "--n-train", "100000000", "-o",
                                  str(tmp_path / "k")]))
    assert "--n-train" in line and "2000" in line
    line = _refused(capsys, main(["kernel-regression", "--epochs", "100000000", "-o",
                                  str(tmp_path / "k")]))
    assert "--epochs" in line
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("flag,limit", [("--adapters", "4096"), ("--lora", "1024")])
def test_finetune_adapter_and_lora_sizes_are_bounded(tmp_path, capsys, flag, limit):
    line = _refused(capsys, main(["finetune", "minilm", "--task", "classify", flag, "100000000",
                                  "--out", str(tmp_path / "r"), "--device", "cpu"]))
    assert flag in line and limit in line
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_base(tmp_path_factory.mktemp("base") / "tiny", seed=0)


def test_embed_cuts_a_huge_line_while_reading_and_shows_it_short(base, tmp_path, capsys):
    from divekit.tasks.embed import MAX_LINE_CHARS, Embedder

    long = ("great kettle " * (3 * MAX_LINE_CHARS // 13 + 1)).strip()
    assert len(long) > 2 * MAX_LINE_CHARS
    path = tmp_path / "lines.txt"
    path.write_text(f"a great lamp\n{long}\n\nthe end\n")
    out = tmp_path / "e.npy"
    assert main(["embed", str(base), "-i", str(path), "-o", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    notes = [ln for ln in captured.err.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1 and "1 line(s)" in notes[0] and "cut" in notes[0]
    import numpy as np

    got = torch.from_numpy(np.load(out))
    want = Embedder(str(base)).embed(["a great lamp", long[:MAX_LINE_CHARS].strip(), "the end"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert main(["embed", str(base), "-i", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and max(len(ln) for ln in printed) < 400


@pytest.fixture(scope="module")
def qa_run(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qa") / "run"
    code = main(["finetune", str(base), "--task", "qa", "--epochs", "1", "--limit", "8",
                 "--batch-size", "8", "--max-len", "32", "--doc-stride", "8", "--device", "cpu",
                 "--quiet", "--out", str(out)])
    assert code == 0
    return out


def test_a_qa_passage_over_the_limit_is_refused_in_one_line(qa_run, tmp_path, capsys):
    from divekit.tasks.bert_finetune_io import MAX_INPUT_CHARS

    big = tmp_path / "big.txt"
    big.write_text("anna lives in paris . " * (MAX_INPUT_CHARS // 22 + 2))
    capsys.readouterr()
    line = _refused(capsys, main(["predict", str(qa_run), f"where does anna live ||| @{big}",
                                  "--device", "cpu"]))
    assert "longer than the limit" in line and f"{MAX_INPUT_CHARS:,}" in line


def test_long_passages_run_in_chunks_and_give_the_one_batch_answer(qa_run, monkeypatch):
    """A passage of ~100 windows runs QA_CHUNK windows at a time; the answer is the one of all
    the windows in one batch (QA_CHUNK set past the number of windows)."""
    import divekit.tasks.finetune_heads as heads
    from divekit.engine.run import load_run

    run = load_run(qa_run, "cpu")
    passage = " ".join(f"person{i} lives in city{i} ." for i in range(300))
    item = f"where does person7 live ||| {passage}"
    chunked = run.task.predict(run.model, [item])[0]
    monkeypatch.setattr(heads, "QA_CHUNK", 10**6)
    whole = run.task.predict(run.model, [item])[0]
    assert chunked["answer"] == whole["answer"] and chunked["start"] == whole["start"]
    assert chunked["score"] == pytest.approx(whole["score"], abs=1e-4)


def test_predict_refuses_an_inline_text_over_the_limit():
    from divekit.tasks.bert_finetune_io import MAX_INPUT_CHARS, predict_inputs

    with pytest.raises(DivekitError, match="over the limit"):
        predict_inputs(["x" * (MAX_INPUT_CHARS + 1)], "classify")
