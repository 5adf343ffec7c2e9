"""`seg eval` (from the cache and from images) and `seg predict` on tiny data."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg.cli import main
from seg.train.presets import resolve
from seg.train_head import RunOptions, train
from token_cache import learnable_split, write_token_cache


@pytest.fixture(scope="module")
def run_dir(small_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    cfg = resolve(3, {"epochs": 2, "lr": 1e-3})
    train(cfg, str(small_cache), str(out), RunOptions(device="cpu", progress=False, allow_mismatch=True),
          log=lambda s: None)
    return out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cache_and_image_evaluation_agree(run_dir, small_cache, dataset, tmp_path):
    r1 = invoke("eval", "--run", run_dir, "--cache", small_cache, "--split", "val", "--out", tmp_path / "c")
    assert r1.exit_code == 0, r1.output
    r2 = invoke("eval", "--run", run_dir, "--data", dataset, "--split", "val", "--out", tmp_path / "i", "--workers", "0")
    assert r2.exit_code == 0, r2.output
    a = json.loads((tmp_path / "c" / "eval.json").read_text())
    b = json.loads((tmp_path / "i" / "eval.json").read_text())
    assert a["mode"] == "cache" and b["mode"] == "images" and a["images"] == b["images"] == 3
    assert a["scored_at"] == b["scored_at"] == "224x126"
    cm_a, cm_b = np.array(a["confusion_matrix"]), np.array(b["confusion_matrix"])
    assert cm_a.sum() == cm_b.sum() > 0
    assert np.abs(cm_a - cm_b).sum() / 2 <= 0.001 * cm_a.sum()  # the same pixels, the same predictions
    assert a["miou"] == pytest.approx(b["miou"], abs=2e-3)
    # the validation metrics of the best epoch are the same numbers as a cache evaluation
    best = json.loads((run_dir / "metrics.json").read_text())
    assert best["miou"] == pytest.approx(a["miou"], abs=1e-9)
    for key in ["iou", "dice", "acc", "miou", "mdice", "macc", "aacc", "present", "absent", "miou_present"]:
        assert key in a
    assert "IoU" in r1.output and "Sky" in r1.output and "pixel accuracy" in r1.output
    for name in ["eval.txt", "confusion.png", "per_class_iou.png"]:
        assert (tmp_path / "c" / name).is_file()
    assert cv2.imread(str(tmp_path / "c" / "confusion.png")).shape[0] > 300


def test_full_resolution_and_tta(run_dir, dataset, small_cache, tmp_path):
    r = invoke("eval", "--run", run_dir, "--data", dataset, "--split", "test", "--full-res", "--tta", "flip",
               "--out", tmp_path / "f", "--workers", "0")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "f" / "eval.json").read_text())
    assert res["scored_at"] == "original size" and res["tta"] == "flip"
    assert res["pixels"] == 2 * 960 * 540  # the synthetic masks have no ignore pixels
    r = invoke("eval", "--run", run_dir, "--cache", small_cache, "--split", "test", "--full-res", "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    res_cache = json.loads((tmp_path / "g" / "eval.json").read_text())
    assert res_cache["pixels"] == 2 * 960 * 540
    r = invoke("eval", "--run", run_dir, "--data", dataset, "--split", "val", "--tta", "flip+scales",
               "--out", tmp_path / "s", "--workers", "0")
    assert r.exit_code == 0, r.output


def test_predict_outputs(run_dir, dataset, tmp_path):
    test_dir = dataset / "Offroad_Segmentation_testImages" / "Color_Images"
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(test_dir / "test_00000.png", loose / "mine.png")
    r = invoke("predict", "--run", run_dir, "--images", test_dir, "--images", loose / "mine.png",
               "--out", tmp_path / "p", "--save-raw", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "predicted 3 images" in r.output and "images/s" in r.output
    for stem in ["test_00000", "test_00001", "mine"]:
        assert cv2.imread(str(tmp_path / "p" / "color" / f"{stem}.png")).shape == (540, 960, 3)
        assert cv2.imread(str(tmp_path / "p" / "overlay" / f"{stem}.png")).shape == (540, 960, 3)
        raw = cv2.imread(str(tmp_path / "p" / "raw" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and raw.shape == (540, 960)
        assert set(np.unique(raw)) <= {0, 100, 200, 300, 500, 550, 700, 800, 7100, 10000}
    # a ground truth sits beside the dataset images only
    # image | truth | prediction, with a title bar above and a legend strip below (30 px each at 540)
    assert cv2.imread(str(tmp_path / "p" / "compare" / "test_00000.png")).shape == (540 + 2 * 30, 3 * 960, 3)
    assert not (tmp_path / "p" / "compare" / "mine.png").exists()
    # colour mask and raw mask describe the same prediction
    color = cv2.cvtColor(cv2.imread(str(tmp_path / "p" / "color" / "test_00001.png")), cv2.COLOR_BGR2RGB)
    raw = cv2.imread(str(tmp_path / "p" / "raw" / "test_00001.png"), cv2.IMREAD_UNCHANGED)
    sky = raw == 10000
    assert sky.any() and (color[sky] == [135, 206, 235]).all()


def _one_line_error(r, text):
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1 and text in lines[0], r.output
    assert "Traceback" not in r.output


def test_errors(run_dir, small_cache, dataset, tmp_path):
    _one_line_error(invoke("eval", "--run", tmp_path, "--cache", small_cache), "no best.pt")
    _one_line_error(invoke("eval", "--run", run_dir), "give exactly one of --cache")
    _one_line_error(invoke("eval", "--run", run_dir, "--cache", small_cache, "--tta", "flip"), "--tta needs images")
    # a cache of other features
    rng = np.random.default_rng(0)
    t, m = learnable_split(4, rng, channels=384, grid=(9, 16))
    other = write_token_cache(tmp_path / "other", {"val": (t, m)}, size=(224, 126))
    _one_line_error(invoke("eval", "--run", run_dir, "--cache", other), "built with other features")
    # a cache with another class table
    copy = tmp_path / "copy"
    shutil.copytree(small_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["class_table"]["classes"][0]["name"] = "Void"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(invoke("eval", "--run", run_dir, "--cache", copy), "class table differs")
    # random-init runs rebuild their own weights; a weights file is refused
    w = tmp_path / "w.pth"
    torch.save({}, w)
    _one_line_error(invoke("eval", "--run", run_dir, "--data", dataset, "--weights", w), "--weights does not apply")
    # unreadable image
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    _one_line_error(invoke("predict", "--run", run_dir, "--images", bad, "--out", tmp_path / "o", "--workers", "0",
                           "--strict"), "bad.png: cannot read image")
    _one_line_error(invoke("predict", "--run", run_dir, "--images", tmp_path / "none", "--out", tmp_path / "o"),
                    "no such image, video or folder")


def test_run_trained_on_official_weights_checks_sha256(run_dir, tmp_path, dataset):
    """A run whose cache used a weights file is only evaluated with that very file."""
    from seg.backbones import file_sha256, load_backbone
    from seg.runtime.errors import SegError
    from seg.backbones.rebuild import rebuild_backbone

    model, info = load_backbone("vits14", random_init=True, seed=5)
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    record = {"backbone": "vits14", "weights_sha256": file_sha256(good), "weights_source": str(good),
              "random_init_seed": None, "weights_fingerprint": info.state_fingerprint}
    assert rebuild_backbone(record, str(good), torch.device("cpu")) is not None
    other = tmp_path / "other.pth"
    torch.save(load_backbone("vits14", random_init=True, seed=6)[0].state_dict(), other)
    with pytest.raises(SegError, match="sha256 differs"):
        rebuild_backbone(record, str(other), torch.device("cpu"))
    assert rebuild_backbone(record, None, torch.device("cpu")) is not None  # the recorded file, found again
    good.rename(tmp_path / "moved.pth")
    with pytest.raises(SegError, match=f"are not at {good}; put them there or pass --weights FILE"):
        rebuild_backbone(record, None, torch.device("cpu"))
