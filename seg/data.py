"""Reading the Falcon dataset layout: image/mask pairing, decoding, raw value -> class id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from seg.errors import SegError

SPLITS = ("train", "val", "test")
IMAGE_DIR = "Color_Images"
MASK_DIR = "Segmentation"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class SplitFiles:
    split: str
    root: Path                      # the folder holding Color_Images/ and Segmentation/
    names: tuple[str, ...]          # sorted image file names; masks share them
    has_masks: bool

    def image_path(self, i: int) -> Path:
        return self.root / IMAGE_DIR / self.names[i]

    def mask_path(self, i: int) -> Path:
        return self.root / MASK_DIR / mask_name(self.names[i])


def mask_name(image_name: str) -> str:
    """Masks are PNG whatever the image's format: frame.jpg -> frame.png."""
    return Path(image_name).stem + ".png"


def split_dir(data_root: Path, split: str) -> Path:
    """Where a split lives: the download layout first, then a plain ROOT/<split>/."""
    if split not in SPLITS:
        raise SegError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    candidates = [
        data_root / "Offroad_Segmentation_Training_Dataset" / split,
        data_root / split,
    ]
    if split == "test":
        candidates.insert(0, data_root / "Offroad_Segmentation_testImages")
    for c in candidates:
        if (c / IMAGE_DIR).is_dir():
            return c
    tried = ", ".join(str(c / IMAGE_DIR) for c in candidates)
    raise SegError(f"{data_root}: no {split} split found (looked for {tried})")


def list_split(data_root: str | Path, split: str, require_masks: bool = True) -> SplitFiles:
    root = split_dir(Path(data_root), split)
    images = sorted(p.name for p in (root / IMAGE_DIR).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SegError(f"{root / IMAGE_DIR}: no images")
    mask_dir = root / MASK_DIR
    if not mask_dir.is_dir():
        if require_masks:
            raise SegError(f"{mask_dir}: mask folder missing")
        return SplitFiles(split, root, tuple(images), False)
    stems = {}
    for n in images:
        if mask_name(n) in stems:
            raise SegError(f"{root / IMAGE_DIR / n}: shares its mask name {mask_name(n)} with "
                           f"{stems[mask_name(n)]}; rename one of them")
        stems[mask_name(n)] = n
    masks = {p.name for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    missing = [n for n in images if mask_name(n) not in masks]
    if missing:
        raise SegError(f"{root / IMAGE_DIR / missing[0]}: no mask {mask_dir / mask_name(missing[0])}"
                       + (f" (and {len(missing) - 1} more images without masks)" if len(missing) > 1 else ""))
    orphans = sorted(masks.difference(stems))
    if orphans:
        raise SegError(f"{mask_dir / orphans[0]}: mask without an image in {root / IMAGE_DIR}"
                       + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""))
    return SplitFiles(split, root, tuple(images), True)


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 HxWx3."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SegError(f"{path}: cannot read image (missing, corrupt or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_raw_mask(path: Path) -> np.ndarray:
    # IMREAD_UNCHANGED keeps the uint16 values; IMREAD_GRAYSCALE would truncate 7100 and 10000.
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


def worker_count(cap: int = 8) -> int:
    """Loader processes: all cores but one (the compute owns it), at least 1, at most cap."""
    return max(1, min(cap, (os.cpu_count() or 2) - 1))
