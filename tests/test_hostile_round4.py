"""Hostile inputs, round four: outputs derived from several inputs never collide, runs and images that
would be read wrong are refused in one line, EXIF orientation and palettes follow one stated rule,
config files may hold any subset of the settings, layout detection says what it found, and the three
bugs planted in round-three code that no test caught."""

import json
import os
import shutil
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from seg.cli import main
from seg.data.classes import ClassTable
from seg.data.decode import MaskDecoder, palette_contradiction, read_pair
from seg.data.layouts import detect_layout, list_split
from seg.data.synthetic import LAYOUT, write_dataset
from seg.deploy.parity import compare
from seg.infer.segmenter import Segmenter
from seg.runtime.errors import SegError
from seg.train.sampling import RareClassSampler
from test_hostile_round3 import TINY, one_line_error, tiny_data  # noqa: F401  (fixture)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def edited_run(run_dir: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "edited-run"
    shutil.copytree(run_dir, out)
    record = torch.load(out / "best.pt", weights_only=True)
    edit(record)
    torch.save(record, out / "best.pt")
    return out


# -- runs that would be read wrong -------------------------------------------------------------

def test_a_run_with_nan_head_weights_is_refused_everywhere(phase3_run, small_cache, tmp_path):
    import seg

    def nan_head(record):
        key = next(k for k, v in record["head"].items() if v.is_floating_point())
        record["head"][key][0] = float("nan")

    bad = edited_run(phase3_run, tmp_path, nan_head)
    for args in (["predict", "--run", bad, "--images", tmp_path, "--out", tmp_path / "p"],
                 ["eval", "--run", bad, "--cache", small_cache, "--split", "val"]):
        one_line_error(run(*args), f"{bad / 'best.pt'}: head weight", "NaN or infinite")
    with pytest.raises(SegError, match="NaN or infinite"):
        seg.load(bad, device="cpu")
    assert not (tmp_path / "p").exists() and not (bad / "eval-val").exists()


@pytest.mark.parametrize("field,value,says", [
    ("size", {"width": 113, "height": 56}, "'size' is {'width': 113"),
    ("patch_size", None, "'patch_size' is None, not vits14's 14"),
    ("layers", [99], "'layers' is [99], not blocks of vits14 (0..11)"),
    ("backbone", "vit_huge", "'backbone' names no known backbone"),
])
def test_a_hand_edited_backbone_record_is_one_line_naming_the_field(phase3_run, tmp_path, field, value, says):
    def edit(record):
        if value is None:
            del record["backbone"][field]
        else:
            record["backbone"][field] = value

    bad = edited_run(phase3_run, tmp_path, edit)
    one_line_error(run("predict", "--run", bad, "--images", tmp_path, "--out", tmp_path / "p"),
                   str(bad / "best.pt"), says)


def test_the_api_refuses_an_empty_image(phase3_run):
    import seg

    model = seg.load(phase3_run, device="cpu")
    for shape in ((0, 0, 3), (0, 12, 3), (12, 0, 3)):
        with pytest.raises(SegError, match="empty image"):
            model.predict(np.zeros(shape, np.uint8))


# -- outputs derived from several inputs -------------------------------------------------------

def write_video(path: Path, frames: int, colour: int, fourcc: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5.0, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), (colour + 20 * i) % 256, np.uint8))
    writer.release()


def test_videos_with_one_name_get_outputs_of_their_own(phase3_run, tmp_path):
    from seg.data.video_frames import frame_count

    a, b, c = tmp_path / "a" / "drive.mp4", tmp_path / "b" / "drive.mp4", tmp_path / "a" / "drive.avi"
    write_video(a, 2, 0, "mp4v")
    write_video(b, 3, 100, "mp4v")
    write_video(c, 4, 200, "MJPG")
    out = tmp_path / "p"
    r = run("predict", "--run", phase3_run, "--images", a, "--images", b, "--images", c, "--out", out,
            "--video-masks", "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "frames/s" in r.output and "images/s" not in r.output
    record = json.loads((out / "predict.json").read_text())
    names = [record["outputs"][str(p)] for p in (a, b, c)]
    assert len(set(names)) == 3
    for video, name, n in zip((a, b, c), names, (2, 3, 4)):
        assert frame_count(out / "video" / name) == n == record["video_frames"][str(video)]
        masks = sorted((out / "video" / name[: -len(".mp4")]).iterdir())
        assert [m.name for m in masks] == [f"{i:06d}.png" for i in range(1, n + 1)]


def test_eval_of_one_split_in_two_ways_keeps_both_reports(phase3_run, small_cache, dataset, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(phase3_run, run_dir)
    assert run("eval", "--run", run_dir, "--cache", small_cache, "--split", "val", "--device", "cpu").exit_code == 0
    r = run("eval", "--run", run_dir, "--data", dataset, "--split", "val", "--full-res", "--device", "cpu",
            "--workers", "0")
    assert r.exit_code == 0, r.output
    cache_report = json.loads((run_dir / "eval-val" / "eval.json").read_text())
    image_report = json.loads((run_dir / "eval-val-images-fullres" / "eval.json").read_text())
    assert cache_report["mode"] == "cache" and image_report["mode"] == "images"
    assert image_report["scored_at"] == "original size"
    # with one --out for both, the second says which report it replaced
    one = tmp_path / "one"
    run("eval", "--run", run_dir, "--cache", small_cache, "--split", "val", "--out", one, "--device", "cpu")
    r = run("eval", "--run", run_dir, "--data", dataset, "--split", "val", "--out", one, "--device", "cpu",
            "--workers", "0")
    assert "NOTE: replacing the earlier report in" in r.output and "mode cache" in r.output


# -- images and masks read one way -------------------------------------------------------------

def jpeg_with_orientation(path: Path, rgb: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, quality=95, exif=exif)


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_orientation_is_one_rule_for_image_and_mask(tmp_path, orientation, monkeypatch):
    """Pixels as stored, for both: the mask drawn on the stored pixels lines up with them."""
    import seg.data.decode as decode

    monkeypatch.setattr(decode, "_TOLD_ORIENTATION", set())  # said once per process
    rgb = np.zeros((84, 168, 3), np.uint8)
    rgb[:, 84:] = 255                          # left half dark, right half bright, as stored
    mask = np.zeros((84, 168), np.uint8)
    mask[:, 84:] = 1
    jpeg_with_orientation(tmp_path / "a.jpg", rgb, orientation)
    cv2.imwrite(str(tmp_path / "a.png"), mask)
    table = ClassTable(("dark", "bright"), ((0,), (1,)), ((0, 0, 0), (255, 255, 255)), ())
    with pytest.warns(UserWarning, match=f"a.jpg: EXIF orientation {orientation} is not applied"):
        image, ids = read_pair(tmp_path / "a.jpg", tmp_path / "a.png", MaskDecoder.of(table))
    assert image.shape == (84, 168, 3) and ids.shape == (84, 168)
    assert image[:, :80].mean() < 10 and image[:, 88:].mean() > 245
    assert (ids == mask).all()


def test_a_palette_that_contradicts_the_table_warns_naming_a_file(tmp_path):
    root = tmp_path / "d"
    table = [{"id": 0, "name": "ground", "values": [0], "color": [10, 20, 30]},
             {"id": 1, "name": "sky", "values": [1], "color": [40, 50, 60]}]
    (tmp_path / "t.json").write_text(json.dumps({"classes": table}))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(2):
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / split / "images" / f"s{i}.png"), rng.integers(0, 255, (42, 70, 3), np.uint8))
            m = Image.fromarray((np.arange(42 * 70).reshape(42, 70) % 2).astype(np.uint8), mode="P")
            m.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)   # index 1 is red here, (40, 50, 60) in the table
            m.save(root / split / "masks" / f"s{i}.png")
    t = ClassTable.from_json(json.loads((tmp_path / "t.json").read_text()))
    problem = palette_contradiction(root / "train" / "masks" / "s0.png", t)
    assert "index 1 RGB (200, 0, 0)" in problem and "'sky' (value 1) RGB (40, 50, 60)" in problem
    r = run("extract", *TINY, "--size", "70x42", "--data", root, "--out", tmp_path / "c", "--classes", tmp_path / "t.json")
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("WARNING") and "palette" in ln]
    assert len(warnings) == 2 and "train/masks/s0.png" in warnings[0] and "val/masks/s0.png" in warnings[1]
    # a palette that agrees with the table says nothing
    agree = Image.open(root / "val" / "masks" / "s1.png")
    agree.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    agree.save(tmp_path / "ok.png")
    assert palette_contradiction(tmp_path / "ok.png", t) is None


# -- config files ------------------------------------------------------------------------------

def test_a_config_file_may_hold_any_subset_of_the_settings(tmp_path):
    from seg.train.config_file import config_from_file

    (tmp_path / "lr.json").write_text(json.dumps({"lr": 0.001}))
    cfg, _ = config_from_file(tmp_path / "lr.json", {}, 1)
    assert cfg.phase == 1 and cfg.lr == 0.001 and cfg.head == "convnext"
    cfg, _ = config_from_file(tmp_path / "lr.json", {}, None)
    assert cfg.phase == 3 and cfg.lr == 0.001
    (tmp_path / "p2.json").write_text(json.dumps({"phase": 2, "epochs": 4}))
    assert config_from_file(tmp_path / "p2.json", {}, None)[0].phase == 2
    with pytest.raises(SegError, match="--phase 1 differs from the phase 2"):
        config_from_file(tmp_path / "p2.json", {}, 1)


@pytest.mark.parametrize("settings,says", [({"lr": -1}, "--lr must be a finite number > 0, got -1"),
                                           ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
                                           ({"momentum": 1.5}, "--momentum must be a finite number >= 0 and < 1"),
                                           ({"weight_decay": -0.1}, "--weight-decay must be a finite number >= 0")])
def test_impossible_settings_are_named(tmp_path, settings, says):
    from seg.train.config_file import config_from_file

    (tmp_path / "c.json").write_text(json.dumps(settings))
    with pytest.raises(SegError) as err:
        config_from_file(tmp_path / "c.json", {}, 1)
    assert says in str(err.value)


# -- layout detection --------------------------------------------------------------------------

def folders_dataset(root: Path, mask_suffix: str = ".png", n: int = 2) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cv2.imwrite(str(root / split / "images" / f"S{i}.png"), rng.integers(0, 255, (42, 70, 3), np.uint8))
            cv2.imwrite(str(root / split / "masks" / f"S{i}{mask_suffix}"), np.full((42, 70), i % 2, np.uint8))
    return root


def test_a_tree_of_two_layouts_names_both_and_asks_for_layout(tmp_path):
    root = folders_dataset(tmp_path / "d")
    write_dataset(root, {"train": 1})
    assert (root / LAYOUT["train"]).is_dir()
    with pytest.raises(SegError) as err:
        detect_layout(root)
    assert "matches 2 layouts (falcon:" in str(err.value) and "folders:" in str(err.value)
    assert "--layout falcon|folders" in str(err.value)


def test_empty_cityscapes_folders_do_not_hide_a_folders_dataset(tmp_path):
    root = folders_dataset(tmp_path / "d")
    (root / "leftImg8bit").mkdir()
    (root / "gtFine").mkdir()
    assert detect_layout(root) == "folders"


def test_names_match_in_any_extension_case_skip_hidden_files_and_name_dangling_links(tmp_path):
    root = folders_dataset(tmp_path / "d", mask_suffix=".PNG")
    files = list_split(root, "train")
    assert files.names == ("S0.png", "S1.png") and files.mask_path(0).name == "S0.PNG"
    (root / "train" / "images" / "._S0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "train" / "masks" / "._S0.PNG").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (root / "train" / "images" / ".DS_Store").write_bytes(b"Bud1")
    assert list_split(root, "train").names == ("S0.png", "S1.png")
    os.symlink(tmp_path / "gone.png", root / "train" / "images" / "S2.png")
    cv2.imwrite(str(root / "train" / "masks" / "S2.png"), np.zeros((42, 70), np.uint8))
    with pytest.raises(SegError, match=r"S2.png: a symbolic link to .*gone.png, which does not exist"):
        list_split(root, "train")


def test_names_are_compared_in_one_unicode_normal_form(tmp_path):
    root = folders_dataset(tmp_path / "d", n=1)
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    img = cv2.imread(str(root / "train" / "images" / "S0.png"))
    cv2.imwrite(str(root / "train" / "images" / f"{nfc}.png"), img)
    cv2.imwrite(str(root / "train" / "masks" / f"{nfd}.png"), np.zeros((42, 70), np.uint8))
    files = list_split(root, "train")
    i = files.names.index(f"{nfc}.png")
    assert files.mask_path(i).name == f"{nfd}.png" and files.mask_path(i).is_file()
    cv2.imwrite(str(root / "train" / "images" / f"{nfd}.jpg"), img)   # a second image for the same mask
    with pytest.raises(SegError, match="differ only in Unicode normalisation") as err:
        list_split(root, "train")
    assert ascii(f"{nfd}.jpg") in str(err.value)


def test_an_int8_extraction_into_a_float16_cache_says_what_each_is(tiny_data, tmp_path):
    out = tmp_path / "c"
    assert run("extract", *TINY, "--data", tiny_data, "--out", out, "--splits", "val").exit_code == 0
    line = one_line_error(run("extract", *TINY, "--data", tiny_data, "--out", out, "--splits", "val",
                              "--token-dtype", "int8"),
                          "holds a float16 layer cache", "makes a int8 layer cache", "not a newer one",
                          "--overwrite would DELETE")
    assert "outdated" not in line


# -- the three planted bugs no test caught -----------------------------------------------------

def test_parity_catches_a_graph_wrong_in_one_region_only():
    """Mean and max of |dlogit| agree when every logit moves alike; here only a 4x4 patch is wrong."""
    rng = np.random.default_rng(0)
    eager = rng.normal(0, 3, (2, 5, 32, 48)).astype(np.float32)
    onnx = eager.copy()
    onnx[1, :, 10:14, 20:24] += 0.5
    p = compare("x", onnx.argmax(1).astype(np.uint8), onnx, eager)
    assert p.max_abs_logit_diff == pytest.approx(0.5, abs=1e-6)
    assert not p.within_bound


def test_flip_and_scales_views_of_a_non_square_image_are_resized_per_side():
    seen = []
    segmenter = object.__new__(Segmenter)
    segmenter.patch, segmenter.scales = 14, (0.75, 1.0, 1.25)
    x = torch.rand(1, 3, 126, 224)

    def logits_of(v):
        seen.append(v)
        return torch.zeros(1, 2, 126, 224)

    segmenter._views(x, "flip+scales", segmenter._rescale, logits_of)
    sizes = {0.75: (98, 168), 1.0: (126, 224), 1.25: (154, 280)}   # round(side x scale / 14) x 14, per side
    expected = []
    for scale, size in sizes.items():
        view = x if scale == 1.0 else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        expected += [view, view.flip(-1)]
    assert [tuple(v.shape[-2:]) for v in seen] == [tuple(e.shape[-2:]) for e in expected]
    for v, e in zip(seen, expected):
        assert torch.equal(v, e)


def test_a_sample_exactly_at_the_rare_class_threshold_holds_the_class():
    counts = np.array([[500, 0, 0], [500, 3, 0], [500, 2, 7]])
    sampler = RareClassSampler(counts, temperature=0.01, min_pixels=3)
    assert sampler.holders[1].tolist() == [1]      # 3 pixels: at the threshold
    assert sampler.holders[2].tolist() == [2]
    draws, classes = sampler.draw(200, 0, 0)
    assert set(draws[classes == 1].tolist()) == {1}


def test_help_texts_print_as_written():
    """click does not %-format help: a '%%' in the source shows as '%%' to the user."""
    import click

    def paths(group, prefix=()):
        for name, cmd in group.commands.items():
            yield from paths(cmd, prefix + (name,)) if isinstance(cmd, click.Group) else [prefix + (name,)]

    for path in paths(main):
        text = run(*path, "--help").output
        assert "%%" not in text, f"seg {' '.join(path)} --help: {text}"
    assert "classes under 1% of train pixels" in " ".join(run("extract", "--help").output.split())


def test_a_run_that_ends_inside_its_warmup_says_so(tmp_path):
    from seg.train.presets import resolve
    from seg.train_head import RunOptions, train
    from token_cache import learnable_split, write_token_cache

    assert resolve(3, {"epochs": 4}).warmup_note() is None            # warmup 3 + 1 cosine epoch
    assert resolve(1, {"epochs": 1}).warmup_note() is None            # no warmup in phase 1
    note = resolve(3, {"epochs": 2}).warmup_note()
    assert note.startswith("NOTE: 2 epoch(s) end inside the 3-epoch warmup: the learning rate only reaches 0.0002 of 0.0003")
    rng = np.random.default_rng(0)
    cache = write_token_cache(tmp_path / "c", {"train": learnable_split(2, rng), "val": learnable_split(1, rng)})
    lines = []
    train(resolve(3, {"epochs": 1, "batch_size": 2, "accum": 1}), str(cache), str(tmp_path / "r"),
          RunOptions(device="cpu", progress=False, allow_mismatch=True), log=lines.append)
    assert any(line.startswith("NOTE: 1 epoch(s) end inside the 3-epoch warmup") for line in lines)


def test_an_older_cache_of_the_same_kind_says_this_seg_writes_a_newer_version(tiny_data, tmp_path):
    out = tmp_path / "c"
    assert run("extract", *TINY, "--data", tiny_data, "--out", out, "--splits", "val").exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 3                      # as a seg before prefix tokens wrote it
    del m["prefix_tokens"], m["prefix_layout"]
    (out / "manifest.json").write_text(json.dumps(m))
    one_line_error(run("extract", *TINY, "--data", tiny_data, "--out", out, "--splits", "val"),
                   "holds a float16 layer cache in format version 3; this seg writes version 7 for it",
                   "--overwrite to re-extract")


# -- class tables for id masks without writing JSON --------------------------------------------

def test_class_names_on_the_command_line_make_the_table_of_id_masks(tmp_path):
    root = folders_dataset(tmp_path / "d")
    r = run("extract", *TINY, "--size", "70x42", "--data", root, "--out", tmp_path / "c0")
    one_line_error(r, "--classes ground,sky,tree", "seg classes --data ROOT")
    r = run("extract", *TINY, "--size", "70x42", "--data", root, "--out", tmp_path / "c", "--classes", "ground,sky")
    assert r.exit_code == 0, r.output
    table = json.loads((tmp_path / "c" / "manifest.json").read_text())["class_table"]
    assert [(c["name"], c["values"]) for c in table["classes"]] == [("ground", [0]), ("sky", [1])]
    assert table["ignore_values"] == [255]
    for bad, says in (("ground", "class table file not found"), ("ground,ground", "names must be unique"),
                      ("ground,", "non-empty string name")):
        one_line_error(run("extract", *TINY, "--size", "70x42", "--data", root, "--out", tmp_path / "c2",
                           "--classes", bad), says)
    assert not (tmp_path / "c2").exists()


def test_seg_classes_prints_a_starting_table_from_the_mask_values(tmp_path):
    root = folders_dataset(tmp_path / "d")
    m = np.full((42, 70), 3, np.uint8)
    m[:5] = 255
    cv2.imwrite(str(root / "val" / "masks" / "S1.png"), m)
    r = run("classes", "--data", root, "--no-progress")
    assert r.exit_code == 0, r.output
    table = json.loads(r.output)
    assert [(c["id"], c["name"], c["values"]) for c in table["classes"]] == [(0, "class_0", [0]), (1, "class_1", [1]),
                                                                           (2, "class_3", [3])]
    assert table["ignore_values"] == [255]
    (tmp_path / "t.json").write_text(r.output)  # what --classes takes, as printed
    assert run("extract", *TINY, "--size", "70x42", "--data", root, "--out", tmp_path / "c",
               "--classes", tmp_path / "t.json").exit_code == 0
    colour = np.zeros((42, 70, 3), np.uint8)
    colour[:, :10] = (0, 0, 200)
    cv2.imwrite(str(root / "val" / "masks" / "S1.png"), colour)
    one_line_error(run("classes", "--data", root, "--no-progress"), "S1.png: a colour mask")
    r = run("classes")
    assert r.exit_code == 2 and "--data ROOT" in r.output


# -- a plain folder: images/ and masks/ at the top ---------------------------------------------

def plain_folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        cv2.imwrite(str(root / "images" / f"photo{i:03d}.jpg"), rng.integers(0, 255, (42, 70, 3), np.uint8))
        cv2.imwrite(str(root / "masks" / f"photo{i:03d}.png"), np.full((42, 70), i % 3, np.uint8))
    return root


def test_a_plain_folder_is_split_by_a_hash_of_each_name_that_adding_images_never_moves(tmp_path):
    from seg.data.layouts import in_val

    root = plain_folder(tmp_path / "mydata", 30)
    assert detect_layout(root) == "folders"
    train, val = list_split(root, "train"), list_split(root, "val")
    assert sorted(train.names + val.names) == sorted(p.name for p in (root / "images").iterdir())
    assert not set(train.names) & set(val.names) and 2 <= len(val.names) <= 12   # 0.2 of 30, by hash
    assert train.mask_path(0) == root / "masks" / train.names[0].replace(".jpg", ".png")
    # the rule, by hand: the first 8 bytes of sha256(name) as a fraction of 2^64
    import hashlib

    hand = [n for n in sorted(train.names + val.names)
            if int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") / 2 ** 64 < 0.2]
    assert list(val.names) == hand and all(in_val(n, 0.2) for n in val.names)
    plain_folder(tmp_path / "more", 45)                          # 15 more images, the first 30 the same
    more_val = set(list_split(tmp_path / "more", "val").names)
    assert set(val.names) == {n for n in more_val if n in set(train.names + val.names)}
    with pytest.raises(SegError, match="a plain folder .* has a train and a val split"):
        list_split(root, "test")


def test_a_plain_folder_extracts_in_one_command_and_records_its_split(tmp_path):
    root = plain_folder(tmp_path / "mydata", 12)
    out = tmp_path / "c"
    r = run("extract", *TINY, "--size", "70x42", "--data", root, "--out", out, "--classes", "ground,bush,sky",
            "--val-fraction", "0.3")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["layout"] == "folders" and m["val_split"]["val_fraction"] == 0.3
    assert m["splits"]["val"]["images"] == list(list_split(root, "val", val_fraction=0.3).names)
    assert any(line.startswith("val split    a plain folder: 0.3 of the images") for line in
               run("cache", "info", out).output.splitlines())
    one_line_error(run("extract", *TINY, "--size", "70x42", "--data", root, "--out", out, "--classes",
                       "ground,bush,sky", "--val-fraction", "0.5"), "holds a cache with other settings")
    # train, then score the same val images end to end from the folder
    assert run("train-head", "--cache", out, "--out", tmp_path / "r", "--phase", "1", "--epochs", "1",
               "--device", "cpu").exit_code == 0
    r = run("eval", "--run", tmp_path / "r", "--data", root, "--split", "val", "--val-fraction", "0.3",
            "--device", "cpu", "--workers", "0")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r" / "eval-val-images" / "eval.json").read_text())
    assert report["images"] == len(m["splits"]["val"]["images"])


def test_predict_writes_a_legend_the_colour_map_and_class_id_maps(phase3_run, dataset, tmp_path):
    image = sorted((dataset / LAYOUT["val"] / "Color_Images").iterdir())[0]
    out = tmp_path / "p"
    r = run("predict", "--run", phase3_run, "--images", image, "--out", out, "--save-ids", "--device", "cpu",
            "--workers", "0", "--no-progress")
    assert r.exit_code == 0, r.output
    record = json.loads((out / "predict.json").read_text())
    table = json.loads((phase3_run / "config.json").read_text())["class_table"]
    assert [(c["name"], c["color"]) for c in record["classes"]] == [(c["name"], c["color"]) for c in table["classes"]]
    assert "legend.png" in record["written"] and cv2.imread(str(out / "legend.png")) is not None
    ids = cv2.imread(str(out / "ids" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
    colour = cv2.cvtColor(cv2.imread(str(out / "color" / f"{image.stem}.png")), cv2.COLOR_BGR2RGB)
    assert ids.dtype == np.uint8 and ids.shape == colour.shape[:2] and ids.max() < len(table["classes"])
    palette = np.array([c["color"] for c in table["classes"]], np.uint8)
    assert (palette[ids] == colour).all()                         # the ids are what the colour mask draws
    assert run("predict", "--run", phase3_run, "--images", image, "--out", out, "--save-ids", "--device", "cpu",
               "--workers", "0", "--no-progress").exit_code == 0   # its own output, legend included


def test_every_data_problem_is_listed_in_one_run_before_any_backbone_work(tmp_path, monkeypatch):
    import seg.extract_features as ef

    root = folders_dataset(tmp_path / "d", n=3)
    m = np.zeros((42, 70), np.uint8)
    m[0, 0] = 255
    cv2.imwrite(str(root / "train" / "masks" / "S0.png"), m)                       # a void value
    cv2.imwrite(str(root / "train" / "masks" / "S1.png"), np.zeros((21, 35), np.uint8))   # half size
    cv2.imwrite(str(root / "val" / "masks" / "S2.png"), np.full((42, 70), 9, np.uint8))   # unknown id
    monkeypatch.setattr(ef, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))
    (tmp_path / "t.json").write_text(json.dumps({"classes": [{"name": "a", "values": [0]},
                                                             {"name": "b", "values": [1]}]}))
    r = run("extract", *TINY, "--size", "70x42", "--data", root, "--out", tmp_path / "c", "--classes",
            tmp_path / "t.json")
    listed = [ln for ln in r.output.splitlines() if ln.startswith("data problem: ")]
    assert len(listed) == 3
    assert "S0.png: unknown mask value(s) 255" in listed[0] and "255 is usually 'void'" in listed[0]
    assert "S1.png: mask is 35x21 but its image is 70x42" in listed[1] and "nearest" in listed[1]
    assert "S2.png: unknown mask value(s) 9" in listed[2] and "a class's values" in listed[2]
    one_line_error(r, "3 problems in the data (listed above; the first: ", "nothing was extracted")
    assert not (tmp_path / "c").exists()


def test_curves_of_a_one_epoch_run_are_readable(tmp_path, monkeypatch):
    from seg.scoring import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    plots.curves([{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_miou": 0.6957}], tmp_path / "c.png")
    loss_ax, miou_ax = figs[0].axes
    assert loss_ax.get_ylim() == pytest.approx((0, 1.1)) and miou_ax.get_ylim() == (0, 1)
    assert miou_ax.get_xlim() == (0.5, 1.5) and [t for t in miou_ax.get_xticks() if 0.5 <= t <= 1.5] == [1]
    label = miou_ax.texts[0]
    assert label.get_text() == "best 0.6957" and label.get_horizontalalignment() == "center"


def test_the_compare_panel_has_titles_and_a_legend_of_the_classes_it_shows():
    from seg.infer.panels import compare_panel

    table = ClassTable(("ground", "bush", "sky"), ((0,), (1,), (2,)), ((200, 0, 0), (0, 200, 0), (0, 0, 200)), ())
    truth = np.zeros((90, 160), np.uint8)
    truth[:30] = 2
    pred = np.full((90, 160), 2, np.uint8)
    palette = np.array(table.colors, np.uint8)
    panel = compare_panel(np.full((90, 160, 3), 128, np.uint8), palette[truth], palette[pred], truth, pred, table)
    bar = 20
    assert panel.shape == (90 + 2 * bar, 480, 3)
    titles, legend = panel[:bar], panel[-bar:]
    for third in range(3):                       # a title over each of the three views
        assert (titles[:, third * 160:(third + 1) * 160] < 100).any()
    colours = {tuple(int(v) for v in px) for px in legend.reshape(-1, 3)}
    assert (200, 0, 0) in colours and (0, 0, 200) in colours and (0, 200, 0) not in colours
