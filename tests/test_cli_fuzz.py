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
import signal
import string

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


@pytest.mark.parametrize("command, model", CASES, ids=[" ".join(c) + (f" {m}" if m else "")
                                                     for c, m in CASES])
@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_draw_ends_in_success_or_one_error_line(command, model, data, world, monkeypatch,
                                                     capsys, tmp_path_factory):
    import importlib

    for where, name in STOPS:
        module, _, cls = where.rpartition(".") if where.endswith("Trainer") else (where, "", "")
        target = importlib.import_module(module)
        target = getattr(target, cls) if cls else target
        stop = _validate_then_stop if (where, name) == ("divekit.engine.run", "train") else _stop
        monkeypatch.setattr(target, name, stop)
    if command == ("models",):
        monkeypatch.setattr(importlib.import_module(BUILDS[0]), BUILDS[1], _stop, raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # `translate` with no SENTENCE reads it
    monkeypatch.chdir(tmp_path_factory.getbasetemp())
    argv = _argv(data.draw, command, model, world)
    previous = signal.signal(signal.SIGALRM, _deadline)
    signal.alarm(DRAW_SECONDS)
    try:
        code = main(argv)
    except Reached:
        code = 0
    except SystemExit as e:  # argparse: a usage error (2) or --version
        code = e.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    OUTCOMES.setdefault(" ".join(command), []).append(
        "ok" if code in (0, None) else (err.split(":")[1][:40] if ":" in err else err[:40]))
    assert code in (0, 2, None), f"divekit {' '.join(argv)!r}: exit {code}\n{err}"
    assert "Traceback" not in err, f"divekit {' '.join(argv)!r}\n{err}"
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"divekit {' '.join(argv)!r}: not one error line\n{err}"
