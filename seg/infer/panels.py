"""The image | ground truth | prediction panel of `seg predict`, with a title over each part and a
legend strip of the classes that appear in the truth or the prediction."""

from __future__ import annotations

import cv2
import numpy as np

from seg.data.classes import ClassTable

TITLES = ("image", "ground truth", "prediction")


def _bar(width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), 255, np.uint8)


def _text(img: np.ndarray, text: str, x: int, height: int, scale: float) -> None:
    cv2.putText(img, text, (x, int(height * 0.7)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def compare_panel(image: np.ndarray, truth_rgb: np.ndarray, pred_rgb: np.ndarray, truth: np.ndarray,
                  pred: np.ndarray, table: ClassTable) -> np.ndarray:
    """RGB [title bar + H + legend bar, 3W, 3]: the three views side by side at the image's size."""
    h, w = image.shape[:2]
    bar_h = max(20, h // 18)
    scale = bar_h / 32
    titles = _bar(3 * w, bar_h)
    for i, title in enumerate(TITLES):
        _text(titles, title, i * w + bar_h // 3, bar_h, scale)
    legend = _bar(3 * w, bar_h)
    present = [c for c in range(table.num_classes) if (truth == c).any() or (pred == c).any()]
    x = bar_h // 3
    for c in present:
        name = table.names[c]
        width = int(cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0])
        if x + bar_h + width > 3 * w:
            break
        legend[bar_h // 5: bar_h - bar_h // 5, x: x + bar_h - 2 * (bar_h // 5)] = table.colors[c]
        _text(legend, name, x + bar_h, bar_h, scale)
        x += bar_h + width + bar_h // 2
    return np.concatenate([titles, np.concatenate([image, truth_rgb, pred_rgb], axis=1), legend], axis=0)
