"""Atomic checkpoints and exact resume.

Layout of ``RUN_DIR/checkpoint/``::

    epoch-0003/model.safetensors   weights and buffers
    epoch-0003/state.pt            optimizer, scheduler, RNG states, epoch, history (and the
                                   task's own state, per rank, where it has one)
    latest                         the name of the newest complete checkpoint

A checkpoint is written into a temporary directory, renamed into place, and only then is
``latest`` replaced (also via rename), so a crash at any point (``kill -9`` included) leaves the
previous checkpoint intact and ``latest`` never points at a partial one; a reader that opens the
run meanwhile sees the old checkpoint or the new one. A checkpoint directory is never deleted
while ``latest`` names it (pruning runs after the pointer moved on).

``latest`` is confined to its run: it must hold the plain name of a complete checkpoint directory
of this ``checkpoint/`` folder, neither a link nor a path (``../other-run``, ``/abs/path``), else
:meth:`CheckpointDir.latest` refuses in one line naming the pointer and what it holds. Weights
holding NaN or infinity are refused when loaded (:func:`divekit.weights.check_finite`), naming
the tensor. ``state.pt`` holds only tensors and plain Python values and loads with
``torch.load(weights_only=True)`` (:func:`divekit.weights.load_plain`: a pickle asking for more
is refused in one line).

Every file of a checkpoint (``model.safetensors``, ``state.pt``, ``latest``) is written with mode
``0600`` (:data:`FILE_MODE`): readable and writable by its owner only, whatever the umask, since
weights and optimizer state can be as private as the data they were trained on. The
``epoch-NNNN`` folders are ``0700`` (``mkdtemp``).
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from divekit.errors import DivekitError
from divekit.io import atomic_write_bytes, atomic_write_text
from divekit.weights import check_finite, load_plain

WEIGHTS = "model.safetensors"
STATE = "state.pt"
FILE_MODE = 0o600  # every file of a checkpoint: read and written by its owner only
POINTER = "latest"
# what ``latest`` may hold: one plain, visible name (no separator, no leading dot, no "..")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_POINTER_BYTES = 256  # a longer pointer is not one divekit wrote
# an end-of-epoch checkpoint (validated: its epoch's losses were finite), as opposed to a
# mid-epoch one, epoch-NNNN-step-SSSSSS (a restart point nothing has validated)
_EPOCH_END = re.compile(r"epoch-\d+")


def rng_state() -> dict[str, Any]:
    """Every random generator a training step can touch, in weights_only-loadable form."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_cpu(obj: Any, what: str = "the value") -> Any:
    """``obj`` with every tensor copied to the CPU (compact, detached), after checking that it
    holds only what ``torch.load(weights_only=True)`` reads back: ``None``, ``bool``, ``int``,
    ``float``, ``str``, tensors, and dicts (with str/int keys), lists and tuples of them."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, dict) and all(isinstance(k, str | int) for k in obj):
        return {k: plain_cpu(v, what) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        items = [plain_cpu(v, what) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    raise DivekitError(
        f"{what} holds a {type(obj).__name__!r} value; a checkpoint keeps only tensors, numbers, "
        "strings and None, in dicts, lists and tuples"
    )


def save_weights(model: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``model``'s state (or a state dict) as safetensors, written atomically with mode
    :data:`FILE_MODE`."""
    state = model if isinstance(model, dict) else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors), mode=FILE_MODE)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked finite; one line for a file that is missing
    or cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DivekitError(f"no weights file at {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DivekitError(f"cannot read weights {path}: {first}") from None
    check_finite(tensors, f"weights {path}")
    return tensors


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                 what: str = "the model") -> None:
    """Load a safetensors file into ``model``; a file that does not fit (a key missing or
    unexpected, or a tensor of another shape: a class list or vocabulary of another size than
    the weights) is one line naming the key and both shapes, and so is a tensor holding NaN or
    inf (:func:`check_finite`)."""
    tensors = read_weights(path)
    own = model.state_dict()
    shapes = [f"{k} is {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
              for k, v in tensors.items() if k in own and v.shape != own[k].shape]
    if shapes:
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        raise DivekitError(f"weights {path} do not fit {what}: {shapes[0]}{more}")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if strict and (missing or unexpected):
        raise DivekitError(
            f"weights {path} do not fit {what}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


class CheckpointDir:
    """Reads and writes the checkpoints of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        self.root = Path(run_dir) / "checkpoint"
        self.keep = keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint (``None`` before the first one).

        ``latest`` must be a plain file holding one plain name, of a directory of this
        ``checkpoint/`` folder (not a link out of it) with both files in it; anything else is a
        :class:`DivekitError` naming the pointer and its content, never a path followed out of
        the run."""
        pointer = self.root / POINTER
        if not pointer.exists() and not pointer.is_symlink():
            return None
        self._check_inside(self.root, pointer, "the checkpoint folder")
        if pointer.is_symlink() or not pointer.is_file():
            raise DivekitError(f"checkpoint pointer {pointer} is not a plain file (a link or a "
                               "folder); it must hold the name of a checkpoint of this run")
        with open(pointer, "rb") as f:
            raw = f.read(_POINTER_BYTES + 1)
        name = raw[:_POINTER_BYTES].decode("utf-8", "replace").strip()
        if len(raw) > _POINTER_BYTES or not _NAME.fullmatch(name):
            raise DivekitError(
                f"checkpoint pointer {pointer} holds {name[:200]!r}, "
                f"not the name of a checkpoint directory of {self.root} (such as 'epoch-0003'); "
                "it may not name a path, '..' or a hidden folder"
            )
        path = self.root / name
        self._check_inside(path, pointer, repr(name))
        for part in (path, path / WEIGHTS, path / STATE):
            if part.is_symlink():
                raise DivekitError(f"checkpoint pointer {pointer} holds {name!r}, whose {part.name} "
                                   f"is a symbolic link; a checkpoint's files must lie in the run")
        if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
            raise DivekitError(f"checkpoint pointer {pointer} holds {name!r}, which is not a "
                               f"complete checkpoint directory of {self.root}")
        return path

    def _check_inside(self, path: Path, pointer: Path, what: str) -> None:
        """``path`` resolved (links followed) must stay inside the run directory."""
        run = self.root.parent.resolve()
        if not path.resolve().is_relative_to(run):
            raise DivekitError(f"checkpoint pointer {pointer}: {what} leads out of the run "
                               f"{self.root.parent} (to {path.resolve()}); refused")

    def save(self, model: nn.Module | dict[str, torch.Tensor], state: dict[str, Any],
             name: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            save_weights(model, tmp / WEIGHTS)
            buffer = io.BytesIO()
            torch.save(state, buffer)
            atomic_write_bytes(tmp / STATE, buffer.getvalue(), mode=FILE_MODE)
            final = self.root / name
            if final.exists():  # left by a crash before `latest` moved to it: never the latest
                # one, set aside whole (a rename) rather than deleted file by file in place
                os.replace(final, tempfile.mkdtemp(prefix=f".{name}.old.", dir=self.root))
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.root / POINTER, name + "\n", mode=FILE_MODE)
        _fsync_dir(self.root)
        self._prune(keep_name=name)
        return final

    def load_state(self, path: Path) -> dict[str, Any]:
        """``state.pt`` read with ``weights_only=True``: a pickle asking for anything but
        tensors and plain values is refused in one line before any of it runs."""
        return load_plain(path / STATE, "checkpoint state")

    def discard_epoch(self, epoch: int) -> int:
        """Epoch ``epoch`` ended with a non-finite loss: remove the mid-epoch checkpoints taken
        during it (``epoch-{epoch-1}-step-*``; nothing validated their weights, and a huge
        learning rate can leave finite weights with NaN outputs) and point ``latest`` back at
        the newest end-of-epoch checkpoint (or remove it: none is good). The pointer moves
        first, so a reader never follows it to a removed directory. Returns how many were
        removed."""
        if not self.root.is_dir():
            return 0
        prefix = f"epoch-{epoch - 1:04d}-step-"
        doomed = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(prefix)]
        if not doomed:
            return 0
        ends = sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _EPOCH_END.fullmatch(p.name))
        if ends:
            atomic_write_text(self.root / POINTER, ends[-1] + "\n", mode=FILE_MODE)
        else:
            (self.root / POINTER).unlink(missing_ok=True)
        _fsync_dir(self.root)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        return len(doomed)

    def _prune(self, keep_name: str) -> None:
        """Keep the ``keep`` newest checkpoints, and always the newest end-of-epoch one: a run
        of mid-epoch checkpoints (``--checkpoint-every``) never prunes the last validated
        state away (:meth:`discard_epoch` returns to it when an epoch diverges)."""
        done = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        ends = [p.name for p in done if _EPOCH_END.fullmatch(p.name)]
        kept = {keep_name, *ends[-1:]}
        for old in [p for p in done if p.name not in kept][: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".*"):  # temp dirs and files left by a crash
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            elif stale.name.endswith(".tmp"):  # a `latest` being replaced (divekit.io)
                stale.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (a power cut after the rename keeps it); a no-op where
    directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
