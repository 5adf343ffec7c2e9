import json
import shutil

import cv2
import numpy as np
import pytest

from seg.data.classes import IGNORE_INDEX, default_class_table, load_class_table
from seg.data.layouts import list_split
from seg.data.decode import MaskDecoder, map_mask, read_split_pair
from seg.runtime.errors import SegError
from seg.data.synthetic import write_dataset


def test_default_table_is_published_map_plus_flowers():
    t = default_class_table()
    lut = t.lut()
    raw = np.array([[0, 100, 200, 300, 500], [550, 700, 800, 7100, 10000], [600, 600, 0, 0, 0]], np.uint16)
    ids = map_mask(raw, lut, "m.png")
    assert ids.dtype == np.uint8
    assert ids.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0]]
    assert t.names[6] == "Logs" and t.names[9] == "Sky" and t.num_classes == 10


def test_unknown_raw_value_names_file_and_values():
    lut = default_class_table().lut()
    raw = np.array([[100, 650], [42, 100]], np.uint16)
    with pytest.raises(SegError, match=r"^m\.png: unknown mask value\(s\) 42, 650 "):
        map_mask(raw, lut, "m.png")


def test_custom_class_table_with_flowers(tmp_path):
    classes = [{"name": n, "values": v} for n, v in
               [("Background", [0]), ("Trees", [100]), ("Flowers", [600]), ("Sky", [10000])]]
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"classes": classes, "ignore_values": [7100]}))
    t = load_class_table(str(p))
    ids = map_mask(np.array([[600, 7100, 10000]], np.uint16), t.lut(), "x")
    assert ids.tolist() == [[2, IGNORE_INDEX, 3]]
    p.write_text(json.dumps({"classes": [{"name": "A", "values": [1]}, {"name": "B", "values": [1]}]}))
    with pytest.raises(SegError, match=r"c.json: classes\[1\] \('B'\): raw value 1 is also given to 'A'"):
        load_class_table(str(p))
    p.write_text("{not json")
    with pytest.raises(SegError, match="c.json: not a readable JSON class table"):
        load_class_table(str(p))


def test_pairs_read_with_unchanged_depth(dataset):
    files = list_split(dataset, "train")
    assert len(files.names) == 6 and files.has_masks
    raw = cv2.imread(str(files.mask_path(0)), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (540, 960) and raw.max() > 255
    image, mask = read_split_pair(files, 0, MaskDecoder.of(default_class_table()))
    assert image.shape == (540, 960, 3) and image.dtype == np.uint8
    expect = default_class_table().lut()[raw]
    np.testing.assert_array_equal(mask, expect)
    assert 9 in mask and 8 in mask  # sky and landscape survive (IMREAD_GRAYSCALE would truncate them)
    assert list_split(dataset, "test").root.name == "Offroad_Segmentation_testImages"


@pytest.fixture()
def broken(tmp_path):
    root = write_dataset(tmp_path / "d", {"train": 2})
    return root, root / "Offroad_Segmentation_Training_Dataset" / "train"


def test_image_without_mask(broken):
    root, base = broken
    (base / "Segmentation" / "train_00001.png").unlink()
    with pytest.raises(SegError, match=r"Color_Images/train_00001\.png: no mask .*Segmentation/train_00001\.png"):
        list_split(root, "train")


def test_mask_without_image(broken):
    root, base = broken
    shutil.copy(base / "Segmentation" / "train_00000.png", base / "Segmentation" / "extra.png")
    with pytest.raises(SegError, match=r"Segmentation/extra\.png: mask without an image"):
        list_split(root, "train")


def test_size_mismatch_and_unreadable(broken):
    root, base = broken
    cv2.imwrite(str(base / "Segmentation" / "train_00000.png"), np.zeros((270, 480), np.uint16))
    (base / "Color_Images" / "train_00001.png").write_bytes(b"garbage")
    files = list_split(root, "train")
    lut = MaskDecoder.of(default_class_table())
    with pytest.raises(SegError, match=r"train_00000\.png: mask is 480x270 but its image is 960x540"):
        read_split_pair(files, 0, lut)
    with pytest.raises(SegError, match=r"Color_Images/train_00001\.png: cannot read image"):
        read_split_pair(files, 1, lut)


def test_missing_split(tmp_path):
    root = write_dataset(tmp_path / "d", {"train": 1})
    with pytest.raises(SegError, match="no val split found"):
        list_split(root, "val")
    with pytest.raises(SegError, match="no known dataset layout found"):
        list_split(tmp_path / "d" / "Offroad_Segmentation_Training_Dataset" / "train" / "Color_Images", "val")
