"""PNG plots: training curves, per-class IoU bars, row-normalised confusion matrix."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from seg.runtime.atomic import write_atomic  # noqa: E402


def _save(fig, path: Path) -> None:
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.plot(epochs, [h["val_miou"] for h in history], "o-", color="C2")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("val mIoU"), ax2.grid(alpha=0.3)
    # tidy with one or two epochs too: whole epochs on x with room beside the points, mIoU on its
    # 0..1 scale, the loss from 0 (one point would otherwise get a +-4 % axis of unreadable ticks)
    losses = [v for h in history for v in (h["train_loss"], h["val_loss"]) if v is not None and np.isfinite(v)]
    ax1.set_ylim(0, 1.1 * max(losses) if losses else 1)
    if len(epochs) < 3:  # longer runs keep the automatic scale, which shows small mIoU differences
        ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        if len(epochs) <= 12:  # MaxNLocator falls back to fractions below two integers in view
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    best = int(np.nanargmax([h["val_miou"] if h["val_miou"] is not None else np.nan for h in history])) \
        if any(h["val_miou"] is not None for h in history) else None
    if best is not None:
        ax2.annotate(f"best {history[best]['val_miou']:.4f}", (epochs[best], history[best]["val_miou"]),
                     xytext=(0, 8), textcoords="offset points", ha="center")
    _save(fig, path)


def per_class_iou(iou: Sequence[float | None], names: Sequence[str], path: Path, title: str = "per-class IoU") -> None:
    values = [np.nan if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in iou]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 4))
    bars = ax.bar(range(len(names)), np.nan_to_num(values), color="C0")
    for i, v in enumerate(values):
        ax.text(i, (0 if np.isnan(v) else v) + 0.01, "absent" if np.isnan(v) else f"{v:.2f}", ha="center", fontsize=8)
        if np.isnan(v):
            bars[i].set_color("lightgray")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylim(0, 1.08), ax.set_ylabel("IoU"), ax.set_title(title), ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def confusion(cm: np.ndarray, names: Sequence[str], path: Path) -> None:
    """Rows = ground truth, normalised to 1; empty rows stay blank."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * k, 0.8 + 0.7 * k))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if not np.isnan(norm[i, j]) and norm[i, j] >= 0.005:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=45, ha="right"), ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted"), ax.set_ylabel("ground truth"), ax.set_title("confusion (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def legend(names: Sequence[str], colors: Sequence[Sequence[int]], path: Path, title: str = "classes") -> None:
    """The colour of each class, as the masks and overlays draw it: one swatch and name per row."""
    fig, ax = plt.subplots(figsize=(3.2, 0.32 * len(names) + 0.6))
    for i, (name, rgb) in enumerate(zip(names, colors)):
        y = len(names) - 1 - i
        ax.add_patch(plt.Rectangle((0, y + 0.1), 0.8, 0.8, color=np.asarray(rgb) / 255.0, ec="black", lw=0.5))
        ax.text(1.1, y + 0.5, f"{i}  {name}", va="center", fontsize=9)
    ax.set_xlim(0, 6), ax.set_ylim(0, len(names)), ax.axis("off"), ax.set_title(title, fontsize=10, loc="left")
    _save(fig, path)
