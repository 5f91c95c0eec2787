"""What ``divekit evaluate`` and ``divekit predict`` print for detection runs.

The generic commands open the run and call the engine (``evaluate(run_dir)``,
``predict(run_dir, images, threshold=..., nms_iou=..., output=...)``); these turn the values
they return into lines.
"""

from __future__ import annotations

from typing import Any

TASKS = ("detect",)


def format_metrics(metrics: dict[str, Any]) -> str:
    """``loss 0.1234, class_err 0.0100, ..., map50 0.9890, map 0.6210``: every number the
    validation gave (the per-image detections are left out)."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                     if isinstance(v, int | float) and not isinstance(v, bool))


def format_prediction(item: dict[str, Any]) -> str:
    """``photo.jpg: disc 0.912 at [12.0, 30.5, 70.2, 88.0]; ... -> out/photo.pred.png``."""
    shown = "; ".join(f"{c} {s:.3f} at {b}" for c, s, b in item["detections"]) or "no objects"
    picture = item.get("picture")
    return f"{item['image']}: {shown}" + (f" -> {picture}" if picture else "")

