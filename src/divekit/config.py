"""Config dataclasses and the one adapter from them to ``argparse``.

Every option of every command is a dataclass field made with :func:`option`, so its help text,
choices and aliases sit beside its default. :func:`add_config_options` turns a dataclass into
``argparse`` options (``grad_clip`` → ``--grad-clip``; ``bool`` → a flag; ``bool | None`` →
``--x/--no-x``); defaults are SUPPRESSed, so :func:`typed_options` can tell what the user typed
from what a recipe or a resumed run may fill in. Configs are frozen: change one with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field
from typing import Any, TypeVar

from divekit.errors import DivekitError

C = TypeVar("C")


def option(default: Any, help: str, **extra: Any) -> Any:
    """A config field with the help text the CLI shows.

    ``extra`` goes to ``argparse.add_argument`` (``choices=``, ``metavar=``, ``type=``), except
    ``cli=False`` (not a command-line option) and ``aliases=[...]`` (more flag names, e.g. the
    course's ``--hidden`` for ``num_hiddens``).
    """
    return field(default=default, metadata={"help": help, **extra})


def _option_type(hint: Any) -> type | None:
    """``int | None`` → int; bool → None (a flag)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    inner = args[0]
    return None if inner is bool else inner


def _is_auto_flag(hint: Any) -> bool:
    """``bool | None``: on, off, or decided by the run (``--x`` / ``--no-x`` / neither)."""
    return type(None) in typing.get_args(hint) and bool in typing.get_args(hint)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_options(p: argparse.ArgumentParser, config_cls: type,
                       skip: frozenset[str] = frozenset(), group_title: str | None = None,
                       shown: dict[str, Any] | None = None, shown_note: str = "") -> None:
    """One option per field of ``config_cls`` (fields in ``skip`` and ``cli=False`` left out).

    ``shown`` replaces the defaults the help text shows (a model's recipe), each followed by
    ``shown_note``."""
    hints = typing.get_type_hints(config_cls)
    target: Any = p.add_argument_group(group_title) if group_title else p
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        if meta.pop("cli", True) is False or f.name in skip:
            continue
        help_text = meta.pop("help", "")
        flags = [flag_name(f.name), *meta.pop("aliases", [])]
        kind = meta.pop("type", None) or _option_type(hints[f.name])
        common = dict(dest=f.name, default=argparse.SUPPRESS)
        if kind is None and _is_auto_flag(hints[f.name]):
            target.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help_text, **common)
        elif kind is None:
            target.add_argument(*flags, action="store_true", help=help_text, **common)
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            note = ""
            if shown and f.name in shown:
                default, note = shown[f.name], shown_note
            text = "" if default is None else f" (default: {default}{note})"
            target.add_argument(*flags, type=kind, help=help_text + text, **common, **meta)


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build a config dataclass, refusing unknown keys with the list of known ones."""
    names = field_names(cls)
    unknown = sorted(set(values) - names)
    if unknown:
        raise DivekitError(f"unknown option(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**values)


def known_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are fields of ``cls``."""
    names = field_names(cls)
    return {k: v for k, v in values.items() if k in names}


def typed_options(args: argparse.Namespace, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the user typed (defaults are SUPPRESSed), less the command's own bookkeeping."""
    skip = {"command", "debug", "handler", *drop}
    return {k: v for k, v in vars(args).items() if k not in skip}


def refuse_unused(options: dict[str, Any], fn: Any, what: str, offered: Any = ()) -> None:
    """Refuse the ``options`` (name → value, as typed) that ``fn`` has no keyword argument for,
    that is, options the chosen task would ignore: one line naming them, ``what`` they were
    given to, and which of the command's ``offered`` options it does take. A ``fn`` with
    ``**kwargs`` checks its own."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unused = [k for k in options if k not in params]
    if unused:
        takes = [flag_name(k) for k in offered if k in params]
        shown = f"; it takes {', '.join(takes)}" if takes else ""
        raise DivekitError(f"{', '.join(flag_name(k) for k in unused)} "
                           f"{'does' if len(unused) == 1 else 'do'} not apply to {what}{shown}")
