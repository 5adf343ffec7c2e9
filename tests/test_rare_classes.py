"""Issue 13: per-sample class statistics, rare-class sampling, copy-paste at extraction."""

import hashlib
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg.cache import FeatureCache
from seg.data.class_stats import class_counts
from seg.cli import main
from seg.data.copy_paste import CopyPasteConfig, copy_paste
from seg.train.presets import resolve
from seg.train.sampling import RareClassSampler, default_min_pixels
from seg.data.synthetic import write_dataset
from seg.train_head import RunOptions, train
from conftest import SMALL_SIZE
from token_cache import learnable_split, write_token_cache
from interrupt import train_interrupted_at

EXTRACT = ["extract", "--backbone", "vits14", "--size", SMALL_SIZE, "--random-init", "--workers", "0",
           "--batch-size", "2", "--shard-size", "4"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_class_counts_by_hand():
    masks = np.array([[[0, 0, 2], [255, 2, 2]], [[1, 1, 1], [1, 9, 255]]], np.uint8)
    # sample 0: class 0 twice, class 2 three times; sample 1: class 1 four times (9 and 255 are not classes)
    assert class_counts(masks, 3).tolist() == [[2, 0, 3], [0, 4, 0]]
    assert class_counts(masks.astype(np.int64), 3).tolist() == [[2, 0, 3], [0, 4, 0]]  # the general path


# -- statistics in the cache ------------------------------------------------------------------

def test_extraction_records_class_counts_per_sample(small_cache):
    m = json.loads((small_cache / "manifest.json").read_text())
    for split in ("train", "val"):
        stored = np.asarray(m["splits"][split]["class_counts"])
        expect = []
        for shard in sorted(small_cache.glob(f"{split}-*.h5")):
            with h5py.File(shard) as f:
                masks = f["masks"][()]
                assert f["class_counts"].shape == (len(masks), 10)
                np.testing.assert_array_equal(f["class_counts"][()], stored[len(expect):len(expect) + len(masks)])
            for mk in masks:  # counted independently, one np.unique per mask
                values, n = np.unique(mk, return_counts=True)
                row = np.zeros(10, int)
                row[values[values < 10]] = n[values < 10]
                expect.append(row)
        np.testing.assert_array_equal(stored, np.array(expect))
    info = run("cache", "info", small_cache)
    assert info.exit_code == 0 and "classes in train (after augmentation):" in info.output
    assert "of 12 samples" in info.output and "% of pixels" in info.output


def test_older_caches_get_counts_computed_once_and_stored(tmp_path):
    rng = np.random.default_rng(0)
    t, m = learnable_split(6, rng)
    cache = write_token_cache(tmp_path / "c", {"train": (t, m), "val": (t[:2], m[:2])}, shard_size=4)
    side = cache / "class-counts.json"
    assert not side.exists()
    counts = FeatureCache(cache).class_counts("train")
    np.testing.assert_array_equal(counts, class_counts(m, 10))
    assert json.loads(side.read_text())["train"]["counts"] == counts.tolist()
    stored = json.loads(side.read_text())
    stored["train"]["counts"][0][0] += 1000  # proves the second call reads the file, not the masks
    side.write_text(json.dumps(stored))
    assert FeatureCache(cache).class_counts("train")[0, 0] == counts[0, 0] + 1000
    assert run("cache", "verify", cache).exit_code == 0  # the side file is the cache's own


# -- rare-class sampling ----------------------------------------------------------------------

def test_the_class_draw_follows_the_formula():
    # 3 classes over 20 samples: pixel shares f = (0.9, 0.09, 0.01)
    counts = np.zeros((20, 3), np.int64)
    counts[:, 0] = 90  # 1800 + 180 + 20 = 2000 pixels
    counts[:10, 1] = 18
    counts[:2, 2] = 10
    T = 0.05
    f = np.array([0.9, 0.09, 0.01])
    z = np.exp((1 - f) / T - ((1 - f) / T).max())
    p = z / z.sum()  # softmax((1 - f) / T) = (0.0000, 0.168, 0.832)
    sampler = RareClassSampler(counts, T, min_pixels=1)
    np.testing.assert_allclose(sampler.probs, p, rtol=1e-9)
    drawn = np.concatenate([sampler.draw(20, e, 0)[1] for e in range(200)])
    empirical = np.bincount(drawn, minlength=3) / len(drawn)
    # 4000 draws: binomial std <= 0.006, so 0.03 is five sigma
    np.testing.assert_allclose(empirical, p, atol=0.03)
    idx, cls = sampler.draw(500, 7, 3)
    assert (counts[idx, cls] >= 1).all()  # every sample holds its drawn class
    assert set(idx[cls == 2]) <= {0, 1}
    assert np.array_equal(sampler.draw(20, 4, 1)[0], sampler.draw(20, 4, 1)[0])
    assert not np.array_equal(sampler.draw(20, 4, 1)[0], sampler.draw(20, 5, 1)[0])


def test_min_pixels_and_its_default():
    counts = np.array([[100, 5], [100, 50]])
    sampler = RareClassSampler(counts, 0.01, min_pixels=10)
    idx, cls = sampler.draw(200, 0, 0)
    assert (idx[cls == 1] == 1).all()  # sample 0 holds only 5 < 10 pixels of class 1
    assert default_min_pixels((512, 1024)) == 3000 and default_min_pixels((364, 644)) == round(3000 * 364 * 644 / 524288)


def test_rare_class_training_records_draws_and_resumes_exactly(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    t, m = learnable_split(12, rng)
    m[:10][m[:10] == 6] = 0  # class 6 only in samples 10 and 11: rare
    cache = write_token_cache(tmp_path / "c", {"train": (t, m), "val": learnable_split(2, rng)})
    opts = RunOptions(device="cpu", progress=False, allow_mismatch=True)
    cfg = resolve(1, {"epochs": 3, "sampling": "rare-class", "rcs_min_pixels": 1})
    train(cfg, str(cache), str(tmp_path / "full"), opts, log=lambda s: None)
    uniform = resolve(1, {"epochs": 3})
    train(uniform, str(cache), str(tmp_path / "uni"), opts, log=lambda s: None)
    hist = json.loads((tmp_path / "full" / "history.json").read_text())
    hist_u = json.loads((tmp_path / "uni" / "history.json").read_text())
    assert all(h["drawn_Logs"] <= 2 for h in hist_u)  # uniform: each image once, Logs in 2 of 12
    assert sum(h["drawn_Logs"] for h in hist) > sum(h["drawn_Logs"] for h in hist_u)
    train_interrupted_at(monkeypatch, 2, cfg, str(cache), str(tmp_path / "cut"), opts, log=lambda s: None)
    train(cfg, str(cache), str(tmp_path / "cut"), RunOptions(device="cpu", progress=False, allow_mismatch=True,
                                                            resume=True), log=lambda s: None)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])
    assert [h["drawn_Logs"] for h in a["history"]] == [h["drawn_Logs"] for h in b["history"]]


def test_sampling_flags(tmp_path):
    rng = np.random.default_rng(0)
    cache = write_token_cache(tmp_path / "c", {"train": learnable_split(4, rng), "val": learnable_split(2, rng)})
    base = ["train-head", "--cache", cache, "--out", tmp_path / "r", "--phase", "1", "--allow-mismatch"]
    r = run(*base, "--sampling", "rare-class", "--all-seeds")
    assert r.exit_code == 1 and "cannot be combined with --all-seeds" in r.output
    r = run(*base, "--sampling", "rare-class", "--rcs-temperature", "0")
    assert r.exit_code == 1 and "--rcs-temperature must be a finite number > 0" in r.output


# -- copy-paste -------------------------------------------------------------------------------

def scene(seed, h=40, w=60):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.zeros((h, w), np.uint8)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_pasted_pixels_are_the_source_component(flip):
    src_img, src_ids = scene(1)
    src_ids[5:15, 10:30] = 6          # one Logs component, 10 x 20
    src_ids[30:34, 40:44] = 7         # a Rocks component: not chosen, never pasted
    tgt_img, tgt_ids = scene(2, h=25, w=40)
    tgt_ids[:, 15:25] = 255           # ignore: never pasted over (any 20-wide placement in 40 overlaps it)
    cfg = CopyPasteConfig(classes=(6,), scale=(1.0, 1.0), flip_p=flip, sources={6: [1]})
    out_img, out_ids, placed = copy_paste(tgt_img, tgt_ids, 0, "target.png", 3, cfg,
                                          lambda j: (src_img, src_ids))
    assert len(placed) == 1
    p = placed[0]
    assert (p["class"], p["source"], p["component_box"], p["flip"], p["size"]) == (6, 1, (10, 5, 20, 10),
                                                                                    flip == 1.0, (20, 10))
    x0, y0 = p["at"]
    crop = src_img[5:15, 10:30][:, ::-1] if flip else src_img[5:15, 10:30]
    window = (slice(y0, y0 + 10), slice(x0, x0 + 20))
    pasted = tgt_ids[window] != 255
    assert (out_ids[window][pasted] == 6).all()
    np.testing.assert_array_equal(out_img[window][pasted], crop[pasted])
    assert (out_ids[:, 15:25] == 255).all() and np.array_equal(out_img[:, 15:25], tgt_img[:, 15:25])
    assert not pasted.all()  # the placement did cover ignore pixels
    outside = np.ones_like(tgt_ids, bool)
    outside[window] = False
    assert np.array_equal(out_ids[outside], tgt_ids[outside]) and np.array_equal(out_img[outside], tgt_img[outside])
    assert p["pixels"] == int(pasted.sum())
    assert (out_ids != 7).all()
    # deterministic per (image, seed); another seed places differently
    again = copy_paste(tgt_img, tgt_ids, 0, "target.png", 3, cfg, lambda j: (src_img, src_ids))
    assert np.array_equal(again[0], out_img) and again[2] == placed
    assert copy_paste(tgt_img, tgt_ids, 0, "target.png", 4, cfg, lambda j: (src_img, src_ids))[2][0]["at"] != p["at"]


def test_scale_jitter_resizes_the_instance():
    src_img, src_ids = scene(1)
    src_ids[5:15, 10:30] = 6
    cfg = CopyPasteConfig(classes=(6,), scale=(1.5, 1.5), flip_p=0.0, sources={6: [1]})
    _, out_ids, placed = copy_paste(*scene(2), 0, "t.png", 1, cfg, lambda j: (src_img, src_ids))
    assert placed[0]["size"] == (30, 15) and (out_ids == 6).sum() == 30 * 15


def test_copy_paste_extraction_is_recorded_and_byte_identical_across_processes(tmp_path):
    root = write_dataset(tmp_path / "d", {"train": 6, "val": 1})
    args = [*EXTRACT, "--data", root, "--splits", "train,val", "--aug-policy", "phase3", "--copy-paste", "Logs",
            "--aug-seeds", "2"]
    r = run(*args, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    cp = m["augmentation"]["copy_paste"]
    assert cp["classes"] == [6] and cp["class_names"] == ["Logs"] and cp["scale"] == [0.5, 1.5]
    assert cp["flip_p"] == 0.5 and int(cp["sources"]["6"]) >= 1
    # another process with a decoding worker: the same bytes
    cmd = [sys.executable, "-m", "seg", *[str(a) for a in args], "--out", str(tmp_path / "b")]
    cmd[cmd.index("--workers") + 1] = "1"
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.h5"))}  # noqa: E731
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    # pasting put Logs into the cached train samples: more Logs pixels than without it
    r = run(*[a for a in args if a not in ("--copy-paste", "Logs")], "--out", tmp_path / "plain")
    assert r.exit_code == 0, r.output
    logs = lambda d: FeatureCache(d).class_counts("train")[:, 6].sum()  # noqa: E731
    assert logs(tmp_path / "a") > logs(tmp_path / "plain")
    bad = run(*[a if a != "Logs" else "Flowerz" for a in args], "--out", tmp_path / "x")
    assert bad.exit_code == 1 and "--copy-paste: unknown class 'Flowerz'" in bad.output
