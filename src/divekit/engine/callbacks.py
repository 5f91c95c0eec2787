"""What the Trainer reports while it runs: progress bar, CSV log, curves, TensorBoard."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from divekit.io import atomic_write_text


class ProgressBar:
    """One tqdm bar per epoch: running loss/accuracy and samples per second."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: tqdm | None = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.enabled:
            self.bar = tqdm(
                total=steps, desc=f"epoch {epoch}/{epochs}", unit="step", leave=True,
                dynamic_ncols=True, file=sys.stderr,
            )

    def update(self, n: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def end_epoch(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            shown = {k: _fmt(v) for k, v in row.items() if k.startswith(("train_", "val_"))}
            self.bar.set_postfix(shown)
            self.bar.close()
            self.bar = None


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole log atomically from the history (which the checkpoint also holds)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


class TensorBoardLogger:
    """Scalars to TensorBoard event files, when the tensorboard package is installed."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
            print(
                "warning: --tensorboard needs the tensorboard package (pip install tensorboard);"
                " continuing without it", file=sys.stderr,
            )
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
