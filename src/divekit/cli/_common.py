"""What the command modules share: a subcommand with an examples epilog, and a command made of
actions (``divekit hw simulate|sweep``). A module of :mod:`divekit.cli` whose name starts with
an underscore adds no command (:func:`divekit.cli.cli_modules` leaves it out)."""

from __future__ import annotations

import argparse

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
