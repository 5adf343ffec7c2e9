"""The public class tables pinned to their published sources, written out here (not built from seg's
own constants), so that any single changed entry fails:
- Cityscapes: mcordts/cityscapesScripts `helpers/labels.py` (name, id, trainId, colour of ids 0..33);
- ADE20K: CSAILVision/sceneparsing `objectInfo150.txt` (tests/data, verbatim);
- Pascal VOC 2012: the devkit's class list and its colour map (VOClabelcolormap.m), whose best-known
  entries are written out and the rest restated from the devkit's bitget loop."""

from pathlib import Path

import numpy as np
import pytest

from seg.data.decode import MaskDecoder
from seg.data.public_tables import ade20k_table, cityscapes_table, voc_colormap, voc_table
from seg.runtime.errors import SegError

# cityscapesScripts labels.py, ids 0..33: (name, id, trainId, colour); 255 = not trained
LABELS_PY = """
unlabeled 0 255 0,0,0 | ego vehicle 1 255 0,0,0 | rectification border 2 255 0,0,0 | out of roi 3 255 0,0,0
static 4 255 0,0,0 | dynamic 5 255 111,74,0 | ground 6 255 81,0,81 | road 7 0 128,64,128 | sidewalk 8 1 244,35,232
parking 9 255 250,170,160 | rail track 10 255 230,150,140 | building 11 2 70,70,70 | wall 12 3 102,102,156
fence 13 4 190,153,153 | guard rail 14 255 180,165,180 | bridge 15 255 150,100,100 | tunnel 16 255 150,120,90
pole 17 5 153,153,153 | polegroup 18 255 153,153,153 | traffic light 19 6 250,170,30 | traffic sign 20 7 220,220,0
vegetation 21 8 107,142,35 | terrain 22 9 152,251,152 | sky 23 10 70,130,180 | person 24 11 220,20,60
rider 25 12 255,0,0 | car 26 13 0,0,142 | truck 27 14 0,0,70 | bus 28 15 0,60,100 | caravan 29 255 0,0,90
trailer 30 255 0,0,110 | train 31 16 0,80,100 | motorcycle 32 17 0,0,230 | bicycle 33 18 119,11,32
"""


def cityscapes_labels() -> list[tuple[str, int, int, tuple[int, int, int]]]:
    rows = []
    for entry in LABELS_PY.replace("\n", " | ").split("|"):
        words = entry.split()
        if words:
            rows.append((" ".join(words[:-3]), int(words[-3]), int(words[-2]),
                         tuple(int(v) for v in words[-1].split(","))))
    return rows


def test_cityscapes_table_is_labels_py():
    labels = cityscapes_labels()
    assert [i for _, i, _, _ in labels] == list(range(34))
    trained = sorted((t, name, colour) for name, _, t, colour in labels if t != 255)
    table = cityscapes_table()
    assert list(table.names) == [name for _, name, _ in trained]
    assert [tuple(c) for c in table.colors] == [colour for _, _, colour in trained]
    lut = table.lut()
    for _, label_id, train_id, _ in labels:     # the full id -> train id map
        assert lut[label_id] == train_id, label_id
    assert (lut[34:] == -1).all()               # not a Cityscapes id: refused, never ignored


def test_a_cityscapes_mask_with_an_id_past_the_table_is_one_line(tmp_path):
    import cv2

    mask = np.full((4, 6), 7, np.uint8)
    mask[0, 0], mask[1, 1] = 40, 34
    path = tmp_path / "aachen_000000_000019_gtFine_labelIds.png"
    cv2.imwrite(str(path), mask)
    with pytest.raises(SegError) as err:
        MaskDecoder.of(cityscapes_table()).read(path)
    assert str(err.value).startswith(f"{path}: unknown mask value(s) 34, 40")


def test_ade20k_table_is_object_info_150():
    rows = (Path(__file__).parent / "data" / "objectInfo150.txt").read_text().splitlines()[1:]
    entries = [(int(r.split("\t")[0]), r.split("\t")[4].split(",")[0].strip()) for r in rows]
    assert [i for i, _ in entries] == list(range(1, 151))
    table = ade20k_table()
    assert list(table.names) == [name for _, name in entries]
    lut = table.lut()
    assert lut[0] == 255                         # "other": ignored
    assert [int(lut[i]) for i, _ in entries] == list(range(150))   # annotation i -> class i - 1
    assert (lut[151:256] == -1).all()


VOC_NAMES = ("background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
             "motorbike person pottedplant sheep sofa train tvmonitor").split()
# the devkit's colours of the 21 classes and of the void border (index 255)
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 5: (128, 0, 128),
               6: (0, 128, 128), 7: (128, 128, 128), 8: (64, 0, 0), 9: (192, 0, 0), 10: (64, 128, 0),
               11: (192, 128, 0), 12: (64, 0, 128), 13: (192, 0, 128), 14: (64, 128, 128), 15: (192, 128, 128),
               16: (0, 64, 0), 17: (128, 64, 0), 18: (0, 192, 0), 19: (128, 192, 0), 20: (0, 64, 128),
               255: (224, 224, 192)}


def devkit_colormap() -> list[tuple[int, int, int]]:
    """VOClabelcolormap.m: for each bit triple j of the index, bitget 1, 2, 3 go to bit 7 - j of R, G, B."""
    def bitget(v, k):
        return (v >> (k - 1)) & 1

    cmap = []
    for i in range(256):
        rgb, value = [0, 0, 0], i
        for j in range(8):
            for channel in range(3):
                rgb[channel] += bitget(value, channel + 1) * 2 ** (7 - j)
            value //= 8
        cmap.append(tuple(rgb))
    return cmap


def test_voc_table_and_colour_map_are_the_devkits():
    table = voc_table()
    assert list(table.names) == VOC_NAMES
    assert [tuple(c) for c in table.colors] == [VOC_COLOURS[i] for i in range(21)]
    cmap = [tuple(int(v) for v in row) for row in voc_colormap()]
    assert {i: cmap[i] for i in VOC_COLOURS} == VOC_COLOURS
    assert cmap == devkit_colormap()
    assert table.lut()[255] == 255 and (table.lut()[21:255] == -1).all()
