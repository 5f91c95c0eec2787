"""The machine-translation data pipeline: the course's cleaning and arrays, fra.txt from a folder,
an archive, the cache or a (local) download, and the generated numbers-fr task."""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from divekit import hub
from divekit.data import dataset_info, list_datasets, load_dataset
from divekit.data.numbers_fr import _NOUNS, english_number, french_number, numbers_fr
from divekit.data.text import Vocab
from divekit.data.translation import (
    _OTHER_SPACES,
    RESERVED_TOKENS,
    TranslationData,
    build_array,
    decoder_inputs,
    encode_sentences,
    load_translation,
    preprocess_nmt,
    read_fra_eng,
    split_indices,
    tokenize_nmt,
    truncate_pad,
)
from divekit.errors import DataNotFoundError, DivekitError, UnknownNameError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "translation"
FRA_TXT = FIXTURES / "fra.txt"  # newer Tatoeba format: English, French, attribution
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_FRA = SHARED_DATA / "fra-eng" / "fra.txt"


# ----------------------------------------------------------------------------- the course, written out


def course_preprocess(text: str) -> str:
    """d2l's ``_preprocess``: the character loop."""
    text = text.replace("\u202f", " ").replace("\xa0", " ").lower()
    out = [
        " " + c if i > 0 and c in ",.!?" and text[i - 1] != " " else c for i, c in enumerate(text)
    ]
    return "".join(out)


def course_tokenize(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """d2l's ``_tokenize`` (without its <eos>), taking the first two columns of every line."""
    src, tgt = [], []
    for line in text.split("\n"):
        parts = line.split("\t")
        if len(parts) >= 2:
            src.append([t for t in parts[0].split(" ") if t])
            tgt.append([t for t in parts[1].split(" ") if t])
    return src, tgt


def course_build_array(lines, vocab, num_steps):
    """d2l's ``build_array_nmt``."""
    rows = [
        truncate_pad(vocab[line] + [vocab["<eos>"]], num_steps, vocab["<pad>"]) for line in lines
    ]
    array = torch.tensor(rows, dtype=torch.long).reshape(len(lines), num_steps)
    return array, (array != vocab["<pad>"]).sum(1)


def fixture_text() -> str:
    return FRA_TXT.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder, so no test reads or writes ~/.cache."""
    home = tmp_path / "cache"
    monkeypatch.setenv("DIVEKIT_DATA", str(home))
    return home


def make_fra_eng_zip(path: Path, text: str | None = None) -> Path:
    """An archive laid out like the course's fra-eng.zip: fra-eng/fra.txt and fra-eng/_about.txt."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fra-eng/", "")
        zf.writestr("fra-eng/fra.txt", fixture_text() if text is None else text)
        zf.writestr("fra-eng/_about.txt", "Tatoeba sentence pairs, CC-BY 2.0 (France)\n")
    return path


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ----------------------------------------------------------------------------- preprocessing

TRICKY = [
    "Go.\tVa !",
    "Hi.\tSalut\u202f!",  # narrow no-break space before ! (Tatoeba's French)
    "Tom a dit\xa0: «\xa0Va\u202f!\xa0»",
    ".Go",  # punctuation first: nothing before it, no space
    "a?!",  # each mark gets its own space: 'a ? !'
    "Wait, what?!",
    "already spaced . ok ?",
    " .",  # already spaced at the very start
    "  ,,",
    "x\n.y\n?",  # a mark after a line break gets a space (the break is not a space)
    "a\t.b",
    "ÉTÉ.ÇA!",
    "recule\u2009!",  # a thin space is not a space for the course
    "...",
    "",
    "é",
]


@pytest.mark.parametrize("text", TRICKY)
def test_preprocess_is_the_course_character_loop(text):
    assert preprocess_nmt(text) == course_preprocess(text)


def test_preprocess_agrees_with_the_course_on_random_strings():
    rng = random.Random(0)
    alphabet = "aZé ,.!?\t\n\u202f\xa0\u2009Ç"
    for _ in range(500):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 25)))
        assert preprocess_nmt(s) == course_preprocess(s), repr(s)


def test_preprocess_without_a_free_control_byte_takes_the_regex_path():
    text = "".join(chr(i) for i in range(32)) + "Go.\tVa\u202f!?"
    assert preprocess_nmt(text) == course_preprocess(text)


def test_other_spaces_are_every_whitespace_but_space_tab_newline():
    expected = {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()} - {" ", "\t", "\n"}
    assert set(_OTHER_SPACES) == expected


def test_a_thin_space_stays_inside_its_word_as_in_the_course():
    src, tgt = tokenize_nmt(preprocess_nmt("Back off!\tRecule\u2009!\nGo.\tVa !"))
    assert tgt == [["recule\u2009", "!"], ["va", "!"]] and src == [
        ["back", "off", "!"],
        ["go", "."],
    ]


# ----------------------------------------------------------------------------- tokenizing


def test_fixture_cleans_and_tokenizes_like_the_course():
    text = fixture_text()
    assert preprocess_nmt(text) == course_preprocess(text)
    src, tgt = tokenize_nmt(preprocess_nmt(text))
    assert (src, tgt) == course_tokenize(course_preprocess(text))
    assert src[0] == ["go", "."] and tgt[0] == ["va", "!"]
    assert tgt[2] == ["salut", "!"]  # the narrow no-break space became a plain space
    assert src[32] == ["wait", ",", "what", "?"] and tgt[32] == ["attends", ",", "quoi", "?", "!"]


def test_two_and_three_column_lines_give_the_same_pairs():
    three = fixture_text()
    assert all(line.count("\t") == 2 for line in three.splitlines())  # the attribution column
    two = "\n".join(line.rsplit("\t", 1)[0] for line in three.splitlines()) + "\n"
    assert tokenize_nmt(preprocess_nmt(three)) == tokenize_nmt(preprocess_nmt(two))
    assert len(tokenize_nmt(preprocess_nmt(three))[0]) == 36


def test_lines_without_a_tab_are_skipped():
    src, tgt = tokenize_nmt("go .\tva !\n\nno tab here\nhi .\tsalut !\n")
    assert src == [["go", "."], ["hi", "."]] and tgt == [["va", "!"], ["salut", "!"]]


def test_max_examples_counts_pairs():
    text = "no tab\n" + preprocess_nmt(fixture_text())
    src, tgt = tokenize_nmt(text, max_examples=3)
    assert len(src) == len(tgt) == 3 and src[2] == ["hi", "."]
    for bad in (0, -1, True):
        with pytest.raises(DivekitError, match="max_examples"):
            tokenize_nmt(text, max_examples=bad)


def test_empty_words_are_dropped():
    assert tokenize_nmt("  go  . \t va !  ") == ([["go", "."]], [["va", "!"]])


# ----------------------------------------------------------------------------- arrays


def test_truncate_pad_is_the_courses():
    assert truncate_pad([47, 4], 10, 1) == [47, 4, 1, 1, 1, 1, 1, 1, 1, 1]
    assert truncate_pad(list(range(12)), 10, 1) == list(range(10))
    assert truncate_pad([], 2, "<pad>") == ["<pad>", "<pad>"]


@pytest.mark.parametrize("num_steps", [1, 2, 3, 5, 9, 30])
def test_build_array_matches_the_course_loop(num_steps):
    src, _ = tokenize_nmt(preprocess_nmt(fixture_text()))
    lines = [*src, [], ["never-seen", "words"], ["go"] * 12]
    vocab = Vocab(src, min_freq=2, reserved_tokens=list(RESERVED_TOKENS))
    array, valid_len = build_array(lines, vocab, num_steps)
    expected, expected_len = course_build_array(lines, vocab, num_steps)
    assert array.dtype == valid_len.dtype == torch.long
    assert array.shape == (len(lines), num_steps)
    assert torch.equal(array, expected) and torch.equal(valid_len, expected_len)


def test_build_array_needs_pad_and_eos_and_positive_steps():
    with pytest.raises(DivekitError, match="<pad>"):
        build_array([["a"]], Vocab([["a"]]), 4)
    vocab = Vocab([["a"]], reserved_tokens=list(RESERVED_TOKENS))
    for bad in (0, -2, 2.5, True):
        with pytest.raises(DivekitError, match="num_steps"):
            build_array([["a"]], vocab, bad)
    array, valid_len = build_array([], vocab, 4)
    assert array.shape == (0, 4) and valid_len.shape == (0,)


def test_decoder_inputs_are_bos_then_the_target_shifted_right():
    tgt = torch.tensor([[5, 6, 3, 1], [7, 3, 1, 1]])
    assert decoder_inputs(tgt, 2).tolist() == [[2, 5, 6, 3], [2, 7, 3, 1]]


def test_encode_sentences_cleans_like_the_data():
    data = load_translation("fra-eng", data_dir=FIXTURES, val_fraction=0.1)
    ids, valid_len = encode_sentences(["Go!", "Hi."], data.src_vocab, 5)
    assert data.src_vocab.to_tokens(ids[0].tolist()) == ["go", "!", "<eos>", "<pad>", "<pad>"]
    assert valid_len.tolist() == [3, 3]


# ----------------------------------------------------------------------------- numbers-fr

# fmt: off
FRENCH = {
    0: "zéro", 1: "un", 7: "sept", 10: "dix", 11: "onze", 16: "seize", 17: "dix-sept", 19: "dix-neuf",
    20: "vingt", 21: "vingt et un", 22: "vingt-deux", 30: "trente", 41: "quarante et un",
    60: "soixante", 61: "soixante et un", 69: "soixante-neuf", 70: "soixante-dix",
    71: "soixante et onze", 72: "soixante-douze", 77: "soixante-dix-sept", 80: "quatre-vingts",
    81: "quatre-vingt-un", 90: "quatre-vingt-dix", 91: "quatre-vingt-onze",
    99: "quatre-vingt-dix-neuf", 100: "cent", 101: "cent un", 180: "cent quatre-vingts",
    200: "deux cents", 201: "deux cent un", 280: "deux cent quatre-vingts", 999: "neuf cent quatre-vingt-dix-neuf",
    1000: "mille", 1001: "mille un", 1100: "mille cent", 1990: "mille neuf cent quatre-vingt-dix",
    2000: "deux mille", 2200: "deux mille deux cents", 9999: "neuf mille neuf cent quatre-vingt-dix-neuf",
    21000: "vingt et un mille", 80000: "quatre-vingt mille", 200000: "deux cent mille",
    201000: "deux cent un mille", 999999: "neuf cent quatre-vingt-dix-neuf mille neuf cent quatre-vingt-dix-neuf",
}
# fmt: on


@pytest.mark.parametrize("n, words", FRENCH.items())
def test_french_number_words(n, words):
    assert french_number(n) == words


def test_a_final_un_agrees_with_a_feminine_noun():
    assert [french_number(n, feminine=True) for n in (1, 21, 81, 101, 1001, 71, 11, 21000)] == [
        "une",
        "vingt et une",
        "quatre-vingt-une",
        "cent une",
        "mille une",
        "soixante et onze",
        "onze",
        "vingt et un mille",
    ]


def test_english_number_words():
    assert [english_number(n) for n in (1, 13, 21, 40, 100, 101, 1990, 9999, 21000)] == [
        "one",
        "thirteen",
        "twenty-one",
        "forty",
        "one hundred",
        "one hundred one",
        "one thousand nine hundred ninety",
        "nine thousand nine hundred ninety-nine",
        "twenty-one thousand",
    ]
    for bad in (-1, 1_000_000, 2.0, True):
        with pytest.raises(DivekitError, match="number"):
            french_number(bad)


def test_numbers_fr_is_fixed_by_its_seed_and_grows_by_prefix():
    text = numbers_fr(300, seed=1)
    assert numbers_fr(300, seed=1) == text and numbers_fr(300, seed=2) != text
    assert text.startswith(numbers_fr(50, seed=1))
    lines = text.rstrip("\n").split("\n")
    assert len(lines) == 300 and all(line.count("\t") == 1 for line in lines)


def test_numbers_fr_speaks_french_with_agreement():
    lines = numbers_fr(20_000, seed=0).splitlines()
    for pair in (
        "One.\tUn.",
        "One book.\tUn livre.",
        "There is one house!\tIl y a une maison\u202f!",
        "I have twenty-one houses.\tJ'ai vingt et une maisons.",
        "Do you have five thousand one birds?\tAs-tu cinq mille un oiseaux\u202f?",
    ):
        assert pair in lines
    singular = {en: (fr, fem) for en, _, fr, _, fem in _NOUNS}
    for en, fr in (line.split("\t") for line in lines):
        words = en.rstrip(".?!").lower().split()
        if words[-2:-1] == ["one"] and words[-1] in singular:  # "... one apple": une pomme
            noun, feminine = singular[words[-1]]
            assert (
                fr.rstrip(".?!\u202f").lower().endswith(("une " if feminine else "un ") + noun)
            ), (en, fr)
        assert words[:2] != ["there", "is"] or words[2] == "one"


def test_numbers_fr_bad_arguments():
    for kwargs in ({"n": 0}, {"max_number": 0}, {"max_number": 1_000_000}):
        with pytest.raises(DivekitError):
            numbers_fr(**kwargs)
    small = numbers_fr(200, max_number=12)
    assert "thirteen" not in small and "twelve" in small.lower()


def test_numbers_fr_is_a_learnable_offline_task():
    info = dataset_info("numbers-fr")
    assert info.offline and info.task == "translate"
    data = load_dataset("numbers-fr", max_examples=2000, num_steps=13)
    assert isinstance(data, TranslationData)
    assert data.train.src.shape == (1800, 13) and data.val.src.shape == (200, 13)
    # every pair fits in 13 steps with its <eos>, and the validation words are known words
    assert (data.train.src_valid_len < 13).all() and (data.train.tgt_valid_len <= 13).all()
    assert (data.val.src == data.src_vocab.unk).float().mean() < 0.01
    assert "mille" in data.tgt_vocab and "thousand" in data.src_vocab and "vingt" in data.tgt_vocab


# ----------------------------------------------------------------------------- loading


def test_vocabularies_start_with_the_reserved_tokens():
    data = load_translation("fra-eng", data_dir=FIXTURES)
    for vocab in (data.src_vocab, data.tgt_vocab):
        assert vocab.idx_to_token[:4] == ["<unk>", "<pad>", "<bos>", "<eos>"]
        assert vocab.min_freq == 2


def test_the_split_is_seeded_disjoint_and_the_vocab_sees_training_pairs_only():
    src, tgt = tokenize_nmt(preprocess_nmt(fixture_text()))
    data = load_translation("fra-eng", data_dir=FIXTURES, val_fraction=0.25, seed=3, num_steps=6)
    train_idx, val_idx = split_indices(len(src), 0.25, 3)
    assert len(val_idx) == 9 and len(train_idx) == 27
    assert sorted([*train_idx, *val_idx]) == list(range(36))
    assert data.src_vocab == Vocab([src[i] for i in train_idx], 2, list(RESERVED_TOKENS))
    assert data.tgt_vocab == Vocab([tgt[i] for i in train_idx], 2, list(RESERVED_TOKENS))
    expected, _ = build_array([src[i] for i in val_idx], data.src_vocab, 6)
    assert torch.equal(data.val.src, expected)
    assert data.val_pairs == [(src[i], tgt[i]) for i in val_idx]
    again = load_translation("fra-eng", data_dir=FIXTURES, val_fraction=0.25, seed=3, num_steps=6)
    other = load_translation("fra-eng", data_dir=FIXTURES, val_fraction=0.25, seed=4, num_steps=6)
    assert torch.equal(again.train.src, data.train.src) and not torch.equal(
        other.val.src, data.val.src
    )


def test_max_examples_takes_the_first_pairs(tmp_path):
    (tmp_path / "fra.txt").write_text(".Odd first line\tok\n" + fixture_text(), encoding="utf-8")
    data = load_translation(
        "fra-eng", data_dir=tmp_path, max_examples=10, val_fraction=0.2, min_freq=1
    )
    src, _ = tokenize_nmt(preprocess_nmt((tmp_path / "fra.txt").read_text(encoding="utf-8")))
    assert len(data.train.src) + len(data.val.src) == 10
    assert data.src_vocab == Vocab(
        [src[i] for i in split_indices(10, 0.2, 0)[0]], 1, list(RESERVED_TOKENS)
    )


def test_bad_load_arguments():
    with pytest.raises(UnknownNameError, match="numbers-fr"):
        load_translation("klingon")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DivekitError, match="val_fraction"):
            load_translation("numbers-fr", max_examples=20, val_fraction=bad)
    with pytest.raises(DivekitError, match="at least 2"):
        load_translation("numbers-fr", max_examples=1)


def test_a_batch_is_src_src_len_tgt_tgt_len():
    data = load_translation("fra-eng", data_dir=FIXTURES, num_steps=7)
    src, src_len, tgt, tgt_len = next(iter(data.train_loader(batch_size=4, seed=0)))
    assert src.shape == tgt.shape == (4, 7) and src_len.shape == tgt_len.shape == (4,)
    eos = data.tgt_vocab["<eos>"]
    for row, n in zip(tgt.tolist(), tgt_len.tolist(), strict=True):
        assert row[n - 1] == eos and all(t == data.tgt_vocab["<pad>"] for t in row[n:])
    dec_in = decoder_inputs(tgt, data.tgt_vocab["<bos>"])
    assert (dec_in[:, 0] == data.tgt_vocab["<bos>"]).all() and torch.equal(
        dec_in[:, 1:], tgt[:, :-1]
    )
    assert sum(len(b[0]) for b in data.val_loader(batch_size=2)) == len(data.val.src)


def test_fra_eng_is_registered_for_the_translate_task():
    info = dataset_info("fra-eng")
    assert info.task == "translate" and not info.offline
    assert {"fra-eng", "numbers-fr"} <= set(list_datasets("translate"))
    data = load_dataset("fra-eng", data_dir=FIXTURES, seed=1)
    assert len(data.train.src) + len(data.val.src) == 36


def test_sentencepiece_tokens_replace_words():
    pytest.importorskip("sentencepiece")
    from divekit.tokenizers import train_tokenizer

    lines = [s for line in numbers_fr(500).splitlines() for s in preprocess_nmt(line).split("\t")]
    tok = train_tokenizer(lines, 120)
    data = load_translation("numbers-fr", max_examples=300, tokenizer=tok, num_steps=20)
    assert any(t.startswith("\u2581") for t in data.src_vocab.idx_to_token)
    assert data.train.src.shape[1] == 20


# ----------------------------------------------------------------------------- finding fra.txt


def test_read_from_a_folder_holding_fra_txt():
    assert read_fra_eng(FIXTURES) == fixture_text()


def test_read_from_a_folder_holding_fra_eng_subfolder(tmp_path):
    (tmp_path / "fra-eng").mkdir()
    shutil.copy(FRA_TXT, tmp_path / "fra-eng" / "fra.txt")
    assert read_fra_eng(tmp_path) == fixture_text()


def test_read_from_a_folder_holding_the_zip_unpacks_it_once(tmp_path):
    make_fra_eng_zip(tmp_path / "fra-eng.zip")
    assert read_fra_eng(tmp_path) == fixture_text()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files_under(tmp_path)) == [
        "fra-eng.zip",
        "fra-eng/_about.txt",
        "fra-eng/fra.txt",
    ]  # no temporary folder left behind
    (tmp_path / "fra-eng.zip").write_bytes(b"broken")  # not opened again: fra-eng/fra.txt is found
    assert read_fra_eng(tmp_path) == fixture_text()


def test_a_zip_without_fra_txt_is_an_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "fra-eng.zip", "w") as zf:
        zf.writestr("other/readme.txt", "nothing here")
    with pytest.raises(DataNotFoundError, match="fra.txt"):
        read_fra_eng(tmp_path)
    assert not (tmp_path / "fra-eng").exists()


def test_read_from_the_cache(cache):
    (cache / "fra-eng").mkdir(parents=True)
    shutil.copy(FRA_TXT, cache / "fra-eng" / "fra.txt")
    assert read_fra_eng() == fixture_text()


def test_missing_files_name_the_file_the_url_and_the_folder(tmp_path):
    url = hub.DATA_HUB["fra-eng"][0]
    with pytest.raises(DataNotFoundError) as err:
        load_translation("fra-eng", data_dir=tmp_path)
    message = str(err.value)
    for part in ("fra.txt", url, str(tmp_path), "--download", "--data-dir"):
        assert part in message
    assert "\n" not in message
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_fra_eng(tmp_path / "nope")


def test_download_is_verified_unpacked_and_done_once(server, cache, monkeypatch):
    base, www, requests = server
    archive = make_fra_eng_zip(www / "fra-eng.zip")
    monkeypatch.setitem(
        hub.DATA_HUB,
        "fra-eng",
        (base + "fra-eng.zip", hashlib.sha1(archive.read_bytes()).hexdigest()),
    )
    assert read_fra_eng(download=True) == fixture_text()
    assert (cache / "fra-eng" / "fra.txt").is_file() and (cache / "fra-eng.zip").is_file()
    assert read_fra_eng(download=True) == fixture_text()
    assert requests == ["/fra-eng.zip"]


def test_download_goes_into_the_data_dir_when_given(server, tmp_path, monkeypatch):
    base, www, _ = server
    archive = make_fra_eng_zip(www / "fra-eng.zip")
    monkeypatch.setitem(
        hub.DATA_HUB,
        "fra-eng",
        (base + "fra-eng.zip", hashlib.sha1(archive.read_bytes()).hexdigest()),
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = load_dataset("fra-eng", data_dir=data_dir, download=True)
    assert (data_dir / "fra-eng" / "fra.txt").is_file() and len(data.val.src) == 4


def test_a_corrupted_download_is_refused_and_leaves_nothing(server, cache, monkeypatch):
    base, www, _ = server
    make_fra_eng_zip(www / "fra-eng.zip")
    monkeypatch.setitem(hub.DATA_HUB, "fra-eng", (base + "fra-eng.zip", "0" * 40))
    with pytest.raises(DivekitError, match="expected 0000"):
        read_fra_eng(download=True)
    assert files_under(cache) == []


# ----------------------------------------------------------------------------- the real file


@pytest.mark.shared_data
@pytest.mark.skipif(not REAL_FRA.is_file(), reason="no shared fra-eng/fra.txt")
def test_the_real_fra_eng_matches_the_course():
    text = read_fra_eng(SHARED_DATA)
    src, tgt = tokenize_nmt(preprocess_nmt(text))
    assert len(src) == len(tgt) == 167_130
    assert (src[0], tgt[0]) == (["go", "."], ["va", "!"])
    assert (src[2], tgt[2]) == (["run", "!"], ["cours", "!"])
    head = "\n".join(text.split("\n", 20_000)[:20_000])
    assert preprocess_nmt(head) == course_preprocess(head)
    assert tokenize_nmt(preprocess_nmt(head)) == course_tokenize(course_preprocess(head))


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED_DATA / "fra-eng.zip").is_file(), reason="no shared fra-eng.zip")
def test_the_real_zip_has_the_course_sha1(tmp_path):
    assert hub.file_digest(SHARED_DATA / "fra-eng.zip", "sha1") == hub.DATA_HUB["fra-eng"][1]
    (tmp_path / "fra-eng.zip").symlink_to(SHARED_DATA / "fra-eng.zip")
    data = load_translation("fra-eng", data_dir=tmp_path, max_examples=600)
    assert len(data.train.src) + len(data.val.src) == 600
    assert data.src_vocab.idx_to_token[:4] == ["<unk>", "<pad>", "<bos>", "<eos>"]


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not REAL_FRA.is_file(), reason="no shared fra-eng/fra.txt")
def test_the_whole_real_file_is_cleaned_and_split_exactly_like_the_course():
    text = REAL_FRA.read_text(encoding="utf-8")
    reference = course_preprocess(text)  # ~5 s: the course's character loop
    assert preprocess_nmt(text) == reference
    assert tokenize_nmt(preprocess_nmt(text)) == course_tokenize(reference)


def test_every_text_file_of_the_translation_area_is_opened_with_an_encoding():
    """The course opens fra.txt without an encoding (the locale's, not UTF-8, on Windows): every
    open(), read_text() and write_text() of this area's modules names one (binary opens aside)."""
    import ast
    from pathlib import Path

    import divekit

    root = Path(divekit.__file__).parent
    files = ["data/translation.py", "tokenizers.py", "tasks/translate.py",
             "tasks/translate_decode.py", "cli/translate.py",
             "ops/bleu.py", "ops/decoding.py", "models/kernel_regression.py"]
    missing = []
    for name in files:
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called not in ("open", "read_text", "write_text"):
                continue
            mode = node.args[1] if called == "open" and len(node.args) > 1 else None
            binary = isinstance(mode, ast.Constant) and "b" in str(mode.value)
            if not binary and not any(k.arg == "encoding" for k in node.keywords):
                missing.append(f"{name}:{node.lineno}")
    assert missing == []
