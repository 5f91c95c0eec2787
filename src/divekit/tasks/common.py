"""What every task shares: run directories, saved configs, building configs from dicts."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from divekit import __version__
from divekit.engine.checkpoint import CheckpointDir
from divekit.io import atomic_write_json
from divekit.errors import DivekitError

C = TypeVar("C")

CONFIG = "config.json"


@dataclass
class TrainResult:
    """What ``train(config)`` returns: where the run lives, its history, the trained model."""

    run_dir: Path
    history: list[dict[str, Any]]
    model: nn.Module = field(repr=False)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build a config dataclass, refusing unknown keys with the list of known ones."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise DivekitError(f"unknown option(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**values)


def choose_run_dir(out: str | None, default_name: str, resume: bool) -> Path:
    """The run directory: ``--out`` as given, else ``runs/<model>-<data>[-N]``.

    A fresh run never overwrites another run's checkpoints; ``resume`` needs one to exist.
    Without ``--out``, a fresh run takes the first free ``-N`` suffix and ``resume`` takes the
    newest run of that name.
    """
    if out is not None:
        path = Path(out)
        has_ckpt = CheckpointDir(path).latest() is not None
        if resume and not has_ckpt:
            raise DivekitError(f"nothing to resume: {path} holds no checkpoint")
        if not resume and has_ckpt:
            raise DivekitError(
                f"{path} already holds a run; pass --resume to continue it or choose another --out"
            )
        return path
    base = Path("runs") / default_name
    candidates = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 1000)]
    if resume:
        existing = [p for p in candidates if CheckpointDir(p).latest() is not None]
        if not existing:
            raise DivekitError(f"nothing to resume: no run with a checkpoint under {base}*")
        return existing[-1]
    for path in candidates:
        if not path.exists():
            return path
    raise DivekitError(f"too many runs named {base}; pass --out")


def save_run_config(run_dir: Path, task: str, config: Any, extra: dict[str, Any]) -> None:
    record = {
        "task": task,
        "divekit_version": __version__,
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else "",
        "config": dataclasses.asdict(config),
        **extra,
    }
    atomic_write_json(run_dir / CONFIG, record)


def load_run_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise DivekitError(f"{run_dir} is not a divekit run directory (no {CONFIG})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DivekitError(f"{path} is not valid JSON: {e}") from None


def latest_weights(run_dir: str | Path) -> Path:
    ckpt = CheckpointDir(run_dir).latest()
    if ckpt is None:
        raise DivekitError(f"{run_dir} holds no checkpoint yet (train it first)")
    return ckpt / "model.safetensors"
