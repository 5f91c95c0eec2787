"""What the command modules share: a subcommand with an examples epilog, a command made of
actions (``divekit hw simulate|sweep``), and the library's notes on the terminal. A module of :mod:`divekit.cli` whose name starts with
an underscore adds no command (:func:`divekit.cli.cli_modules` leaves it out)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from divekit.errors import DivekitError


def add_command(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser, name: str, *,
                help: str, description: str, examples: str | None = None) -> argparse.ArgumentParser:
    """``divekit NAME``: its parser, with ``--debug`` from ``parent`` and, when given, the
    ``examples`` printed as they are written below the options."""
    shown = ({"epilog": examples, "formatter_class": argparse.RawDescriptionHelpFormatter}
             if examples else {})
    return sub.add_parser(name, parents=[parent], help=help, description=description, **shown)


def add_action_command(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser,
                       name: str, *, help: str, description: str,
                       examples: str | None = None) -> argparse._SubParsersAction:
    """``divekit NAME ACTION ...``: the subparsers to add the actions to. ``divekit NAME`` alone
    prints its help and fails in one line naming the actions."""
    parser = add_command(sub, parent, name, help=help, description=description,
                         examples=examples)
    actions = parser.add_subparsers(dest=f"{name}_action", metavar="ACTION")

    def needs_an_action(args: argparse.Namespace) -> None:
        parser.print_help()
        names = list(actions.choices)
        listed = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise DivekitError(f"{name} needs an action: {listed}")

    parser.set_defaults(handler=needs_an_action)
    return actions


def show_library_notes() -> None:
    """The library logs what a user should know (``--batch-size auto: 100 (...)``); print it."""
    logger = logging.getLogger("divekit")
    if not any(isinstance(h, _Notes) for h in logger.handlers):
        logger.addHandler(_Notes())
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _Notes(logging.Handler):
    """Library log lines on the standard output as it is now (rank 0 only)."""

    def emit(self, record: logging.LogRecord) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(record.getMessage(), file=sys.stderr if record.levelno >= logging.WARNING
                  else sys.stdout)
