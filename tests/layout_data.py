"""Tiny datasets in the public layouts, with distractor files and names holding spaces, whose class
pixel counts are known by construction (masks are made at the cache size, or at twice it in 2x2 blocks,
so the nearest resize keeps every count)."""

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from seg.data.public_tables import voc_colormap

W, H = 140, 84          # the cache size the tests extract at: 10 x 6 patches of 14


def image(rng, w=W, h=H):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def write_gray(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), values)


def quarters(a, b, c, d, w=W, h=H, dtype=np.uint8):
    """A mask of four quadrants with values a, b (top) and c, d (bottom)."""
    m = np.empty((h, w), dtype)
    m[: h // 2, : w // 2], m[: h // 2, w // 2:], m[h // 2:, : w // 2], m[h // 2:, w // 2:] = a, b, c, d
    return m


Q = (H // 2) * (W // 2)   # pixels in one quadrant


def cityscapes(root: Path, rng) -> dict:
    """2 train frames in 2 cities, 1 val frame; label ids 7 road, 26 car, 24 person, 0 and 4 ignored.
    Returns expected train class counts by train id."""
    frames = {"train": [("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")],
              "val": [("lindau", "lindau_000000_000019")]}
    masks = {"aachen_000000_000019": quarters(7, 26, 0, 24), "bochum_000000_000313": quarters(7, 7, 4, 26),
             "lindau_000000_000019": quarters(7, 26, 24, 0)}
    for split, items in frames.items():
        for city, stem in items:
            write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image(rng))
            gt = root / "gtFine" / split / city
            write_gray(gt / f"{stem}_gtFine_labelIds.png", masks[stem])
            write_rgb(gt / f"{stem}_gtFine_color.png", image(rng))              # not samples
            write_gray(gt / f"{stem}_gtFine_instanceIds.png", masks[stem].astype(np.uint16) * 1000)
            (gt / f"{stem}_gtFine_polygons.json").write_text(json.dumps({"objects": []}))
    (root / "license.txt").write_text("distractor")
    (root / "leftImg8bit" / "train" / "aachen" / "aachen notes.txt").write_text("distractor beside the frames")
    expected = np.zeros(19, np.int64)
    expected[0] = 3 * Q      # road: aachen 1 + bochum 2
    expected[13] = 2 * Q     # car
    expected[11] = 1 * Q     # person
    return {"train": expected}


def ade20k(root: Path, rng) -> dict:
    """ADEChallengeData2016 with 2 training images of different sizes and 1 validation image;
    annotation 0 ignored, i -> class i - 1."""
    base = root / "ADEChallengeData2016"
    write_rgb(base / "images" / "training" / "ADE_train_00000001.jpg", image(rng))
    write_gray(base / "annotations" / "training" / "ADE_train_00000001.png", quarters(1, 3, 0, 150))
    big = quarters(1, 1, 3, 0, W * 2, H * 2)   # twice the size, in 2x2 blocks: the nearest resize keeps counts
    write_rgb(base / "images" / "training" / "ADE_train_00000002.jpg", image(rng, W * 2, H * 2))
    write_gray(base / "annotations" / "training" / "ADE_train_00000002.png", big)
    write_rgb(base / "images" / "validation" / "ADE_val_00000001.jpg", image(rng))
    write_gray(base / "annotations" / "validation" / "ADE_val_00000001.png", quarters(1, 2, 3, 4))
    (base / "objectInfo150.txt").write_text("distractor")
    expected = np.zeros(150, np.int64)
    expected[0] = 3 * Q      # wall (1): one quadrant + two
    expected[2] = 2 * Q      # sky (3)
    expected[149] = 1 * Q    # flag (150)
    return {"train": expected}


def palette_png(path: Path, indices: np.ndarray, palette: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    img.putpalette(palette.astype(np.uint8).flatten().tolist())
    img.save(path)


def voc(root: Path, rng) -> dict:
    """VOCdevkit/VOC2012 with palette masks: 2 train, 1 val, one JPEG no list names. One train mask's
    palette is shuffled: its colours would decode to wrong classes; its indices are right."""
    base = root / "VOCdevkit" / "VOC2012"
    cmap = voc_colormap()
    masks = {"2007_000032": quarters(0, 15, 12, 255), "2007 000039": quarters(15, 15, 0, 255),
             "2008_000001": quarters(1, 2, 3, 0)}
    shuffled = cmap.copy()
    shuffled[15], shuffled[12] = cmap[3], cmap[7]   # index 15 drawn in class 3's colour, 12 in class 7's
    for stem, m in masks.items():
        write_rgb(base / "JPEGImages" / f"{stem}.jpg", image(rng))
        palette_png(base / "SegmentationClass" / f"{stem}.png", m, shuffled if stem == "2007_000032" else cmap)
    write_rgb(base / "JPEGImages" / "2009_999999.jpg", image(rng))     # listed nowhere: not a sample
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("2007_000032\n2007 000039\n")
    (lists / "val.txt").write_text("2008_000001\n")
    (lists / "trainval.txt").write_text("2007_000032\n2007 000039\n2008_000001\n")
    expected = np.zeros(21, np.int64)
    expected[15] = 3 * Q     # person
    expected[12] = 1 * Q     # dog
    expected[0] = 2 * Q      # background
    return {"train": expected}


FOLDER_TABLE = {"classes": [{"name": "soil", "values": [10], "color": [120, 80, 40]},
                            {"name": "plant", "values": [20], "color": [0, 200, 0]},
                            {"name": "sky", "values": [30], "color": [100, 150, 255]}],
                "ignore_values": [0]}


def folders(root: Path, rng, colour_masks: bool = False) -> dict:
    """ROOT/<split>/images + masks paired by stem, names with spaces, a README beside the images.
    Masks hold the table's values, or with colour_masks its colours (RGB)."""
    def put(split, stem, mask):
        write_rgb(root / split / "images" / f"{stem}.jpg", image(rng))
        path = root / split / "masks" / f"{stem}.png"
        if colour_masks:
            colours = {t["values"][0]: t["color"] for t in FOLDER_TABLE["classes"]}
            colours[0] = [0, 0, 0]
            rgb = np.zeros((*mask.shape, 3), np.uint8)
            for v, c in colours.items():
                rgb[mask == v] = c
            write_rgb(path, rgb)
        else:
            write_gray(path, mask)
    put("train", "field one", quarters(10, 20, 30, 0))
    put("train", "field two", quarters(10, 10, 20, 30))
    put("val", "field three", quarters(30, 20, 10, 0))
    (root / "train" / "images" / "README.txt").write_text("distractor")
    return {"train": np.array([3 * Q, 2 * Q, 2 * Q], np.int64)}
