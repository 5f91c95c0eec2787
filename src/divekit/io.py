"""Atomic file writes (and a checked JSON read), the leaf every layer may import.

A file is written to a temporary name in its own directory, flushed to disk, then renamed over
its final name, so a reader (or a crash) never sees half a file: the old version or the new one.

Output files named by the user are planned here too (:func:`check_output`,
:func:`plan_outputs`): never one of the command's inputs, one per input, and an existing file
replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from divekit.errors import DivekitError

_UMASK = os.umask(0)
os.umask(_UMASK)


class NotWritable(DivekitError, OSError):
    """An output whose folder cannot hold a new file (``/proc``, read-only, not a folder): one
    line naming it. Still an :class:`OSError` for the callers that handle those."""


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in ``path``'s folder (made if missing), or :class:`NotWritable`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise NotWritable(f"cannot write {path}: {e.strerror or e} (in {path.parent})") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    ``mode`` gives the file's permission bits (default: ``0666`` less the umask, as ``open``).
    """
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path`` (a ``config.json``, a ``tokenizer_config.json``); a file that
    is not valid JSON, or holds a list or a number instead of an object, is one line naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DivekitError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DivekitError(f"{path} is not a JSON object")
    return data


# ----------------------------------------------------------------------------- output paths
# Every command that writes files named by the user plans them here, before any work: an output
# is never one of the command's inputs, two inputs never share an output, and an existing file
# is replaced only with --overwrite.
def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode when both exist (hard links and
    symbolic links included), else the same resolved path."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
        return pa.resolve() == pb.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name the OS refuses
        return False


def _paths(inputs: Any) -> list[str | os.PathLike]:
    """The entries of ``inputs`` that can name files (tensors and other objects left out)."""
    return [p for p in inputs if isinstance(p, str | os.PathLike)]


def check_output(path: str | os.PathLike, inputs: Any = (), *, overwrite: bool = False,
                 option: str = "-o") -> Path:
    """``path`` as an output file of a command reading ``inputs``: never one of the inputs
    (even with ``overwrite``), never a folder, and not an existing file unless ``overwrite``.
    Each refusal is one line naming the file and ``option``."""
    out = Path(path)
    if str(path) == "" or out.is_dir():
        raise DivekitError(f"{option} {str(path)!r} is a folder; give a file name")
    for item in _paths(inputs):
        if same_file(out, item):
            raise DivekitError(f"{option} {str(path)!r} is one of the inputs ({str(item)!r}); "
                               "refusing to overwrite the input file: choose another name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise DivekitError(f"{option} {str(path)!r} exists; pass --overwrite to replace it")
    return out


def plan_outputs(inputs: Any, out_dir: str | os.PathLike, suffix: str, *,
                 overwrite: bool = False, option: str = "-o") -> list[Path]:
    """One output file per input: ``out_dir/<stem><suffix>``. The second input with the same
    stem (``a/x.png``, ``b/x.jpg``) gets ``<stem>-2<suffix>``, the third ``-3``, and so on, in
    the order given; a name that is itself one of the inputs is skipped the same way. Every
    planned file then passes :func:`check_output` (an existing one needs ``overwrite``), so
    nothing is written unless every name is free. ``out_dir`` may exist (as a folder)."""
    folder = Path(out_dir)
    if str(out_dir) == "" or (folder.exists() and not folder.is_dir()):
        raise DivekitError(f"{option} {str(out_dir)!r} exists and is not a folder")
    sources = _paths(inputs)
    taken: list[Path] = []
    planned = []
    for item in inputs:
        stem, n = Path(str(item)).stem or "output", 1
        while True:
            path = folder / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}"
            if not any(same_file(path, p) for p in (*sources, *taken)):
                break
            n += 1
        taken.append(path)
        planned.append(check_output(path, sources, overwrite=overwrite, option=option))
    return planned
