"""Decoding one sample: RGB image, raw mask values, raw value -> class id through the class table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from seg.data.falcon import SplitFiles
from seg.data.file_names import check_utf8_name
from seg.runtime.errors import SegError


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 HxWx3."""
    check_utf8_name(path)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SegError(f"{path}: cannot read image (missing, corrupt or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_raw_mask(path: Path) -> np.ndarray:
    # IMREAD_UNCHANGED keeps the uint16 values; IMREAD_GRAYSCALE would truncate 7100 and 10000.
    check_utf8_name(path)
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise SegError(f"{path}: cannot read mask (missing, corrupt or not an image)")
    if raw.ndim == 3:
        # An RGB-saved mask with equal channels is usable; anything else is ambiguous.
        if not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])):
            raise SegError(f"{path}: mask has {raw.shape[2]} differing channels; expected one channel of raw values")
        raw = raw[..., 0]
    return raw


def map_mask(raw: np.ndarray, lut: np.ndarray, path: Path) -> np.ndarray:
    """Raw values -> uint8 class ids; any value the table does not know is an error naming it."""
    if raw.dtype not in (np.uint8, np.uint16):
        raise SegError(f"{path}: mask pixels are {raw.dtype}; expected 8- or 16-bit unsigned raw values")
    ids = lut[raw]
    if (ids < 0).any():
        unknown = np.unique(raw[ids < 0])
        shown = ", ".join(str(int(v)) for v in unknown[:10])
        raise SegError(f"{path}: unknown mask value(s) {shown}"
                       + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                       + " (not in the class table; pass --classes FILE to map them)")
    return ids.astype(np.uint8)


def read_pair(image_path: Path, mask_path: Optional[Path], lut: Optional[np.ndarray]
              ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Image (RGB uint8) and its class-id mask (uint8) at the original size; no mask when
    mask_path or lut is None."""
    image = read_image(image_path)
    if mask_path is None or lut is None:
        return image, None
    mpath = mask_path
    raw = read_raw_mask(mpath)
    if raw.shape[:2] != image.shape[:2]:
        h, w = image.shape[:2]
        raise SegError(f"{mpath}: mask is {raw.shape[1]}x{raw.shape[0]} but its image is {w}x{h}")
    return image, map_mask(raw, lut, mpath)


def read_split_pair(files: SplitFiles, i: int, lut: Optional[np.ndarray]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    return read_pair(files.image_path(i), files.mask_path(i) if files.has_masks else None, lut)
