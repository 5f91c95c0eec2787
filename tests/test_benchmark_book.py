"""benchmarks/book.py's own pieces: the metrics it reads from each side's printed lines, the
medians/ranges and the verdict of its table, the data it stages, and the decoder it writes on
the side's ``d2l.Decoder``. (Running the script is tests/test_benchmarks_smoke.py's job.)"""

from __future__ import annotations

import importlib.util
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from divekit.data.idx import read_idx, write_idx

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("book_benchmark", ROOT / "benchmarks" / "book.py")
book = importlib.util.module_from_spec(spec)
spec.loader.exec_module(book)

BOOK_CH8 = """time travellere te te te te te te te te
<Figure size 350x250 with 1 Axes>
\x1b[2K\r\x1b[2K\r<Figure size 350x250 with 1 Axes>
\x1b[2Kperplexity 12.6, 19829.2 tokens/sec on cpu
time traveller the the the
traveller the the the
"""
COMPAT_SEQ2SEQ = """loss 0.057, 4321.0 tokens/sec on cpu
go . => va !, bleu 1.000
i lost . => j'ai perdu ., bleu 1.000
he's calm . => il est riche ., bleu 0.658
i'm home . => je suis , bleu nan
"""


def test_metric_text_keeps_the_metrics_and_drops_the_speed():
    assert book.metric_text(BOOK_CH8) == "perplexity 12.6"
    out = "training on cpu\nloss 0.441, train acc 0.863, test acc 0.915\n3325.3 examples/sec on cpu\n"
    assert book.metric_text(out) == "loss 0.441, train acc 0.863, test acc 0.915"
    assert book.metric_text("MLM loss 5.669, NSP loss 1.069\n12.0 sentence pairs/sec on cpu") \
        == "MLM loss 5.669, NSP loss 1.069"
    # the book's bleu that divided by zero makes the mean nan, and says so
    assert book.metric_text(COMPAT_SEQ2SEQ) == "loss 0.057, mean bleu nan"
    assert book.metric_text(COMPAT_SEQ2SEQ.replace("bleu nan", "bleu 0.000")) == \
        f"loss 0.057, mean bleu {(1 + 1 + 0.658 + 0) / 4:.3f}"
    assert book.metric_text("nothing here") == "(no metric line)"


def test_summarize_metrics_medians_and_ranges():
    texts = ["loss 0.500, test acc 0.900", "loss 0.300, test acc 0.900", "loss 0.400, test acc 0.880"]
    text, ranges = book.summarize_metrics(texts)
    assert text == "loss 0.400 [0.300-0.500], test acc 0.900 [0.880-0.900]"
    assert ranges == [(0.3, 0.5), (0.88, 0.9)]
    assert book.summarize_metrics(["perplexity 12.6"]) == ("perplexity 12.6", [(12.6, 12.6)])
    # differently shaped lines are shown as they are, without ranges
    assert book.summarize_metrics(["loss 0.1", "(no metric line)"]) == \
        ("loss 0.1 | (no metric line)", [])


def test_overlap_and_verdict():
    assert book.overlap([(0.3, 0.5)], [(0.45, 0.6)]) is True
    assert book.overlap([(0.3, 0.5)], [(0.51, 0.6)]) is False
    assert book.overlap([(0.3, 0.5)], [(0.51, 0.6)], tolerance=0.02) is True
    assert book.overlap([], []) is None
    assert book.verdict([1.6, 2.0, 1.5]) == "met"
    assert book.verdict([1.2, 1.49]) == "not met"
    assert book.verdict([1.4, 1.7]) == "not settled"
    assert book.spread([3.0, 1.0, 2.0]) == "2.00 (1.00-3.00)"
    assert book.spread([1.234]) == "1.23"


def test_table_without_the_peer_says_skipped():
    run = {"seconds": 1.0, "import_s": 2.0, "stdout": "perplexity 9.9, 1.0 tokens/sec on cpu"}
    out = book.table({"gru": {"compat": [run]}}, with_book=False)
    assert "| gru | 1.00 | peer skipped | - | perplexity 9.9 |" in out
    both = book.table({"gru": {"compat": [run, {**run, "seconds": 2.0}],
                               "book": [{**run, "seconds": 3.0}, {**run, "seconds": 3.0}]}},
                      with_book=True)
    assert "| gru | 1.50 (1.00-2.00) | 3.00 (3.00-3.00) | 2.25 (1.50-3.00)x |" in both
    assert "| met | yes |" in both


def test_idx_subset_keeps_the_first_items(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    book._idx_subset(tmp_path / "x-idx3-ubyte.gz", tmp_path / "x-idx3-ubyte", 5)
    assert (tmp_path / "x-idx3-ubyte").read_bytes()[:2] == b"\0\0"  # not gzipped
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte"), images[:5])
    with pytest.raises(SystemExit, match="fewer than the 8"):
        book._idx_subset(tmp_path / "x-idx3-ubyte.gz", tmp_path / "y", 8)


@pytest.mark.skipif(not (book.SHARED_DATA / "wikitext-2" / "valid.txt").is_file()
                    or not (book.SHARED_DATA / "fra-eng" / "fra.txt").is_file(),
                    reason="../shared/data absent")
def test_staged_archives_match_their_registered_sha1(tmp_path):
    import hashlib

    env = book.stage("bert", book.SMOKE["bert"], tmp_path / "bert")
    data = tmp_path / "bert" / "data"
    assert hashlib.sha1((data / "wikitext-2-v1.zip").read_bytes()).hexdigest() == \
        env["BOOK_BENCH_WIKI_SHA1"]
    with zipfile.ZipFile(data / "wikitext-2-v1.zip") as z:
        text = z.read("wikitext-2/wiki.train.tokens").decode()
    assert text == (data / "wikitext-2" / "wiki.train.tokens").read_text()
    assert len(text.splitlines()) == book.SMOKE["bert"]["lines"]
    env = book.stage("seq2seq", book.SMOKE["seq2seq"], tmp_path / "nmt")
    archive = tmp_path / "nmt" / "data" / "fra-eng.zip"
    assert hashlib.sha1(archive.read_bytes()).hexdigest() == env["BOOK_BENCH_FRA_SHA1"]
    with zipfile.ZipFile(archive) as z:
        assert len(z.read("fra-eng/fra.txt").decode().splitlines()) == \
            book.SMOKE["seq2seq"]["pairs"]


def test_the_decoder_on_the_compat_decoder_keeps_the_context():
    from divekit.compat import d2l

    torch.manual_seed(0)
    decoder = book.gru_decoder(d2l)(vocab_size=11, embed_size=4, num_hiddens=6, num_layers=2)
    assert isinstance(decoder, d2l.Decoder)
    encoder = d2l.Seq2SeqEncoder(9, 4, 6, 2)
    X = torch.randint(0, 9, (3, 5))
    state = decoder.init_state(encoder(X))
    hidden, context = state
    assert hidden.shape == (2, 3, 6) and torch.equal(context, hidden[-1])
    Y, (hidden2, context2) = decoder(torch.randint(0, 11, (3, 4)), state)
    assert Y.shape == (3, 4, 11) and context2 is context and hidden2.shape == (2, 3, 6)
    # one step at a time gives the same outputs as the whole sequence (teacher forcing)
    tokens = torch.randint(0, 11, (3, 4))
    decoder.eval()
    whole, _ = decoder(tokens, state)
    steps, s = [], state
    for t in range(4):
        y, s = decoder(tokens[:, t:t + 1], s)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole)


def test_scratch_gru_matches_the_gru_equations_step_by_step():
    get_params, init_state, forward = book.gru_functions()
    torch.manual_seed(0)
    V, H, B, T = 5, 4, 2, 3
    params = [p.detach() + torch.randn_like(p) * 0.3 for p in get_params(V, H, "cpu")]
    inputs = torch.nn.functional.one_hot(torch.randint(0, V, (T, B)), V).float()
    (h0,) = init_state(B, H, "cpu")
    h0 = torch.randn_like(h0)
    Y, (h,) = forward(inputs, (h0,), params)
    W_x, W_hzr, W_hc, b, W_out, b_out = params
    sig = torch.sigmoid
    ref = h0
    outs = []
    for t in range(T):  # the course's GRU, each gate written out
        x = inputs[t]
        z = sig(x @ W_x[:, :H] + ref @ W_hzr[:, :H] + b[:H])
        r = sig(x @ W_x[:, H:2 * H] + ref @ W_hzr[:, H:] + b[H:2 * H])
        cand = torch.tanh(x @ W_x[:, 2 * H:] + (r * ref) @ W_hc + b[2 * H:])
        ref = z * ref + (1 - z) * cand
        outs.append(ref @ W_out + b_out)
    torch.testing.assert_close(Y, torch.cat(outs))
    torch.testing.assert_close(h, ref)
    assert not math.isnan(float(Y.sum()))


def _encoded(d2l, batch: int = 3, steps: int = 5, hidden: int = 6):
    encoder = d2l.Seq2SeqEncoder(9, 4, hidden, 2)
    encoder.eval()
    X = torch.randint(0, 9, (batch, steps))
    return encoder(X)


def test_the_attention_decoder_reads_only_the_valid_encoder_steps():
    from divekit.compat import d2l

    torch.manual_seed(0)
    decoder = book.attention_gru_decoder(d2l)(11, embed_size=4, num_hiddens=6, num_layers=2)
    decoder.eval()
    assert isinstance(decoder, d2l.AttentionDecoder)
    outputs, hidden = _encoded(d2l)
    valid = torch.tensor([2, 5, 3])
    state = decoder.init_state((outputs, hidden), valid)
    assert state[0].shape == (3, 5, 6)  # keys batch-first
    tokens = torch.randint(0, 11, (3, 4))
    whole, _ = decoder(tokens, state)
    assert whole.shape == (3, 4, 11)
    # one step at a time (as predict_seq2seq decodes) gives the same outputs
    steps, s = [], state
    for t in range(4):
        y, s = decoder(tokens[:, t:t + 1], s)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole)
    # encoder steps past each sentence's valid length are masked out: changing them changes
    # nothing (the first sentence's steps 2.. and the third's 3..)
    changed = outputs.clone()
    changed[2:, 0] += 5.0
    changed[3:, 2] -= 5.0
    again, _ = decoder(tokens, decoder.init_state((changed, hidden), valid))
    torch.testing.assert_close(again, whole)
    changed[1, 0] += 5.0  # a valid step of the first sentence does count
    moved, _ = decoder(tokens, decoder.init_state((changed, hidden), valid))
    assert not torch.allclose(moved[0], whole[0]) and torch.allclose(moved[1:], whole[1:])


def test_the_transformer_decoder_is_causal_while_training_and_caches_while_decoding():
    from divekit.compat import d2l

    torch.manual_seed(0)
    h, B, T = 8, 2, 5
    encoder = d2l.TransformerEncoder(9, h, h, h, h, [h], h, 16, 2, 2, 0.0)
    decoder = book.transformer_decoder(d2l)(11, h, 16, 2, 2, 0.0)
    assert isinstance(decoder, d2l.AttentionDecoder)
    X, valid = torch.randint(0, 9, (B, 4)), torch.tensor([4, 2])
    enc = encoder(X, valid)
    tokens = torch.randint(0, 11, (B, T))
    decoder.train()  # dropout 0: deterministic; teacher forcing with the causal mask
    whole, state = decoder(tokens, decoder.init_state(enc, valid))
    assert whole.shape == (B, T, 11) and all(seen.shape == (B, T, h) for seen in state[2])
    later = tokens.clone()
    later[:, 3:] = (later[:, 3:] + 1) % 11  # later tokens cannot change earlier outputs
    other, _ = decoder(later, decoder.init_state(enc, valid))
    torch.testing.assert_close(other[:, :3], whole[:, :3])
    assert not torch.allclose(other[:, 3:], whole[:, 3:])
    decoder.eval()  # decoding: each block keeps its inputs so far as keys and values
    s = decoder.init_state(enc, valid)
    for t in range(3):
        y, s = decoder(tokens[:, t:t + 1], s)
        assert y.shape == (B, 1, 11) and all(seen.shape == (B, t + 1, h) for seen in s[2])
