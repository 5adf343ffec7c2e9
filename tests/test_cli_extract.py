"""`seg extract`, `seg cache info|verify` through click, including every user mistake."""

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from seg.cli import main
from seg.data.synthetic import write_dataset
from conftest import SMALL_SIZE
from interrupt import extract_killed_after

BASE = ["extract", "--backbone", "vits14", "--size", SMALL_SIZE, "--random-init", "--workers", "0",
        "--batch-size", "2", "--shard-size", "2"]


def base_with(flag, value):
    args = list(BASE)
    args[args.index(flag) + 1] = value
    return args


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def shard_hashes(cache: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.glob("*.h5"))}


def test_extract_info_verify(dataset, tmp_path):
    out = tmp_path / "c"
    r = run(*BASE, "--data", dataset, "--out", out, "--splits", "train,val")
    assert r.exit_code == 0, r.output
    assert "NOTICE: vits14 has RANDOM weights" in r.output
    assert "samples: 9 (9 extracted now), shards: 5 (5 written now)" in r.output
    assert "images/s" in r.output and "MB/sample" in r.output
    info = run("cache", "info", out)
    assert info.exit_code == 0 and "patch grid 16x9 = 144 tokens" in info.output
    assert "split train  6 images x seeds 0 = 6 samples in 3 shards" in info.output
    v = run("cache", "verify", out)
    assert v.exit_code == 0 and "OK (9 samples)" in v.output
    # rerun: nothing to do, same bytes
    before = shard_hashes(out)
    r2 = run(*BASE, "--data", dataset, "--out", out, "--splits", "train,val")
    assert r2.exit_code == 0 and "0 shards (0 samples) to do" in r2.output
    assert shard_hashes(out) == before


def test_other_settings_refused_then_overwrite(dataset, tmp_path):
    out = tmp_path / "c"
    assert run(*BASE, "--data", dataset, "--out", out, "--splits", "val").exit_code == 0
    r = run(*base_with("--backbone", "vits14_reg"), "--data", dataset, "--out", out, "--splits", "val")
    assert r.exit_code == 1
    assert f"Error: {out}: holds a cache with other settings (differs in " in r.output
    assert "backbone" in r.output and "Traceback" not in r.output
    r = run(*BASE, "--data", dataset, "--out", out, "--splits", "val", "--layers", "2")
    assert r.exit_code == 1 and "layers" in r.output
    r = run(*BASE, "--data", dataset, "--out", out, "--splits", "val", "--layers", "2", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["token_shape"] == [2, 384, 9, 16]


def _one_line_error(r, *fragments):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, r.output
    for frag in fragments:
        assert frag in lines[0], lines[0]


@pytest.fixture()
def bad_data(tmp_path):
    root = write_dataset(tmp_path / "d", {"train": 2, "val": 1})
    return root, root / "Offroad_Segmentation_Training_Dataset" / "train"


def test_unknown_mask_value(bad_data, tmp_path):
    root, base = bad_data
    raw = cv2.imread(str(base / "Segmentation" / "train_00001.png"), cv2.IMREAD_UNCHANGED)
    raw[:5, :5] = 4242
    cv2.imwrite(str(base / "Segmentation" / "train_00001.png"), raw)
    r = run(*BASE, "--data", root, "--out", tmp_path / "c")
    _one_line_error(r, "train_00001.png: unknown mask value(s) 4242")


def test_missing_mask(bad_data, tmp_path):
    root, base = bad_data
    (base / "Segmentation" / "train_00000.png").unlink()
    _one_line_error(run(*BASE, "--data", root, "--out", tmp_path / "c"), "train_00000.png: no mask")


def test_wrong_mask_size(bad_data, tmp_path):
    root, base = bad_data
    cv2.imwrite(str(base / "Segmentation" / "train_00000.png"), np.zeros((100, 100), np.uint16))
    _one_line_error(run(*BASE, "--data", root, "--out", tmp_path / "c"),
                    "train_00000.png: mask is 100x100 but its image is 960x540")


def test_unreadable_image(bad_data, tmp_path):
    root, base = bad_data
    (base / "Color_Images" / "train_00001.png").write_bytes(b"\x89PNG broken")
    _one_line_error(run(*BASE, "--data", root, "--out", tmp_path / "c"), "train_00001.png: cannot read image")


def test_bad_flags(dataset, tmp_path):
    _one_line_error(run(*base_with("--size", "500x300"), "--data", dataset, "--out", tmp_path / "a"),
                    "--size 500x300: both sides must be positive multiples of 14")
    _one_line_error(run(*BASE, "--data", dataset, "--out", tmp_path / "b", "--layers", "13"), "--layers")
    _one_line_error(run(*BASE, "--data", dataset, "--out", tmp_path / "c", "--aug-seeds", "3"),
                    "--aug-seeds > 1 needs an augmentation policy")
    _one_line_error(run(*BASE, "--data", tmp_path / "nowhere", "--out", tmp_path / "d"), "nowhere: no such dataset folder")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "precious.txt").write_text("keep me")
    _one_line_error(run(*BASE, "--data", dataset, "--out", tmp_path / "e"), "is not a feature cache")
    assert (tmp_path / "e" / "precious.txt").read_text() == "keep me"


def test_verify_reports_corrupt_shard(dataset, tmp_path):
    out = tmp_path / "c"
    assert run(*BASE, "--data", dataset, "--out", out, "--splits", "val").exit_code == 0
    shard = out / "val-00000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x55
    shard.write_bytes(bytes(data))
    r = run("cache", "verify", out)
    assert r.exit_code == 1 and "val-00000.h5: sha256 differs" in r.output
    assert r.output.strip().endswith("1 problem(s) found") or "problem(s) found" in r.output
    _one_line_error(run("cache", "info", tmp_path), "not a feature cache (no manifest.json)")


def test_resume_after_sigkill_gives_identical_bytes(dataset, tmp_path):
    args = ["--data", str(dataset), "--backbone", "vits14", "--size", "476x266", "--random-init",
            "--aug-policy", "phase2", "--aug-seeds", "2", "--splits", "train,val", "--batch-size", "2",
            "--shard-size", "2", "--workers", "1"]
    ref = tmp_path / "ref"
    assert run("extract", *args, "--out", ref).exit_code == 0
    out = tmp_path / "killed"
    done_before = extract_killed_after(args, out)
    assert 2 <= done_before < 8, "the kill must land mid-run"
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    r = run("extract", *args, "--out", out)
    assert r.exit_code == 0, r.output
    assert f"{8 - done_before} shards" in r.output  # only the missing shards were computed
    assert shard_hashes(out) == shard_hashes(ref)
    m_ref = json.loads((ref / "manifest.json").read_text())
    m_out = json.loads((out / "manifest.json").read_text())
    assert m_ref == m_out
    assert not list(out.glob("*.tmp"))


def test_policy_caches_hold_only_augmented_train_draws(dataset, tmp_path):
    r = run(*BASE, "--data", dataset, "--out", tmp_path / "c", "--aug-policy", "phase2", "--aug-seeds", "1",
            "--splits", "train,val")
    assert r.exit_code == 0, r.output
    assert "WARNING: --aug-seeds 1 with policy phase2: each train image gets only 1 augmented view(s)" in r.output
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["splits"]["train"]["seeds"] == [1] and m["splits"]["val"]["seeds"] == [0]
    # seed 1 is an augmented draw, not the plain resize: some train sample differs from seed 0
    from seg.data.augment import Augmenter
    from seg.data.classes import default_class_table
    from seg.data.layouts import list_split
    from seg.data.decode import MaskDecoder, read_split_pair

    files = list_split(dataset, "train")
    lut = MaskDecoder.of(default_class_table())
    plain, aug = Augmenter("none", (224, 126)), Augmenter("phase2", (224, 126))
    differ = [not np.array_equal(plain(*read_split_pair(files, i, lut), files.names[i], 0)[0],
                                 aug(*read_split_pair(files, i, lut), files.names[i], 1)[0])
              for i in range(len(files.names))]
    assert sum(differ) >= 4
    info = run("cache", "info", tmp_path / "c")
    assert "1 augmented view(s) per train image" in info.output
