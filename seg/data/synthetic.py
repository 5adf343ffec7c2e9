"""A procedural stand-in for the Falcon dataset: same layout, formats and raw mask values.

Each class has its own colour and texture, so a head can learn it; masks are uint16 raw values,
including 600 (Flowers), which the default class table folds into Background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np

# raw value -> (base RGB, texture kind, texture period in pixels)
_LOOKS = {
    0: ((40, 40, 40), "noise", 0),
    100: ((30, 110, 30), "blobs", 9),
    200: ((60, 200, 60), "noise", 0),
    300: ((215, 190, 120), "stripes_v", 6),
    500: ((140, 100, 50), "blobs", 5),
    550: ((120, 120, 60), "checker", 8),
    600: ((230, 80, 200), "noise", 0),
    700: ((110, 60, 20), "stripes_h", 4),
    800: ((150, 150, 150), "blobs", 14),
    7100: ((185, 120, 80), "stripes_d", 12),
    10000: ((140, 200, 240), "smooth", 0),
}
# Object classes drawn over the sky/landscape backdrop, with how often and how large.
_OBJECTS = [(100, 3, 90), (200, 3, 60), (300, 3, 80), (500, 3, 50), (550, 2, 40), (800, 3, 70),
            (600, 2, 18), (0, 1, 50)]

LAYOUT = {
    "train": "Offroad_Segmentation_Training_Dataset/train",
    "val": "Offroad_Segmentation_Training_Dataset/val",
    "test": "Offroad_Segmentation_testImages",
}


def _texture(kind: str, period: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "stripes_v":
        return np.sin(xx * (2 * np.pi / period))
    if kind == "stripes_h":
        return np.sin(yy * (2 * np.pi / period))
    if kind == "stripes_d":
        return np.sin((xx + yy) * (2 * np.pi / period))
    if kind == "checker":
        return np.where(((xx // period) + (yy // period)) % 2 == 0, 1.0, -1.0).astype(np.float32)
    if kind == "blobs":
        small = rng.standard_normal((h // period + 2, w // period + 2)).astype(np.float32)
        return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), -1.5, 1.5)
    if kind == "smooth":
        return yy / h * 2 - 1
    return np.clip(rng.standard_normal((h, w)).astype(np.float32), -2, 2) * 0.5


def make_scene(seed: int, width: int = 960, height: int = 540,
               objects: Optional[list[tuple[int, int, int]]] = None) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 HxWx3 image, uint16 HxW raw mask) of one procedural desert scene; `objects`
    (raw value, most per scene, radius) replaces the default class mix."""
    rng = np.random.default_rng(seed)
    raw = np.full((height, width), 7100, np.uint16)
    horizon = int(height * rng.uniform(0.25, 0.45))
    bumps = (np.sin(np.arange(width) / width * np.pi * rng.uniform(1, 4) + rng.uniform(0, 6)) * height * 0.04)
    for x in range(0, width, 8):  # a wavy horizon, in 8-pixel columns
        raw[: max(0, horizon + int(bumps[x])), x:x + 8] = 10000
    for value, count, radius in (_OBJECTS if objects is None else objects):
        for _ in range(rng.integers(0, count + 1)):
            cx, cy = int(rng.uniform(0, width)), int(rng.uniform(horizon, height))
            axes = (int(radius * rng.uniform(0.6, 1.6)), int(radius * rng.uniform(0.4, 1.0)))
            cv2.ellipse(raw, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, int(value), -1)
    for _ in range(rng.integers(0, 3)):  # logs: long thin bars
        cx, cy = int(rng.uniform(0, width)), int(rng.uniform(horizon, height))
        box = ((cx, cy), (rng.uniform(60, 160), rng.uniform(8, 16)), rng.uniform(-30, 30))
        cv2.fillPoly(raw, [cv2.boxPoints(box).astype(np.int32)], int(700))
    image = np.zeros((height, width, 3), np.float32)
    for value in np.unique(raw):
        color, kind, period = _LOOKS[int(value)]
        sel = raw == value
        tex = _texture(kind, period, height, width, rng)[sel]
        image[sel] = np.asarray(color, np.float32) * (1.0 + 0.18 * tex[:, None])
    image *= rng.uniform(0.85, 1.15)  # exposure
    image += rng.normal(0, 4, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), raw


def write_dataset(root: str | Path, counts: dict[str, int] | None = None,
                  width: int = 960, height: int = 540, seed: int = 0) -> Path:
    """Write `counts` scenes per split in the Falcon layout under root; returns root."""
    root = Path(root)
    counts = counts or {"train": 8, "val": 4, "test": 4}
    for s_i, (split, n) in enumerate(counts.items()):
        base = root / LAYOUT[split]
        (base / "Color_Images").mkdir(parents=True, exist_ok=True)
        (base / "Segmentation").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, raw = make_scene(seed * 100003 + s_i * 10007 + i, width, height)
            name = f"{split}_{i:05d}.png"
            cv2.imwrite(str(base / "Color_Images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(base / "Segmentation" / name), raw)
    return root
