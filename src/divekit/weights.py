"""Weights files: read without executing anything, torchvision's published files by name.

Every weights file divekit reads comes through here, whoever reads it: a model
(``create_model("maskrcnn", weights="COCO_V1")``, VGG-19 for ``stylize``), a task (a
``finetune`` SOURCE, ``resnet18:IMAGENET1K_V1``), the engine (a checkpoint's ``state.pt``). The
module sits below :mod:`divekit.models` and :mod:`divekit.data` (it imports only the hub's
verified download, :mod:`divekit.hub`), so a model never reads from the data layer.

Reading a file:

* :func:`load_plain` is ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
  containers only, so nothing in the file can run; a pickle that asks for more is refused in
  one line naming the file and what it asked for, instead of torch's multi-line message;
* :func:`load_state_file` reads a state dict from ``.safetensors`` or a ``torch.save`` file
  and refuses one holding NaN or inf (:func:`check_finite`): such weights turn every output
  into NaN, which would otherwise be printed as if it were a result.

torchvision's ``Weights.get_state_dict`` goes through ``torch.hub.load_state_dict_from_url``,
which unpickles with ``weights_only=False`` and checks a file's hash only right after
downloading it, never when it is already in the cache: a file put in the cache under a
torchvision name runs whatever its pickle says. Every torchvision weights name divekit takes
comes here instead (:func:`torchvision_state`):

* the file is looked for in torch's hub cache, ``$TORCH_HOME/hub/checkpoints`` (where
  torchvision puts it, so a file it downloaded before is reused);
* its SHA-256 must start with the hex digits in its name (``resnet18-f37072fd.pth``: torch.hub's
  convention), checked before *every* use, not only after a download;
* a missing file is fetched with :func:`divekit.hub.download` (temporary name, hash, then
  rename), and only with ``download_missing=True``;
* it is read with :func:`load_state_file`;
* a file that fails any of these is refused in one line naming it, and left where it is for
  its owner to look at (divekit never deletes or replaces it).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from divekit.errors import DivekitError
from divekit.hub import digest_matches, download, file_digest

HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")  # torch.hub's HASH_REGEX, at least 8 digits
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BLOCKED = re.compile(r"(?:GLOBAL|global|function) ([\w.]+)")


# ----------------------------------------------------------------------------- reading a file
def load_plain(path: str | os.PathLike[str], what: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure one line.

    A pickle that asks for anything but tensors and plain values (a function to call, a class
    to build) is refused before any of it runs: the error names the file and what it asked for.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise DivekitError(f"{label}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _BLOCKED.search(_ANSI.sub("", str(e)))
        asked = f" ({found.group(1)})" if found else ""
        raise DivekitError(
            f"{label} holds objects a checkpoint must not hold{asked}; refused without executing "
            "it (torch.load weights_only=True)"
        ) from None
    except Exception as e:  # noqa: BLE001 - zip, EOF and format errors of a foreign file
        raise DivekitError(f"{label} is not a file torch.load can read: {_first_line(e)}") from None


def load_state_file(path: str | os.PathLike[str], what: str = "weights file") -> dict[str, Tensor]:
    """A state dict (parameter name → tensor) from ``.safetensors`` or a ``torch.save`` file
    (:func:`load_plain`); ``{"state_dict": ...}`` and ``{"model": ...}`` wrappers are unwrapped.

    Every refusal is one line starting with ``what`` and the path: a missing or unreadable
    file, one that holds no state dict, and weights holding NaN or inf (:func:`check_finite`).
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise DivekitError(f"{label}: no such file")
        try:
            obj: Any = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise DivekitError(f"{label} is not a safetensors file: {_first_line(e)}") from None
    else:
        obj = load_plain(path, what)
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise DivekitError(f"{label} does not hold a state dict (parameter name → tensor)")
    check_finite(obj, label)
    return obj


def check_finite(tensors: dict[str, Tensor], what: str) -> None:
    """Refuse weights holding NaN or ±inf, in one line naming the first such tensor: such
    weights turn every output into NaN, which would otherwise be printed as if it were a result.
    Integer tensors (step counters) cannot hold either and are skipped."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_nan = int(torch.isnan(t).sum())
            kinds = " and ".join(k for k, n in (("NaN", n_nan), ("inf", int(bad.sum()) - n_nan))
                                 if n)
            raise DivekitError(
                f"{what}: tensor {name!r} holds {kinds} ({int(bad.sum())} of {t.numel()} values); "
                "refusing weights that are not finite (did the training diverge?)"
            )


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------------------- the cache
def weights_dir() -> Path:
    """torch's hub cache for weight files: ``$TORCH_HOME/hub/checkpoints`` (torchvision's)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hash_prefix(filename: str) -> str:
    """The SHA-256 prefix a torch.hub file name carries: ``resnet18-f37072fd.pth`` → ``f37072fd``."""
    found = HASH_IN_NAME.search(filename)
    if found is None:
        raise DivekitError(f"weights file name {filename!r} carries no sha256 prefix "
                           "(NAME-<hex>.pth); divekit cannot check it")
    return found.group(1)


def verify_file(path: str | os.PathLike[str]) -> Path:
    """``path`` if its SHA-256 starts with the prefix in its name; else a one-line refusal (the
    file is left in place)."""
    path = Path(path)
    expected = hash_prefix(path.name)
    actual = file_digest(path, "sha256")
    if not digest_matches(actual, expected):
        raise DivekitError(
            f"refusing {path}: its sha256 is {actual[:len(expected)]}..., its name says "
            f"{expected} (corrupted or replaced); left in place, delete it to download it again"
        )
    return path


def weights_file(url: str, *, cache_dir: str | os.PathLike[str] | None = None,
                 download_missing: bool = True, progress: bool = True) -> Path:
    """The checked local copy of a torch.hub weights ``url``: from the cache (hash checked
    now), else downloaded with the hub's verified download when ``download_missing``."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    expected = hash_prefix(name)
    folder = Path(cache_dir) if cache_dir is not None else weights_dir()
    path = folder / name
    if path.exists():
        return verify_file(path)
    if not download_missing:
        raise DivekitError(f"{name} is not in {folder} and divekit does not download it here: "
                           f"fetch {url} into that folder")
    download(url, folder, sha1=f"sha256:{expected}...", filename=name, progress=progress)
    return verify_file(path)


def is_cached(weights: Any, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether torchvision ``weights`` (a ``WeightsEnum`` member) have a file in the cache
    (not yet checked: :func:`torchvision_state` checks it)."""
    name = weights.url.split("?", 1)[0].rsplit("/", 1)[-1]
    folder = Path(cache_dir) if cache_dir is not None else weights_dir()
    return (folder / name).exists()


def torchvision_state(weights: Any, *, cache_dir: str | os.PathLike[str] | None = None,
                      download_missing: bool = True, progress: bool = True) -> dict[str, Tensor]:
    """The state dict of torchvision ``weights`` (a ``WeightsEnum`` member such as
    ``ResNet18_Weights.IMAGENET1K_V1``), through :func:`weights_file` and
    :func:`load_state_file`: what ``weights.get_state_dict()`` returns, without its risks."""
    path = weights_file(weights.url, cache_dir=cache_dir, download_missing=download_missing,
                        progress=progress)
    return load_state_file(path, f"torchvision {type(weights).__name__}.{weights.name}:")
