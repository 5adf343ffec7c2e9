"""Segmentation metrics, mmsegmentation's definitions (DESIGN.md section 5).

Counting (`confusion_matrix`, summed over a whole split with `+=`) is separate from reduction
(`summarize`). Never average per batch or per image: that weights small images and rare classes
wrongly.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch

from seg.data.classes import IGNORE_INDEX

Array = Union[np.ndarray, torch.Tensor]


def confusion_matrix(pred: Array, target: Array, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Array:
    """[K, K] int64 counts, rows = ground truth, columns = prediction; ignored pixels excluded.

    Torch inputs stay on their device (and give a tensor); numpy inputs give an ndarray.
    """
    is_torch = isinstance(pred, torch.Tensor)
    p = pred if is_torch else torch.from_numpy(np.ascontiguousarray(pred))
    t = target if isinstance(target, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(target))
    if p.numel() != t.numel():
        raise ValueError(f"pred and target sizes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    t, p = t.reshape(-1).to(p.device, torch.long), p.reshape(-1).long()
    valid = (t != ignore_index) & (t >= 0) & (t < num_classes)
    if p.device.type == "cpu" and bool((((p < 0) | (p >= num_classes)) & valid).any()):
        # (on a GPU the predictions are an argmax over K logits: reading this flag would stall it every batch)
        raise ValueError(f"predictions must be class ids in 0..{num_classes - 1}")
    # Ignored pixels go to one extra bin that is dropped: no boolean indexing and no bincount, whose
    # data-dependent output sizes make a GPU wait for the host every batch.
    k2 = num_classes * num_classes
    index = torch.where(valid, t * num_classes + p.clamp(0, num_classes - 1), k2)
    counts = torch.zeros(k2 + 1, dtype=torch.long, device=p.device).scatter_add_(0, index, torch.ones_like(index))
    cm = counts[:k2].reshape(num_classes, num_classes)
    return cm if is_torch else cm.numpy()


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def summarize(cm: Array, class_names: Sequence[str]) -> dict:
    """Per-class and mean IoU, Dice and accuracy from a confusion matrix.

    IoU_c = TP / (TP + FP + FN); a class with TP + FP + FN = 0 is NaN and left out of the means
    (a class only predicted has IoU 0 and counts). `acc` is per-class recall (NaN when the class is
    absent from the ground truth); `aacc` is overall pixel accuracy.
    """
    cm = cm.detach().cpu().numpy() if isinstance(cm, torch.Tensor) else np.asarray(cm)
    cm = cm.astype(np.float64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix is {cm.shape}, expected ({k}, {k}) for {k} class names")
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    union = gt + predicted - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(gt + predicted > 0, 2 * tp / (gt + predicted), np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = cm.sum()
    present = gt > 0
    return {
        "class_names": list(class_names),
        "iou": iou.tolist(),
        "miou": _nanmean(iou),
        "dice": dice.tolist(),
        "mdice": _nanmean(dice),
        "acc": acc.tolist(),
        "macc": _nanmean(acc),
        "aacc": float(tp.sum() / total) if total else float("nan"),
        "present": [n for n, p in zip(class_names, present) if p],
        "absent": [n for n, u in zip(class_names, union) if u == 0],
        "miou_present": _nanmean(iou[present]) if present.any() else float("nan"),
        "gt_share": (gt / total).tolist() if total else [float("nan")] * k,
        "pixels": int(total),
    }


def jsonable(obj):
    """NaN -> None, recursively, so the JSON we write is valid JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def format_table(summary: dict) -> str:
    """A terminal table: class, IoU, Dice, accuracy, share of ground-truth pixels; absent classes marked."""

    def f(v: float) -> str:
        return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.4f}"

    names = summary["class_names"]
    width = max(14, max(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Dice':>6}  {'Acc':>6}  {'GT %':>6}",
             "-" * (width + 34)]
    for i, n in enumerate(names):
        share = summary["gt_share"][i]
        note = "  (absent: not in GT, not predicted)" if n in summary["absent"] else (
            "  (not in GT)" if n not in summary["present"] else "")
        share_txt = "   -  " if share is None or math.isnan(share) else f"{100 * share:6.2f}"
        lines.append(f"{n:<{width}}  {f(summary['iou'][i])}  {f(summary['dice'][i])}  {f(summary['acc'][i])}  "
                     f"{share_txt}{note}")
    lines.append("-" * (width + 34))
    lines.append(f"{'mean':<{width}}  {f(summary['miou'])}  {f(summary['mdice'])}  {f(summary['macc'])}")
    lines.append(f"mIoU {f(summary['miou']).strip()} over {sum(1 for v in summary['iou'] if not _isnan(v))} classes; "
                 f"mIoU over classes present in GT {f(summary['miou_present']).strip()}; "
                 f"pixel accuracy {f(summary['aacc']).strip()}")
    if summary["absent"]:
        lines.append(f"absent (excluded from means): {', '.join(summary['absent'])}")
    return "\n".join(lines)


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))
