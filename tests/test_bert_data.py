"""BERT pretraining data: paragraphs, NSP pairs, 80/10/10 masking statistics, the task's steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from divekit.data.bert_pretrain import (
    BertPretrainLoader,
    SentenceCorpus,
    pack_pairs,
    pydoc_paragraphs,
    read_wikitext2,
    wiki_paragraphs,
)
from divekit.errors import DivekitError

pytest.importorskip("tokenizers")

FIXTURES = Path(__file__).parent / "fixtures" / "bert"
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
VOCAB = 60


def _corpus(seed: int = 0, paragraphs: int = 300) -> SentenceCorpus:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(paragraphs):
        n = int(torch.randint(2, 6, (1,), generator=g))
        out.append([torch.randint(5, VOCAB, (int(torch.randint(3, 30, (1,), generator=g)),),
                                  generator=g).tolist() for _ in range(n)])
    return SentenceCorpus.from_ids(out)


def _loader(corpus: SentenceCorpus, **kw) -> BertPretrainLoader:
    return BertPretrainLoader(corpus, batch_size=kw.pop("batch_size", 128), max_len=kw.pop("max_len", 48),
                              vocab_size=VOCAB, special_ids=SPECIAL, **kw)


def test_wikitext_paragraphs_as_the_course_reads_them():
    data = read_wikitext2(FIXTURES)
    assert data["train"] == [
        ["The game began development in 2010 , carrying over a large portion of the work",
         "It was released in January 2011 in Japan", "The [UNK] team returned for the sequel ."],
        ["The story follows a squad of soldiers", "They fight on the front lines",
         "The war lasts 2,000 days ."],
    ]
    assert len(data["valid"]) == 1 and len(data["valid"][0]) == 3
    assert wiki_paragraphs([" = Heading = ", " one sentence only "]) == []


def test_missing_wikitext_names_the_file_and_the_download(tmp_path):
    with pytest.raises(DivekitError, match=r"missing wiki\.train\.tokens.*--download"):
        read_wikitext2(tmp_path)


def test_pydoc_paragraphs_have_two_sentences_or_more():
    data = pydoc_paragraphs()
    assert len(data["train"]) > 300 and len(data["valid"]) > 30
    assert all(len(p) >= 2 for split in data.values() for p in split)


def test_pairs_are_cls_a_sep_b_sep_with_segments_and_truncation():
    corpus = SentenceCorpus.from_ids([[[10, 11, 12], [20, 21]], [[30] * 40, [40] * 40]])
    tokens, segments, valid = pack_pairs(corpus, torch.tensor([0, 2]), torch.tensor([1, 3]), 20, 2, 3, 0)
    assert tokens[0, :8].tolist() == [2, 10, 11, 12, 3, 20, 21, 3]
    assert tokens[0, 8:].eq(0).all() and valid.tolist() == [8, 20]
    assert segments[0, :8].tolist() == [0, 0, 0, 0, 0, 1, 1, 1] and segments[0, 8:].eq(0).all()
    assert tokens[1].tolist() == [2] + [30] * 9 + [3] + [40] * 8 + [3]  # longer sentence cut first


def test_masking_statistics_over_many_samples():
    loader = _loader(_corpus())
    chosen = eligible = masked = randomised = kept = nsp = pairs = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for tokens, _segments, valid, positions, weights, labels, is_next in loader:
            orig = tokens.clone()
            w = weights.bool()
            rows = torch.arange(len(tokens))[:, None].expand_as(positions)
            orig[rows[w], positions[w]] = labels[w]
            special = torch.isin(orig, torch.tensor(list(SPECIAL.values())))
            inside = torch.arange(tokens.shape[1]) < valid[:, None]
            assert not special[rows[w], positions[w]].any()  # specials and padding never chosen
            assert torch.equal(tokens[special & inside], orig[special & inside])
            eligible += int((inside & ~special).sum())
            chosen += int(w.sum())
            now = tokens[rows[w], positions[w]]
            masked += int((now == SPECIAL["mask"]).sum())
            kept += int((now == labels[w]).sum())
            randomised += int(((now != SPECIAL["mask"]) & (now != labels[w])).sum())
            assert not torch.isin(now, torch.tensor([0, 1, 2, 3])).any()  # random draws are regular
            nsp += int(is_next.sum())
            pairs += len(is_next)
    assert abs(chosen / eligible - 0.15) < 0.01
    # a random draw equals the original 1 time in 55: count those as "kept" in the expectation
    assert abs(masked / chosen - 0.8) < 0.02
    assert abs(kept / chosen - (0.1 + 0.1 / 55)) < 0.02
    assert abs(randomised / chosen - (0.1 - 0.1 / 55)) < 0.02
    assert abs(nsp / pairs - 0.5) < 0.03


def test_an_epoch_depends_only_on_seed_and_epoch_and_resumes_mid_epoch():
    corpus = _corpus()
    one, two = _loader(corpus, seed=3), _loader(corpus, seed=3)
    one.set_epoch(2)
    two.set_epoch(2)
    first = list(one)
    two.skip_batches(2)
    rest = list(two)
    assert len(rest) == len(first) - 2
    for a, b in zip(first[2:], rest):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    one.set_epoch(3)
    assert not torch.equal(next(iter(one))[0], first[0][0])


def test_shards_hold_the_rows_of_one_process():
    corpus = _corpus()
    whole = next(iter(_loader(corpus, batch_size=64)))
    parts = [next(iter(_loader(corpus, batch_size=32).shard(r, 2))) for r in range(2)]
    for i, x in enumerate(whole):
        joined = torch.cat([p[i] for p in parts])
        width = min(joined.shape[-1], x.shape[-1]) if x.dim() > 1 else None
        assert torch.equal(joined[..., :width] if width else joined, x[..., :width] if width else x)


@pytest.fixture
def one_thread():
    """Short training runs on one thread: on a shared 2-core machine, two busy threads per test
    process only wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pydoc_task():
    from divekit.tasks.bert_pretrain import BertPretrainConfig, BertPretrainTask

    cfg = BertPretrainConfig(model="bert_small", data="pydoc", batch_size=32, lr=2e-3, max_len=32)
    return BertPretrainTask(cfg)


def _fit(task, model, batches, steps: int, lr: float) -> list[dict[str, float]]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    logs = []
    for step in range(steps):
        loss, log = task.training_step(model, batches[step % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        logs.append({k: float(v) for k, v in log.items()})
    return logs


def _evaluate(task, model, loader) -> dict[str, float]:
    model.eval()
    sums: dict = {}
    with torch.inference_mode():
        for batch in loader:
            for k, v in task.validation_step(model, batch).items():
                sums[k] = sums.get(k, 0) + v
    return task.validation_end(sums)


def test_pretraining_steps_lower_the_mlm_loss_on_pydoc(pydoc_task, one_thread):
    """40 steps on fresh pydoc pairs: the masked-LM loss falls from ln|V| (uniform guessing,
    6.6 for the 770 words): by > 0.7 nat between the first and last 5 training steps (measured
    ~1.2) and by > 1 nat on held-out paragraphs (measured ~1.5); validation comes back as sums
    the Trainer adds (loss = MLM + NSP)."""
    torch.manual_seed(0)
    task = pydoc_task
    model = task.build_model()
    val = task.val_data()
    before = _evaluate(task, model, val)
    loader = task.train_data()
    batches = [b for _, b in zip(range(40), loader)]
    logs = _fit(task, model, batches, 40, lr=task.config.lr)
    first = sum(x["mlm_loss"] for x in logs[:5]) / 5
    last = sum(x["mlm_loss"] for x in logs[-5:]) / 5
    assert last < first - 0.7
    after = _evaluate(task, model, val)
    assert after["mlm_loss"] < before["mlm_loss"] - 1.0 and after["mlm_acc"] > before["mlm_acc"]
    assert abs(after["loss"] - after["mlm_loss"] - after["nsp_loss"]) < 1e-9
    assert 0 <= after["nsp_acc"] <= 1


def test_the_nsp_head_learns_the_labels_of_its_pairs(pydoc_task, one_thread):
    """The NSP path is wired: on 64 fixed pydoc pairs (same pairs and masks every step) the
    [CLS] classifier goes from chance to > 90% accuracy in 60 steps. Were the labels misaligned
    with the pairs after batching, or the head reading a position that does not see both
    segments, it could not. (Above-chance NSP on *unseen* pairs needs a far longer run on a
    corpus this small: see docs/bert.md.)"""
    torch.manual_seed(0)
    task = pydoc_task
    model = task.build_model()
    for m in model.modules():  # memorisation test: no dropout noise
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    fixed = task._loader("train", shuffle=False, fixed=True, limit=64)
    batches = list(fixed)
    before = _evaluate(task, model, batches)
    _fit(task, model, batches, 60, lr=task.config.lr)
    after = _evaluate(task, model, batches)
    assert before["nsp_acc"] < 0.7 and after["nsp_acc"] > 0.9
    labels = torch.cat([b[6] for b in batches])
    assert 0.3 < labels.float().mean() < 0.7  # both classes present: not a constant answer


def test_random_next_sentences_come_from_another_document():
    """BERT's rule for an NSP negative: a random sentence of *another* document (a pydoc help
    topic), never of a's own; real next sentences stay a's successor."""
    corpus = SentenceCorpus.from_ids([[[5, 6], [7]], [[8], [9, 10]], [[11], [12]]], [0, 0, 1])
    assert corpus.document.tolist() == [0, 0, 0, 0, 1, 1]
    from divekit.data.bert_pretrain import _generator, nsp_plan

    drawn = set()
    for seed in range(50):
        a, b, is_next = nsp_plan(corpus, _generator(seed))
        neg = is_next == 0
        assert torch.equal(b[~neg], a[~neg] + 1)
        assert (corpus.document[b[neg]] != corpus.document[a[neg]]).all()
        drawn |= set(b[neg].tolist())
    assert drawn == {0, 1, 2, 3, 4, 5}  # every sentence can be a negative of another document
    data = pydoc_paragraphs()
    assert len({p.document for p in data["train"]}) > 50  # help topics are the documents


def _held_out_nsp(model, corpus, tok, max_len: int, draws: int) -> tuple[int, int]:
    specials = {"pad": tok.pad_id, "unk": tok.unk_id, "cls": tok.cls_id, "sep": tok.sep_id,
                "mask": tok.mask_id}
    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for seed in range(draws):  # fresh coin flips and negatives for the same held-out a's
            loader = BertPretrainLoader(corpus, batch_size=512, max_len=max_len, vocab_size=len(tok),
                                        special_ids=specials, seed=1000 + seed, shuffle=False)
            for tokens, segments, valid, positions, _w, _l, is_next in loader:
                _, _, nsp = model(tokens, segments, valid, positions)
                correct += int((nsp.argmax(-1) == is_next).sum())
                total += len(is_next)
    return correct, total


# slow: 600 steps (a statistical result; the short pretraining and NSP tests stay in make test)
@pytest.mark.slow
def test_pretraining_on_pydoc_raises_held_out_nsp_above_chance(one_thread):
    """A small BERT (2 layers, 64 hidden) pretrained on pydoc for 600 steps of 128 pairs: MLM
    falls and NSP accuracy on held-out paragraphs' pairs leaves chance by more than 3 standard
    errors (8 draws of the 106 held-out pairs: n = 848; under chance — a prediction independent
    of the coin-flip label — accuracy is Binomial(n, ½), so > ½ + 3·½/√n has p < 0.0015).
    48 s measured on one core at load ~4."""
    from divekit.models.bert import BertConfig, BertModel
    from divekit.tasks.bert_pretrain import BertPretrainConfig, BertPretrainTask

    torch.manual_seed(0)
    cfg = BertPretrainConfig(model="bert_small", data="pydoc", batch_size=128, lr=2e-3, max_len=24)
    task = BertPretrainTask(cfg)
    model = BertModel(BertConfig(vocab_size=len(task.tokenizer), num_layers=2, num_hiddens=64,
                                 num_heads=2, ffn_num_hiddens=128, max_len=24, dropout=0.1))
    held_out = task.corpus("valid")
    before, n = _held_out_nsp(model, held_out, task.tokenizer, 24, 8)
    loader = task.train_data()
    batches = [b for e in range(80) if not loader.set_epoch(e) for b in loader][:600]
    logs = _fit(task, model, batches, 600, lr=cfg.lr)
    after, n = _held_out_nsp(model, held_out, task.tokenizer, 24, 8)
    first = sum(x["mlm_loss"] for x in logs[:20]) / 20
    last = sum(x["mlm_loss"] for x in logs[-20:]) / 20
    assert last < first - 1.0
    assert after / n > 0.5 + 3 * 0.5 / n**0.5, (before / n, after / n)


@pytest.mark.shared_data
def test_shared_wikitext2_files_are_the_zips_members(shared_data):
    """../shared/data's WikiText-2 valid/test files are byte-identical to wiki.valid.tokens and
    wiki.test.tokens of wikitext-2-v1.zip (the sha1s published with the zip's sha1)."""
    import hashlib

    from divekit.data.bert_pretrain import WIKITEXT2_MEMBER_SHA1

    root = shared_data / "wikitext-2"
    for mine, member in (("valid.txt", "wiki.valid.tokens"), ("test.txt", "wiki.test.tokens")):
        digest = hashlib.sha1((root / mine).read_bytes()).hexdigest()
        assert digest == WIKITEXT2_MEMBER_SHA1[member], mine
