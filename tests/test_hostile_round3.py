"""Hostile inputs, round three: nothing outside a stage's own directory is deleted, tokens and masks
are checked wherever they are consumed, names that are not UTF-8, JSON that is not UTF-8, absurd sizes
and hand-edited manifests are one line each, and the fast data tests pin what only slow tests caught."""

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from seg.cli import main
from seg.data.augment import Augmenter
from seg.data.decode import read_pair
from seg.data.layouts import list_split
from seg.data.synthetic import write_dataset
from seg.train_head import RunOptions, train
from test_trust_files import finished_run, token_cache  # noqa: F401  (fixtures)
from token_cache import learnable_split, write_token_cache

TINY = ["--backbone", "vits14", "--size", "140x84", "--random-init", "--workers", "0", "--batch-size", "2",
        "--shard-size", "2"]
QUIET = dict(log=lambda s: None)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *fragments):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, r.output
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("d"), {"train": 2, "val": 2})


def edited_manifest(cache: Path, tmp_path: Path, edit) -> Path:
    """A copy of the cache whose manifest `edit(manifest)` changed (the shards are the same files)."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for p in cache.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy


# 1. --overwrite deletes only inside --out, whatever the old manifest names
def test_overwrite_never_deletes_what_a_manifest_names_outside_the_cache(tiny_data, tmp_path):
    out = tmp_path / "cache"
    assert run("extract", *TINY, "--data", tiny_data, "--out", out, "--splits", "val").exit_code == 0
    victims = [tmp_path / "elsewhere.h5", tmp_path / "abs.h5"]
    for v in victims:
        v.write_bytes(b"the user's file")
    m = json.loads((out / "manifest.json").read_text())
    real = m["splits"]["val"]["shards"][0]["file"]
    m["splits"]["val"]["shards"][0]["file"] = "../elsewhere.h5"
    m["splits"]["val"]["shards"].append({"file": str(victims[1]), "start": 2, "samples": 1})
    (out / "manifest.json").write_text(json.dumps(m))
    r = run("extract", *TINY, "--data", tiny_data, "--out", out, "--splits", "val", "--overwrite")
    assert r.exit_code == 0, r.output
    assert all(v.read_bytes() == b"the user's file" for v in victims)
    assert (out / real).is_file() and run("cache", "verify", out).exit_code == 0


# 2 and 6. every stage that consumes tokens refuses non-finite tokens and out-of-table mask ids
def test_non_finite_tokens_are_refused_by_eval_and_training(token_cache, finished_run, tmp_path):
    rng = np.random.default_rng(0)
    train_split, val_split = learnable_split(4, rng), learnable_split(2, rng)
    val_split[0][1, 0, 3, 2, 2] = np.nan  # checksums are computed after: only the values are wrong
    bad = write_token_cache(tmp_path / "nan", {"train": train_split, "val": val_split})
    one_line_error(run("eval", "--run", finished_run, "--cache", bad, "--device", "cpu"),
                   "val-00000.h5: sample 1 (val_0001.png, aug seed 0) holds NaN or infinite tokens")
    for i, flags in enumerate(([], ["--no-verify"], ["--preload", "never"])):
        one_line_error(run("train-head", "--cache", bad, "--out", tmp_path / f"r{i}", "--phase",
                           "1", "--epochs", "1", "--allow-mismatch", "--device", "cpu", *flags),
                       "NaN or infinite tokens")


def test_mask_ids_past_the_table_are_refused_without_verify(tmp_path):
    rng = np.random.default_rng(0)
    train_split, val_split = learnable_split(4, rng), learnable_split(2, rng)
    train_split[1][2, 20, 30] = 17
    bad = write_token_cache(tmp_path / "ids", {"train": train_split, "val": val_split})
    for preload in ("always", "never"):
        one_line_error(run("train-head", "--cache", bad, "--out", tmp_path / f"r-{preload}", "--phase", "1",
                           "--epochs", "1", "--allow-mismatch", "--device", "cpu", "--no-verify", "--preload", preload),
                       "train-00000.h5: sample 2 (train_0002.png, aug seed 0) holds mask ids 17 outside the class table")


# 3. names that are not UTF-8
def test_non_utf8_image_names_are_one_line_and_write_nothing(tmp_path):
    root = write_dataset(tmp_path / "d", {"train": 2})
    split = root / "Offroad_Segmentation_Training_Dataset" / "train"
    first = sorted((split / "Color_Images").iterdir())[0]
    bad = os.fsdecode(b"frame\xff.png")
    os.rename(first, split / "Color_Images" / bad)
    os.rename(split / "Segmentation" / first.name, split / "Segmentation" / bad)
    out = tmp_path / "cache"
    line = one_line_error(run("extract", *TINY, "--data", root, "--out", out, "--splits", "train"),
                          "the file name is not valid UTF-8")
    assert "frame\\xff.png" in line
    assert not out.exists()


def test_predict_reads_or_refuses_every_name_and_fails_when_nothing_was_predicted(tmp_path, small_cache):
    from seg.train.presets import resolve as preset

    run_dir = tmp_path / "run"
    train(preset(3, {"epochs": 1}), str(small_cache), str(run_dir),
          RunOptions(device="cpu", progress=False, allow_mismatch=True), **QUIET)
    images = tmp_path / "imgs"
    images.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    cv2.imwrite(str(images / "good.png"), rgb)
    (images / os.fsdecode(b"bad\xfe.png")).write_bytes((images / "good.png").read_bytes())
    r = run("predict", "--run", run_dir, "--images", images, "--out", tmp_path / "p", "--workers", "1",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "bad\\xfe.png: the file name is not valid UTF-8" in r.output and "predicted 1 images" in r.output
    (images / "good.png").unlink()
    one_line_error(run("predict", "--run", run_dir, "--images", images, "--out", tmp_path / "q", "--workers", "0",
                       "--device", "cpu"), "predicted nothing: all 1 input image(s) were skipped")


# 4. JSON that is not UTF-8
def test_json_that_is_not_utf8_is_one_line(tiny_data, token_cache, tmp_path):
    table = tmp_path / "classes.json"
    table.write_bytes('{"classes": [{"name": "Caf\u00e9", "values": [0]}]}'.encode("latin-1"))
    one_line_error(run("extract", *TINY, "--data", tiny_data, "--out", tmp_path / "c", "--classes", table),
                   "classes.json: not a readable JSON class table: not UTF-8 text (byte 0xe9")
    copy = edited_manifest(token_cache, tmp_path, lambda m: None)
    (copy / "manifest.json").write_bytes((copy / "manifest.json").read_bytes().replace(b'"test"', b'"t\xe9st"'))
    one_line_error(run("cache", "info", copy), "manifest.json: not a readable JSON cache manifest: not UTF-8")
    assert not (tmp_path / "c").exists()


# 5. sizes are bounded before anything is allocated or written
def test_absurd_size_is_refused_before_anything_is_written(tiny_data, tmp_path):
    out = tmp_path / "c"
    one_line_error(run("extract", "--data", tiny_data, "--out", out, "--backbone", "vits14", "--random-init",
                       "--size", "140000x140000"), "100000000 patch tokens per image", "limit of 16384")
    assert not out.exists()


# 7, 8, 9. hand-edited manifests
def test_format_version_of_the_wrong_type_says_what_was_found(token_cache, tmp_path):
    copy = edited_manifest(token_cache, tmp_path, lambda m: m.update(format_version="3"))
    one_line_error(run("cache", "info", copy), "format_version is '3', a str; seg writes it as a whole number")


def test_edited_counts_fail_verify_and_are_refused_before_training(token_cache, tmp_path):
    copy = edited_manifest(token_cache, tmp_path, lambda m: m["splits"]["train"].update(num_samples=40))
    r = run("cache", "verify", copy)
    assert r.exit_code == 1 and "train: num_samples is 40, but 6 images x 1 seeds make 6" in r.output
    one_line_error(run("train-head", "--cache", copy, "--out", tmp_path / "r", "--phase", "1", "--allow-mismatch",
                       "--device", "cpu"), "num_samples is 40")


def test_shard_counts_and_sizes_are_checked(token_cache, tmp_path):
    def edit(m):
        m["splits"]["val"]["shards"][0]["samples"] = 1
        m["splits"]["train"]["shards"][0]["bytes"] += 1
    r = run("cache", "verify", edited_manifest(token_cache, tmp_path, edit))
    assert r.exit_code == 1
    assert "val: the shard list (files, starts, sample counts) does not match the planned layout" in r.output
    assert "train-00000.h5: " in r.output and "bytes, the manifest states" in r.output


def test_image_names_with_folders_are_refused_and_never_looked_up(token_cache, tmp_path, monkeypatch):
    def edit(m):
        m["splits"]["val"]["images"][0] = "../../../../etc/passwd"
        m["splits"]["val"]["sources"] = [[[1, 1], [1, 1]]] * 2  # what extraction records: sizes and mtimes
    copy = edited_manifest(token_cache, tmp_path, edit)
    looked = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: (looked.append(str(p)), real_stat(p, *a, **k))[1])
    r = run("cache", "verify", "--sources", copy)
    assert r.exit_code == 1 and "image name '../../../../etc/passwd' is not a plain file name" in r.output
    assert not any("passwd" in p for p in looked)
    one_line_error(run("train-head", "--cache", copy, "--out", tmp_path / "r", "--phase", "1", "--allow-mismatch",
                       "--device", "cpu"), "is not a plain file name")


# 11. the mask resize is nearest, pinned where a linear resize would differ
def test_mask_resize_is_nearest_at_boundaries_between_grid_points():
    mask = np.full((540, 960), 3, np.uint8)
    mask[:, 1::3] = 9   # stripes narrower than the output grid step: every output pixel straddles a boundary
    mask[5::7, :] = 0
    _, got = Augmenter("none", (224, 126))(np.zeros((540, 960, 3), np.uint8), mask, "x", 0)
    np.testing.assert_array_equal(got, cv2.resize(mask, (224, 126), interpolation=cv2.INTER_NEAREST))
    assert set(np.unique(got)) <= {0, 3, 9}


# 12. images are RGB and resized bilinearly, pinned in the fast tests
def test_images_are_read_as_rgb_and_resized_bilinearly(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (54, 96, 3), dtype=np.uint8)
    rgb[..., 0] = 250  # a red cast: swapping the channels cannot go unnoticed
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    image, _ = read_pair(path, None, None)
    np.testing.assert_array_equal(image, rgb)
    small, _ = Augmenter("none", (28, 14))(image, None, "x", 0)
    np.testing.assert_array_equal(small, cv2.resize(rgb, (28, 14), interpolation=cv2.INTER_LINEAR))
    assert not np.array_equal(small, cv2.resize(rgb, (28, 14), interpolation=cv2.INTER_NEAREST))


def test_dataset_images_are_rgb(tiny_data):
    files = list_split(tiny_data, "val")
    image, _ = read_pair(files.image_path(0), None, None)
    np.testing.assert_array_equal(image, cv2.imread(str(files.image_path(0)))[..., ::-1])


# 13. the number of cached views defaults to 4 with a policy
def test_aug_seeds_default_to_four_with_a_policy_and_one_without(tiny_data, tmp_path):
    r = run("extract", *TINY, "--data", tiny_data, "--out", tmp_path / "a", "--aug-policy", "phase2",
            "--splits", "train")
    assert r.exit_code == 0 and "WARNING" not in r.output, r.output
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["splits"]["train"]["seeds"] == [1, 2, 3, 4]
    assert run("extract", *TINY, "--data", tiny_data, "--out", tmp_path / "b", "--splits", "train").exit_code == 0
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["splits"]["train"]["seeds"] == [0]


# 14. the published border fill, as a switch
def test_border_fill_background_fills_class_zero_where_ours_ignores():
    image = np.full((540, 960, 3), 128, np.uint8)
    mask = np.full((540, 960), 3, np.uint8)
    ours, published = Augmenter("phase2", (224, 126)), Augmenter("phase2", (224, 126), "background")
    filled = 0
    for seed in range(1, 30):
        _, a = ours(image, mask, "x", seed)
        _, b = published(image, mask, "x", seed)
        np.testing.assert_array_equal(b, np.where(a == 255, 0, a))  # the same draw, only the fill differs
        filled += int((a == 255).sum())
    assert filled > 0  # some draw did move the image out of frame
    with pytest.raises(Exception, match="unknown border fill"):
        Augmenter("phase2", (224, 126), "zero")
