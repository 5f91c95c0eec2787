"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

from collections.abc import Iterable


class DivekitError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class UnknownNameError(DivekitError, KeyError):
    """A name (model, dataset, optimizer, ...) that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class DataNotFoundError(DivekitError, FileNotFoundError):
    """A dataset's files are neither on disk nor downloadable right now."""


class TrainingDiverged(DivekitError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
