"""The real formats of the fine-tuning tasks, read from fixtures written in those formats, and the
generated offline tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from divekit.data.text_generated import GENERATED, qa_gen
from divekit.data.text_tasks import (
    guess_scheme,
    load_conll,
    load_csv,
    load_glue,
    load_snli,
    load_squad,
    read_conll,
    read_squad,
)
from divekit.errors import DataNotFoundError, DivekitError

FIX = Path(__file__).parent / "fixtures" / "text_tasks"


def test_snli_skips_and_counts_examples_without_a_gold_label():
    data = load_snli(FIX / "snli")
    assert data.kind == "pair" and len(data.train) == 3 and len(data.valid) == 1
    assert data.notes["skipped_no_gold_label"] == 2
    assert data.train[1].label == "contradiction"
    assert data.train[1].pair == "A person is at a diner, ordering an omelette."


def test_glue_tsv_and_csv_spec(tmp_path):
    data = load_glue("sst2", FIX / "glue")
    assert data.kind == "classify" and data.labels == ["0", "1"] and len(data.valid) == 2
    assert data.valid[0].text.startswith("it 's a charming")  # quotes kept: GLUE has no quoting
    path = tmp_path / "reviews.csv"
    rows = "".join(f'"text {i}, with a comma","other {i}",{"good" if i % 2 else "bad"}\n' for i in range(20))
    path.write_text("body,second,stars\n" + rows)
    single = load_csv(f"csv:{path}", ["body"], "stars")
    assert len(single.train) == 18 and len(single.valid) == 2
    assert single.train[0].text == "text 0, with a comma" and single.labels == ["bad", "good"]
    pairs = load_csv(f"csv:{path}", ["body", "second"], "stars")
    assert pairs.kind == "pair" and pairs.train[3].pair == "other 3"
    with pytest.raises(DivekitError, match="no column nope; its columns are body, second, stars"):
        load_csv(f"csv:{path}", ["nope"], "stars")


def test_conll_docstart_blank_lines_and_scheme():
    sentences = read_conll(FIX / "conll" / "train.txt")
    assert [len(s.words) for s in sentences] == [9, 2, 2]
    assert sentences[1].words == ["Peter", "Blackburn"] and sentences[1].tags == ["I-PER", "I-PER"]
    assert guess_scheme(sentences) == "iob1"  # CoNLL-2003's original files open entities with I-
    data = load_conll(FIX / "conll")
    assert data.kind == "tag" and data.labels[0] == "O" and "I-ORG" in data.labels


def test_conll_line_with_wrong_column_count_names_file_and_line():
    with pytest.raises(DivekitError, match=r"bad_columns.txt:4: 3 columns, expected 4"):
        read_conll(FIX / "conll" / "bad_columns.txt")


def test_squad_reads_answers_and_checks_answer_start():
    data = load_squad(FIX / "squad")
    assert data.kind == "qa" and len(data.train) == 2
    ex = data.train[0]
    assert ex.answers == ["Denver Broncos"] * 2 and ex.context[ex.starts[0]:].startswith("Denver")
    with pytest.raises(DivekitError, match="56be4db0acb8001400a502ed: answer_start 250"):
        read_squad(FIX / "squad" / "bad_start.json")


def test_missing_data_dir_is_one_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_snli(None)
    with pytest.raises(DataNotFoundError, match="snli_1.0_train.jsonl"):
        load_snli(tmp_path)


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_tasks_are_reproducible_and_sized(name):
    a, b = GENERATED[name](seed=0), GENERATED[name](seed=0)
    assert a.train[:20] == b.train[:20] and len(a.train) >= 1000 and len(a.valid) >= 200
    if a.kind in ("classify", "pair"):
        counts = {lab: sum(e.label == lab for e in a.train) for lab in a.labels}
        assert min(counts.values()) > len(a.train) / (2 * len(a.labels))  # balanced: chance is low


def test_generated_qa_answers_are_spans_of_their_passage():
    for ex in qa_gen().valid:
        assert ex.context[ex.starts[0]: ex.starts[0] + len(ex.answers[0])] == ex.answers[0]
