"""The Falcon dataset layout: where a split's images and masks are and how they pair."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seg.data.file_names import check_utf8_name
from seg.runtime.errors import SegError

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
    for name in images:  # before anything is written: the manifest records every name as text
        check_utf8_name(root / IMAGE_DIR / name)
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
