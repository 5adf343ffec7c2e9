"""Where a dataset's samples are: the public layouts users already hold, found by looking at the
folder (`--layout auto`), and one reader for every stage.

| layout | split folders | image | mask |
|---|---|---|---|
| falcon | Offroad_Segmentation_Training_Dataset/<split>, ROOT/<split>, Offroad_Segmentation_testImages | Color_Images/NAME | Segmentation/STEM.png |
| folders | ROOT/<split> | images/NAME | masks/STEM.png |
| cityscapes | ROOT | leftImg8bit/<split>/<city>/CITY_SEQ_FRAME_leftImg8bit.png | gtFine/<split>/<city>/CITY_SEQ_FRAME_gtFine_labelIds.png |
| ade20k | ADEChallengeData2016 (train = training, val = validation) | images/<split>/NAME.jpg | annotations/<split>/STEM.png |
| voc | VOCdevkit/VOC2012 (ImageSets/Segmentation/<split>.txt lists the samples) | JPEGImages/STEM.jpg | SegmentationClass/STEM.png |

A sample is named by its image's file name (no folders), so a manifest records plain names; the
layout turns (data dir, split, name) back into paths.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Optional

from seg.data.file_names import check_utf8_name, is_hidden, listing, name_key
from seg.runtime.errors import SegError

LAYOUTS = ("falcon", "folders", "cityscapes", "ade20k", "voc")
SPLITS = ("train", "val", "test")
UNLABELED = "images"  # the per-split layout of an unlabeled folder of images
VIDEO = "video"       # ... of every N-th frame of a video (samples named FILE@NNNNNNN, seg.data.video_frames)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FALCON_TRAIN, FALCON_TEST = "Offroad_Segmentation_Training_Dataset", "Offroad_Segmentation_testImages"
CITYSCAPES_IMAGE, CITYSCAPES_MASK = "_leftImg8bit.png", "_gtFine_labelIds.png"
ADE_SPLITS = {"train": "training", "val": "validation"}
VOC_ROOTS = ("VOCdevkit/VOC2012", "VOC2012", ".")
ADE_ROOTS = ("ADEChallengeData2016", ".")


@dataclass(frozen=True)
class SplitFiles:
    split: str
    root: Path                      # the split's data dir, recorded in the manifest
    names: tuple[str, ...]          # sorted image file names (no folders); masks follow from them
    has_masks: bool
    layout: str = "falcon"
    flip_of: Optional[str] = None   # an unlabeled split's twin: its views, each flipped left-right

    def image_path(self, i: int) -> Path:
        return sample_paths(self.layout, self.root, self.split, self.names[i])[0]

    def mask_path(self, i: int) -> Path:
        return sample_paths(self.layout, self.root, self.split, self.names[i])[1]


def mask_name(image_name: str) -> str:
    """Masks are PNG whatever the image's format: frame.jpg -> frame.png."""
    return Path(image_name).stem + ".png"


def mask_file(folder: Path, image_name: str) -> Path:
    """The mask of an image in `folder`: STEM.png, or the file whose name matches it by name_key."""
    wanted = folder / mask_name(image_name)
    if wanted.exists():
        return wanted
    try:
        mtime = os.stat(folder).st_mtime_ns
    except OSError:
        return wanted
    found = listing(str(folder), mtime).get(name_key(wanted.name))
    return folder / found if found else wanted


def sample_paths(layout: str, data_dir: str | Path, split: str, name: str) -> tuple[Path, Path]:
    """(image, mask) of sample `name` of a split whose data dir is `data_dir`."""
    root = Path(data_dir)
    if layout == "falcon":
        return root / "Color_Images" / name, mask_file(root / "Segmentation", name)
    if layout == "folders":
        return root / "images" / name, mask_file(root / "masks", name)
    if layout == "cityscapes":
        city = name.split("_")[0]
        stem = name[: -len(CITYSCAPES_IMAGE)]
        return (root / "leftImg8bit" / split / city / name, root / "gtFine" / split / city / (stem + CITYSCAPES_MASK))
    if layout == "ade20k":
        sub = ADE_SPLITS.get(split, split)
        return root / "images" / sub / name, mask_file(root / "annotations" / sub, name)
    if layout == "voc":
        return root / "JPEGImages" / name, mask_file(root / "SegmentationClass", name)
    if layout == UNLABELED:  # a folder of images without masks (seg.data.unlabeled): no mask path exists
        return root / name, root / f".{name}.no-mask"
    if layout == VIDEO:  # a frame of a video in the data dir: its source file is the video
        return root / name.rpartition("@")[0], root / f".{name}.no-mask"
    raise SegError(f"unknown dataset layout {layout!r}; choose from {', '.join(LAYOUTS)}")


def _falcon_split_dir(root: Path, split: str) -> Optional[Path]:
    candidates = [root / FALCON_TRAIN / split, root / split]
    if split == "test":
        candidates.insert(0, root / FALCON_TEST)
    return next((c for c in candidates if (c / "Color_Images").is_dir()), None)


def _voc_root(root: Path) -> Optional[Path]:
    return next((root / r for r in VOC_ROOTS if (root / r / "ImageSets" / "Segmentation").is_dir()
                 and (root / r / "JPEGImages").is_dir()), None)


def _ade_root(root: Path) -> Optional[Path]:
    return next((root / r for r in ADE_ROOTS if (root / r / "images" / "training").is_dir()
                 or (root / r / "images" / "validation").is_dir()), None)


def _is_falcon(root: Path) -> bool:
    return any(_falcon_split_dir(root, s) is not None for s in SPLITS)


def _is_folders(root: Path) -> bool:
    return any((root / s / "images").is_dir() for s in SPLITS) or is_plain_folder(root)


def is_plain_folder(root: Path) -> bool:
    """images/ and masks/ at the top, no split folders: train and val are drawn by name (in_val)."""
    return (root / "images").is_dir() and (root / "masks").is_dir() and \
        not any((root / s / "images").is_dir() for s in SPLITS)


DEFAULT_VAL_FRACTION = 0.2


def in_val(name: str, val_fraction: float) -> bool:
    """Whether an image of a plain folder is a validation sample: the first 8 bytes of the sha256 of
    its name (NFC) as a fraction of 2^64 fall below val_fraction. Each name decides for itself, so
    adding images never moves an old one between the splits."""
    digest = hashlib.sha256(unicodedata.normalize("NFC", name).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction


def _is_cityscapes(root: Path) -> bool:
    # empty leftImg8bit/ and gtFine/ folders are not a Cityscapes dataset
    return any((root / "leftImg8bit" / s).is_dir() for s in SPLITS) and (root / "gtFine").is_dir()


DETECT = (("falcon", _is_falcon, "Color_Images/ under <split>/ or Offroad_Segmentation_*"),
          ("cityscapes", _is_cityscapes, "leftImg8bit/ and gtFine/"),
          ("ade20k", lambda r: _ade_root(r) is not None, "[ADEChallengeData2016/]images/training|validation"),
          ("voc", lambda r: _voc_root(r) is not None, "[VOCdevkit/VOC2012/]ImageSets/Segmentation and JPEGImages"),
          ("folders", _is_folders, "<split>/images/ and <split>/masks/, or images/ and masks/ at the top"))


def detect_layout(data_root: str | Path) -> str:
    root = Path(data_root)
    if not root.is_dir():
        raise SegError(f"{root}: no such dataset folder")
    found = [(name, what) for name, test, what in DETECT if test(root)]
    if len(found) == 1:
        return found[0][0]
    if found:
        raise SegError(f"{root}: matches {len(found)} layouts (" + "; ".join(f"{n}: {w}" for n, w in found)
                       + f"); say which with --layout {'|'.join(n for n, _ in found)}")
    seen = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not is_hidden(p.name))
    found = ", ".join(seen[:6]) + (f" and {len(seen) - 6} more" if len(seen) > 6 else "") if seen else "nothing"
    raise SegError(f"{root}: no known dataset layout found (looked for " + "; ".join(
        f"{name}: {what}" for name, _, what in DETECT) + f"); found: {found}. Arrange the folder as one of them "
        "(the simplest: your images in ROOT/images, their masks as same-named .png in ROOT/masks), or pass --layout")


def resolve_layout(data_root: str | Path, layout: str = "auto") -> str:
    if layout == "auto":
        return detect_layout(data_root)
    if layout not in LAYOUTS:
        raise SegError(f"--layout must be auto or one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def list_split(data_root: str | Path, split: str, require_masks: bool = True, layout: str = "auto",
               val_fraction: float = DEFAULT_VAL_FRACTION) -> SplitFiles:
    """Every sample of a split, paired and checked: an image without a mask, a mask without an image,
    two images sharing a mask, a list entry naming no image are each one line. In a plain folder
    (images/ and masks/ at the top) `val_fraction` of the images, chosen by name, are val."""
    if split not in SPLITS:
        raise SegError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    root = Path(data_root)
    layout = resolve_layout(root, layout)
    if layout == "cityscapes":
        return _list_cityscapes(root, split, require_masks)
    if layout == "voc":
        return _list_voc(root, split, require_masks)
    if layout == "falcon":
        data_dir = _falcon_split_dir(root, split)
        if data_dir is None:
            tried = [root / FALCON_TRAIN / split / "Color_Images", root / split / "Color_Images"]
            if split == "test":
                tried.insert(0, root / FALCON_TEST / "Color_Images")
            raise SegError(f"{root}: no {split} split found (looked for {', '.join(map(str, tried))})")
    elif layout == "folders":
        if is_plain_folder(root):
            return _plain_split(root, split, require_masks, val_fraction)
        data_dir = root / split
    else:  # ade20k
        ade = _ade_root(root)
        if ade is None or split not in ADE_SPLITS:
            raise SegError(f"{root}: no ADE20K {split} split (ADE20K has train = images/training and "
                           "val = images/validation)")
        data_dir = ade
    image_of, mask_of = (sample_paths(layout, data_dir, split, "x.png")[k].parent for k in (0, 1))
    return _pair_by_stem(split, data_dir, layout, image_of, mask_of, require_masks)


def _plain_split(root: Path, split: str, require_masks: bool, val_fraction: float) -> SplitFiles:
    if split not in ("train", "val"):
        raise SegError(f"{root}: a plain folder (images/ and masks/ at the top) has a train and a val split, the "
                       f"val images chosen by name (--val-fraction); for a {split} split put its images in "
                       f"{root / split / 'images'} and its masks in {root / split / 'masks'}")
    if not 0 < val_fraction < 1:
        raise SegError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    files = _pair_by_stem(split, root, "folders", root / "images", root / "masks", require_masks)
    names = tuple(n for n in files.names if in_val(n, val_fraction) == (split == "val"))
    if not names:
        raise SegError(f"{root}: none of its {len(files.names)} images falls in the {split} split at --val-fraction "
                       f"{val_fraction:g}; add images or change --val-fraction")
    return SplitFiles(split, root, names, files.has_masks, "folders")


def _images_in(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise SegError(f"{folder}: image folder missing")
    candidates = [p for p in folder.iterdir() if not is_hidden(p.name) and p.suffix.lower() in IMAGE_SUFFIXES]
    dangling = sorted(p for p in candidates if p.is_symlink() and not p.exists())
    if dangling:
        raise SegError(f"{dangling[0]}: a symbolic link to {os.readlink(dangling[0])}, which does not exist"
                       + (f" (and {len(dangling) - 1} more)" if len(dangling) > 1 else "")
                       + "; fix or remove the link")
    names = sorted(p.name for p in candidates if p.is_file())
    for name in names:  # before anything is written: the manifest records every name as text
        check_utf8_name(folder / name)
    if not names:
        raise SegError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return names


def _pair_by_stem(split: str, data_dir: Path, layout: str, image_dir: Path, mask_dir: Path,
                  require_masks: bool) -> SplitFiles:
    images = _images_in(image_dir)
    if not mask_dir.is_dir():
        if require_masks:
            raise SegError(f"{mask_dir}: mask folder missing")
        return SplitFiles(split, data_dir, tuple(images), False, layout)
    stems: dict[tuple[str, str], str] = {}
    for n in images:
        key = name_key(mask_name(n))
        if key in stems:
            other = stems[key]
            how = (f" (the names differ only in Unicode normalisation: {ascii(n)} and {ascii(other)})"
                   if PurePath(n).stem != PurePath(other).stem else "")
            raise SegError(f"{image_dir / n}: shares its mask name {mask_name(n)} with {other}{how}; "
                           "rename one of them")
        stems[key] = n
    masks = {name_key(p.name): p.name for p in mask_dir.iterdir()
             if not is_hidden(p.name) and p.suffix.lower() == ".png"}
    missing = [n for n in images if name_key(mask_name(n)) not in masks]
    if missing:
        raise SegError(f"{image_dir / missing[0]}: no mask {mask_dir / mask_name(missing[0])}"
                       + (f" (and {len(missing) - 1} more images without masks)" if len(missing) > 1 else ""))
    orphans = sorted(masks[k] for k in set(masks).difference(stems))
    if orphans:
        raise SegError(f"{mask_dir / orphans[0]}: mask without an image in {image_dir}"
                       + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""))
    return SplitFiles(split, data_dir, tuple(images), True, layout)


def _list_cityscapes(root: Path, split: str, require_masks: bool) -> SplitFiles:
    image_root = root / "leftImg8bit" / split
    if not image_root.is_dir():
        raise SegError(f"{image_root}: no Cityscapes {split} split")
    names = []
    for city in sorted(p for p in image_root.iterdir() if p.is_dir()):
        for p in sorted(city.iterdir()):
            if is_hidden(p.name) or not p.name.endswith(CITYSCAPES_IMAGE):
                continue  # anything else beside the frames is not a sample
            check_utf8_name(p)
            if p.name.split("_")[0] != city.name:
                raise SegError(f"{p}: a Cityscapes frame is named <city>_<seq>_<frame>_leftImg8bit.png and lies "
                               f"in its city's folder; this one is in {city.name}/")
            names.append(p.name)
    if not names:
        raise SegError(f"{image_root}: no *{CITYSCAPES_IMAGE} frames")
    names.sort()
    files = SplitFiles(split, root, tuple(names), require_masks or (root / "gtFine" / split).is_dir(), "cityscapes")
    if files.has_masks:
        _check_masks_exist(files)
        mask_root = root / "gtFine" / split
        expected = {files.mask_path(i).name for i in range(len(names))}
        orphans = sorted(str(p) for p in mask_root.rglob("*" + CITYSCAPES_MASK) if p.name not in expected)
        if orphans:
            raise SegError(f"{orphans[0]}: mask without an image in {image_root}"
                           + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""))
    return files


def _list_voc(root: Path, split: str, require_masks: bool) -> SplitFiles:
    voc = _voc_root(root)
    if voc is None:
        raise SegError(f"{root}: no VOC2012 folder (ImageSets/Segmentation and JPEGImages)")
    listing = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise SegError(f"{listing}: no {split} list (VOC 2012 has train.txt, val.txt and trainval.txt)")
    try:
        lines = listing.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SegError(f"{listing}: unreadable split list ({exc})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = []
    for number, line in enumerate(lines, 1):
        stem = line.strip()
        if not stem:
            raise SegError(f"{listing}: line {number} is empty; every line names one image (a JPEGImages stem)")
        if "/" in stem or "\\" in stem or stem in (".", ".."):
            raise SegError(f"{listing}: line {number} ({stem!r}) is not an image name")
        names.append(stem + ".jpg")
    if not names:
        raise SegError(f"{listing}: lists no images")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise SegError(f"{listing}: {twice[:-4]} is listed twice")
    files = SplitFiles(split, voc, tuple(sorted(names)), require_masks or (voc / "SegmentationClass").is_dir(), "voc")
    for i in range(len(files.names)):
        if not files.image_path(i).is_file():
            raise SegError(f"{files.image_path(i)}: listed in {listing} but missing")
    if files.has_masks:
        _check_masks_exist(files)
    return files


def _check_masks_exist(files: SplitFiles) -> None:
    missing = [i for i in range(len(files.names)) if not files.mask_path(i).is_file()]
    if missing:
        raise SegError(f"{files.image_path(missing[0])}: no mask {files.mask_path(missing[0])}"
                       + (f" (and {len(missing) - 1} more images without masks)" if len(missing) > 1 else ""))
