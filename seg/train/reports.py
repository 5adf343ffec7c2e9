"""What a run writes for people and tools besides its checkpoints: history, metrics, plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from seg.runtime.atomic import write_json, write_text
from seg.scoring import plots
from seg.scoring.metrics import format_table, jsonable
from seg.train.presets import TrainConfig


def describe_config(cfg: TrainConfig, extra: dict) -> str:
    items = {**cfg.to_dict(), **extra}
    width = max(len(k) for k in items)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in items.items())


def write_history(out: Path, history: list[dict]) -> None:
    write_json(out / "history.json", jsonable(history))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    write_text(out / "history.csv", buf.getvalue())


def write_metrics(out: Path, summary: dict, cm: list, epoch: int, names: list[str]) -> None:
    metrics = {"epoch": epoch, "split": "val", **summary, "confusion_matrix": cm}
    write_json(out / "metrics.json", jsonable(metrics))
    write_text(out / "metrics.txt", f"best epoch {epoch} (val)\n" + format_table(summary) + "\n")
    plots.per_class_iou(summary["iou"], names, out / "per_class_iou.png", title=f"val per-class IoU, epoch {epoch}")
