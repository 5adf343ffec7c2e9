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


def legend_strip(width: int, height: int, classes: list[int], table: ClassTable) -> np.ndarray:
    """A white strip with a colour swatch and the name of each class in `classes`, left to right
    (those that do not fit are left out)."""
    bar_h = max(20, height // 18)
    scale = bar_h / 32
    strip = _bar(width, bar_h)
    x = bar_h // 3
    for c in classes:
        name = table.names[c]
        text_w = int(cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0])
        if x + bar_h + text_w > width:
            break
        strip[bar_h // 5: bar_h - bar_h // 5, x: x + bar_h - 2 * (bar_h // 5)] = table.colors[c]
        _text(strip, name, x + bar_h, bar_h, scale)
        x += bar_h + text_w + bar_h // 2
    return strip


def present(table: ClassTable, *maps: np.ndarray) -> list[int]:
    """The classes that appear in any of the class-id maps, in id order (one counting pass per map,
    not one comparison per class)."""
    k = table.num_classes
    counts = sum(np.bincount(m.ravel(), minlength=k)[:k] for m in maps)
    return [int(c) for c in np.flatnonzero(counts)]


def compare_panel(image: np.ndarray, truth_rgb: np.ndarray, pred_rgb: np.ndarray, truth: np.ndarray,
                  pred: np.ndarray, table: ClassTable) -> np.ndarray:
    """RGB [title bar + H + legend bar, 3W, 3]: the three views side by side at the image's size."""
    h, w = image.shape[:2]
    bar_h = max(20, h // 18)
    scale = bar_h / 32
    titles = _bar(3 * w, bar_h)
    for i, title in enumerate(TITLES):
        _text(titles, title, i * w + bar_h // 3, bar_h, scale)
    legend = legend_strip(3 * w, h, present(table, truth, pred), table)
    return np.concatenate([titles, np.concatenate([image, truth_rgb, pred_rgb], axis=1), legend], axis=0)
