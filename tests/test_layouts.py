"""Bring your own dataset: every public layout is found by itself, read with its own class table and
mask encoding, and the cached masks carry exactly the classes the layout's tools would give (checked
through `seg cache info --json`'s per-sample class counts against counts known by construction)."""

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import layout_data as ld
from seg.cli import main
from seg.data.layouts import detect_layout, list_split
from seg.data.public_tables import ADE20K, ade20k_table, cityscapes_table, voc_colormap, voc_table
from seg.runtime.errors import SegError

EXTRACT = ["extract", "--backbone", "vits14", "--size", f"{ld.W}x{ld.H}", "--random-init", "--workers", "0",
           "--batch-size", "2", "--shard-size", "2", "--splits", "train,val"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *fragments):
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for frag in fragments:
        assert frag in lines[0], lines[0]


def train_counts(cache) -> np.ndarray:
    r = run("cache", "info", "--json", cache)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    return np.asarray(m["splits"]["train"]["class_counts"]).sum(0), m


MAKERS = {"cityscapes": ld.cityscapes, "ade20k": ld.ade20k, "voc": ld.voc}


@pytest.mark.parametrize("layout", ["cityscapes", "ade20k", "voc"])
def test_public_layouts_extract_with_no_preparation(layout, tmp_path):
    expected = MAKERS[layout](tmp_path / "data", np.random.default_rng(0))
    r = run(*EXTRACT, "--data", tmp_path / "data", "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert f"extract: {layout} dataset" in r.output
    counts, manifest = train_counts(tmp_path / "c")
    np.testing.assert_array_equal(counts, expected["train"])
    assert manifest["layout"] == layout and manifest["format_version"] == 7  # a layer cache, with prefix tokens
    assert manifest["class_table"] == {"cityscapes": cityscapes_table, "ade20k": ade20k_table,
                                       "voc": voc_table}[layout]().to_json()
    assert run("cache", "verify", "--sources", tmp_path / "c").exit_code == 0


def test_cityscapes_samples_are_the_frames_only(tmp_path):
    ld.cityscapes(tmp_path, np.random.default_rng(0))
    files = list_split(tmp_path, "train")
    assert files.layout == "cityscapes"
    assert files.names == ("aachen_000000_000019_leftImg8bit.png", "bochum_000000_000313_leftImg8bit.png")
    assert files.mask_path(1) == tmp_path / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"


def test_voc_reads_palette_indices_not_colours(tmp_path):
    """2007_000032's palette draws index 15 (person) in class 3's colour: a colour decode would make
    it a bird. The cache holds person."""
    ld.voc(tmp_path, np.random.default_rng(0))
    shuffled = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000032.png"
    bgr = cv2.imread(str(shuffled))  # OpenCV expands the palette into colours
    assert tuple(bgr[0, -1][::-1]) == tuple(voc_colormap()[3])
    files = list_split(tmp_path, "train")
    assert files.names == ("2007 000039.jpg", "2007_000032.jpg")  # the unlisted JPEG is no sample
    from seg.data.decode import read_split_pair
    from seg.data.public_tables import decoder_for

    _, mask = read_split_pair(files, 1, decoder_for("voc", voc_table()))
    assert mask[0, -1] == 15 and mask[-1, 0] == 12 and mask[-1, -1] == 255


def test_folders_layout_needs_a_table_and_takes_values_or_colours(tmp_path):
    rng = np.random.default_rng(0)
    expected = ld.folders(tmp_path / "d", rng)
    table = tmp_path / "classes.json"
    table.write_text(json.dumps(ld.FOLDER_TABLE))
    one_line_error(run(*EXTRACT, "--data", tmp_path / "d", "--out", tmp_path / "x"),
                   "the folders layout has no class table of its own: pass --classes with the class names")
    r = run(*EXTRACT, "--data", tmp_path / "d", "--out", tmp_path / "c", "--classes", table)
    assert r.exit_code == 0, r.output
    counts, manifest = train_counts(tmp_path / "c")
    np.testing.assert_array_equal(counts, expected["train"])
    assert manifest["splits"]["train"]["images"] == ["field one.jpg", "field two.jpg"]
    # the same masks as RGB colours of the table decode to the same ids; an unknown colour is one line
    ld.folders(tmp_path / "rgb", rng, colour_masks=True)
    one_line_error(run(*EXTRACT, "--data", tmp_path / "rgb", "--out", tmp_path / "y", "--classes", table),
                   "field one.png: unknown mask colour(s) RGB (0, 0, 0)")
    colours = {0: (120, 80, 40)}  # repaint the ignore quadrants as soil: the counts move there
    for split in ("train", "val"):
        for p in (tmp_path / "rgb" / split / "masks").iterdir():
            rgb = cv2.imread(str(p))
            rgb[(rgb == 0).all(-1)] = colours[0][::-1]
            cv2.imwrite(str(p), rgb)
    r = run(*EXTRACT, "--data", tmp_path / "rgb", "--out", tmp_path / "z", "--classes", table)
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(train_counts(tmp_path / "z")[0], expected["train"] + [ld.Q, 0, 0])


def test_auto_detection_and_its_refusal(tmp_path, dataset):
    assert detect_layout(dataset) == "falcon"
    ld.ade20k(tmp_path / "a", np.random.default_rng(0))
    assert detect_layout(tmp_path / "a") == "ade20k"
    assert detect_layout(tmp_path / "a" / "ADEChallengeData2016") == "ade20k"
    (tmp_path / "nothing" / "pics").mkdir(parents=True)
    with pytest.raises(SegError, match=r"nothing: no known dataset layout found \(looked for falcon: .*cityscapes: "
                                       r"leftImg8bit/ and gtFine/.*folders: <split>/images/ and <split>/masks/, or "
                                       r"images/ and masks/ at the top\); found: pics/"):
        detect_layout(tmp_path / "nothing")


def test_built_in_tables_print_as_class_table_json(tmp_path):
    r = run("classes", "--layout", "cityscapes")
    assert r.exit_code == 0
    table = json.loads(r.output)
    assert [c["name"] for c in table["classes"]][:3] == ["road", "sidewalk", "building"]
    assert table["classes"][13] == {"id": 13, "name": "car", "values": [26], "color": [0, 0, 142]}
    assert table["ignore_values"] == [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]  # labels.py ids not trained
    (tmp_path / "cs.json").write_text(r.output)  # what --classes takes, unchanged
    from seg.data.classes import load_class_table

    assert load_class_table(str(tmp_path / "cs.json")) == cityscapes_table()
    assert len(ADE20K) == len(set(ADE20K)) == 150 and ade20k_table().raw_values[149] == (150,)
    assert voc_table().colors[15] == (192, 128, 128)  # person in the standard VOC map


def test_bad_inputs_are_one_line_each(tmp_path):
    rng = np.random.default_rng(0)
    ld.cityscapes(tmp_path / "cs", rng)
    (tmp_path / "cs/gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()
    one_line_error(run(*EXTRACT, "--data", tmp_path / "cs", "--out", tmp_path / "c1"),
                   "aachen_000000_000019_leftImg8bit.png: no mask", "_gtFine_labelIds.png")
    ld.ade20k(tmp_path / "ade", rng)
    ld.write_gray(tmp_path / "ade/ADEChallengeData2016/annotations/training/ADE_train_00000001.png",
                  ld.quarters(1, 3, 0, 151))
    one_line_error(run(*EXTRACT, "--data", tmp_path / "ade", "--out", tmp_path / "c2"),
                   "ADE_train_00000001.png: unknown mask value(s) 151")
    ld.write_gray(tmp_path / "ade/ADEChallengeData2016/annotations/training/ADE_train_00000001.png",
                  ld.quarters(1, 3, 0, 150, ld.W + 2))
    one_line_error(run(*EXTRACT, "--data", tmp_path / "ade", "--out", tmp_path / "c3"),
                   "ADE_train_00000001.png: mask is 142x84 but its image is 140x84")
    ld.voc(tmp_path / "voc", rng)
    (tmp_path / "voc/VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").write_text("2007_000032\n\n2007 000039\n")
    one_line_error(run(*EXTRACT, "--data", tmp_path / "voc", "--out", tmp_path / "c4"),
                   "train.txt: line 2 is empty")
    for out in ("c1", "c4"):  # found while listing: before anything is written
        assert not (tmp_path / out).exists()
    for out in ("c2", "c3"):  # found while decoding the first batch: a new cache with no shard leaves nothing
        assert not (tmp_path / out).exists()


def test_eval_from_images_of_another_layout_scores_each_at_its_own_size(tmp_path):
    ld.ade20k(tmp_path / "d", np.random.default_rng(0))
    assert run(*EXTRACT, "--data", tmp_path / "d", "--out", tmp_path / "c").exit_code == 0
    r = run("train-head", "--cache", tmp_path / "c", "--out", tmp_path / "r", "--phase", "1", "--epochs", "1",
            "--device", "cpu")
    assert r.exit_code == 0 and "note: not the published phase 1 configuration" in r.output, r.output
    r = run("eval", "--run", tmp_path / "r", "--data", tmp_path / "d", "--split", "train", "--full-res",
            "--device", "cpu", "--workers", "0")
    assert r.exit_code == 0, r.output
    cm = np.asarray(json.loads((tmp_path / "r" / "eval-train-images-fullres" / "eval.json").read_text())["confusion_matrix"])
    # scored at the original sizes: 140x84 + 280x168 pixels, less the ignored annotation-0 pixels
    assert cm.sum() == (3 * ld.Q) + 3 * (4 * ld.Q)


def test_predict_finds_the_truth_of_an_image_in_any_layout(tmp_path):
    from seg.predict import mask_beside

    rng = np.random.default_rng(0)
    for layout, maker in MAKERS.items():
        maker(tmp_path / layout, rng)
        files = list_split(tmp_path / layout, "train")
        assert [mask_beside(files.image_path(i)) for i in range(len(files.names))] == \
            [files.mask_path(i) for i in range(len(files.names))], layout
    ld.folders(tmp_path / "f", rng)
    files = list_split(tmp_path / "f", "val", layout="folders")
    assert mask_beside(files.image_path(0)) == files.mask_path(0)
    assert mask_beside(tmp_path / "f" / "val" / "images" / "missing.jpg") is None
