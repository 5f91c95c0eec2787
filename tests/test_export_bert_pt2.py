"""``divekit export RUN --format pt2`` on BERT fine-tuning runs (issue 23, item 5).

BERT's padding mask used to take a shortcut when nothing was padded, ``if (valid_lens >= T)
.all()``: a Python branch on tensor values, which ``torch.export`` cannot trace (it stopped at
``aten.item``), so ``--format pt2`` refused every BERT run. The mask is now tensor operations
only (:func:`divekit.ops.masking.key_padding_mask`). Here a tiny BERT (two layers, 32 wide,
written with ``save_pretrained``) is fine-tuned for a few steps, exported with a varying batch
and length, loaded back with ``torch.export.load``, and its outputs are compared with the run's
own eager model on padded and unpadded batches of other sizes than the export's example.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from divekit.cli import main
from divekit.data.text_generated import GENERATED
from divekit.engine.run import load_run
from divekit.export import export_run
from divekit.models.bert import BertConfig, BertModel
from divekit.models.bert_checkpoint import save_pretrained
from divekit.models.bert_heads import BertWithHead, make_head
from divekit.tokenizers import SPECIAL_TOKENS, BertTokenizer

pytest.importorskip("tokenizers")

TOL = 1e-5  # the same float32 operations, traced: differences are rounding only
MAX_LEN = 64


def tiny_base(directory: Path) -> Path:
    """A two-layer BERT checkpoint whose vocabulary is the generated reviews' words."""
    words = sorted({w.lower().strip(".,!?") for e in GENERATED["sentiment-gen"](seed=0).train
                    for w in e.text.split()} - {""} - set(SPECIAL_TOKENS))
    tok = BertTokenizer([*SPECIAL_TOKENS, *words], max_len=MAX_LEN)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), num_layers=2, num_hiddens=32, num_heads=2,
                                 ffn_num_hiddens=64, max_len=MAX_LEN, dropout=0.0))
    directory.mkdir(parents=True, exist_ok=True)
    return save_pretrained(model, tok, directory)


def batch(b: int, t: int, vocab: int, seed: int, padded: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random token ids, a pair's segments (0 then 1) and valid lengths; the first row is
    never padded, the others are when ``padded``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(len(SPECIAL_TOKENS), vocab, (b, t), generator=g)
    segments = (torch.arange(t) >= t // 2).long().expand(b, t).clone()
    valid = torch.randint(2, t + 1, (b,), generator=g) if padded else torch.full((b,), t)
    valid[0] = t
    return tokens, segments, valid


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bert-pt2")
    base = tiny_base(root / "base")
    out = root / "run"
    assert main(["finetune", str(base), "--task", "classify", "--epochs", "1", "--limit", "12",
                 "--batch-size", "6", "--max-len", "32", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 0
    return out


def test_a_bert_classify_run_exports_to_pt2_and_gives_the_runs_logits(classify_run, tmp_path):
    result = export_run(classify_run, "pt2", tmp_path / "bert.pt2", dynamic_batch=True)
    extra = {"divekit.json": ""}
    program = torch.export.load(str(result.path), extra_files=extra)
    meta = json.loads(extra["divekit.json"])
    assert meta["head"] == "classify" and meta["exporter"] == "torch.export"
    run = load_run(classify_run)
    vocab = len(run.task.tokenizer)
    # other batch sizes and lengths than the export's example (2 x 8), padded or not (the
    # unpadded batch is the case the old Python branch sent to another kernel)
    for b, t, padded in ((1, 5, True), (7, 13, True), (3, 8, False), (2, MAX_LEN, True)):
        tokens, segments, valid = batch(b, t, vocab, seed=b + t, padded=padded)
        with torch.no_grad():
            want = run.model(tokens, segments, valid)
            got = program.module()(tokens, segments, valid)
        assert got.shape == (b, len(run.task.labels))
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_the_export_command_writes_a_bert_pt2_file(classify_run, tmp_path, capsys):
    out = tmp_path / "cli.pt2"
    assert main(["export", str(classify_run), "--format", "pt2", "-o", str(out)]) == 0
    meta = json.loads(out.with_name("cli.pt2.json").read_text())  # the JSON beside it
    assert meta["format"] == "pt2" and meta["task"] == "bert_finetune"
    program = torch.export.load(str(out))
    run = load_run(classify_run)
    # batch 1: the command was not given --dynamic-batch
    tokens, segments, valid = batch(1, 9, len(run.task.tokenizer), seed=3)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(tokens, segments, valid),
                                   run.model(tokens, segments, valid), atol=TOL, rtol=0)


@pytest.mark.parametrize("head,outputs", [("tag", 5), ("qa", 2)])
def test_the_token_heads_trace_with_a_varying_length(head, outputs):
    """The tagging and question-answering heads (``(B, T, labels|2)`` outputs; QA's padding
    logits are -inf) export the same way, with the batch and the length both varying."""
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=60, num_layers=2, num_hiddens=32, num_heads=2,
                                ffn_num_hiddens=64, max_len=MAX_LEN, dropout=0.0))
    model = BertWithHead(bert.encoder, make_head(head, 32, outputs, 0.0)).eval()
    example = batch(2, 8, 60, seed=0)
    b, s = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2,
                                                                        max=MAX_LEN)
    program = torch.export.export(model, example,
                                  dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}, {0: b}))
    for n, t in ((1, 3), (5, 17)):
        tokens, segments, valid = batch(n, t, 60, seed=n * t)
        with torch.no_grad():
            want = model(tokens, segments, valid)
            got = program.module()(tokens, segments, valid)
        assert got.shape == (n, t, outputs)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)  # -inf matches -inf
