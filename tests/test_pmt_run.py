"""A PMT run end to end on a fresh 4-layer cache: trained, resumed, evaluated from the cache and from
images, predicted and exported, with PMT's schedule, annealing and clipping where the run put them."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from interrupt import train_interrupted_at
from seg.cli import main
from seg.extract_features import ExtractConfig, extract
from seg.train.presets import resolve
from seg.train_head import RunOptions, train
from test_pmt_training import official_lr, official_mask_annealing

pytestmark = pytest.mark.slow
TINY = {"head": "pmt", "queries": 10, "decoder_blocks": 2, "mask_points": 500, "batch_size": 2, "epochs": 3}
TINY_FLAGS = ["--head", "pmt", "--queries", "10", "--decoder-blocks", "2", "--mask-points", "500", "--batch-size", "2"]
QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def levels_cache(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("pmtcache") / "c"
    extract(ExtractConfig(data=str(dataset), out=str(out), backbone="vits14_reg", size="224x126", layers="2,5,8,11",
                          random_init=True, aug_policy="phase3", aug_seeds=2, splits=("train", "val"), batch_size=4,
                          shard_size=4, workers=0, progress=False), **QUIET)
    return out


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_a_pmt_run_trains_evaluates_predicts_and_exports(levels_cache, dataset, tmp_path):
    run = tmp_path / "run"
    code, out = cli("train-head", "--cache", levels_cache, "--out", run, *TINY_FLAGS, "--epochs", "2", "--no-progress")
    assert code == 0, out
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["head"], config["loss"], config["queries"]) == ("pmt", "mask_classification", 10)
    # the head reads the same levels from the cache and from the images (prefix tokens first, patches row-major)
    code, out = cli("eval", "--run", run, "--cache", levels_cache, "--split", "val", "--no-progress")
    assert code == 0, out
    code, out = cli("eval", "--run", run, "--data", dataset, "--split", "val", "--no-progress")
    assert code == 0, out
    from_cache = json.loads((run / "eval-val" / "eval.json").read_text())
    from_images = json.loads((run / "eval-val-images" / "eval.json").read_text())
    assert from_cache["confusion_matrix"] == from_images["confusion_matrix"]
    code, out = cli("eval", "--run", run, "--data", dataset, "--split", "val", "--mode", "slide", "--tta", "flip",
                    "--no-progress")
    assert code == 0, out
    images = dataset / "Offroad_Segmentation_testImages" / "Color_Images"
    code, out = cli("predict", "--run", run, "--images", images, "--out", tmp_path / "pred", "--no-progress")
    assert code == 0, out
    assert len(list((tmp_path / "pred" / "color").iterdir())) == 2
    code, out = cli("export", "--run", run, "--out", tmp_path / "exp" / "m.onnx")
    assert code == 0, out
    parity = json.loads((tmp_path / "exp" / "m.parity.json").read_text())
    assert parity["accepted"] and parity["head"] == "pmt" and (tmp_path / "exp" / "m.onnx").stat().st_size > 0


def test_schedule_annealing_and_clipping_move_per_step_and_resume_exactly(levels_cache, tmp_path, monkeypatch):
    cfg = resolve(3, TINY)
    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        out = real_clip(params, max_norm, *a, **kw)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
        clipped.append((max_norm, after.item()))
        return out

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    opts = dict(device="cpu", progress=False, preload="never")
    train(cfg, str(levels_cache), str(tmp_path / "full"), RunOptions(**opts), **QUIET)
    per_epoch, total = 3, 9  # 6 train images, batch 2
    assert len(clipped) == total and all(m == 0.01 and n <= 0.01 * (1 + 1e-4) for m, n in clipped)

    train_interrupted_at(monkeypatch, 1, cfg, str(levels_cache), str(tmp_path / "cut"), RunOptions(**opts), **QUIET)
    first = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    warmup = round(cfg.warmup_fraction * total)
    assert first["optimizer"]["param_groups"][0]["lr"] == pytest.approx(official_lr(2e-4, per_epoch, warmup, total))
    # two blocks take PMT's first and last windows, scaled to 9 steps
    windows = [(0, 3000), (13461, 16826)]
    expect = [official_mask_annealing(s * total / 20224, per_epoch, e * total / 20224).item() for s, e in windows]
    assert first["head"]["decoder.attn_mask_probs"].tolist() == pytest.approx(expect)
    assert expect[0] == 0.0 and 0 < expect[1] <= 1

    train(cfg, str(levels_cache), str(tmp_path / "cut"), RunOptions(resume=True, **opts), **QUIET)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k in full["head"]:
        assert torch.equal(full["head"][k], cut["head"][k]), k
    assert [h["val_loss"] for h in full["history"]] == [h["val_loss"] for h in cut["history"]]
    assert full["head"]["decoder.attn_mask_probs"].tolist() == [0.0, 0.0]
    assert full["optimizer"]["param_groups"][0]["lr"] == pytest.approx(official_lr(2e-4, total, warmup, total))
    assert math.isfinite(full["history"][-1]["train_loss"])


def test_preloaded_and_streamed_levels_train_alike(levels_cache, tmp_path):
    cfg = resolve(3, {**TINY, "epochs": 1})
    for mode in ("always", "never"):
        train(cfg, str(levels_cache), str(tmp_path / mode), RunOptions(device="cpu", progress=False, preload=mode), **QUIET)
    a = torch.load(tmp_path / "always" / "best.pt", weights_only=True)["head"]
    b = torch.load(tmp_path / "never" / "best.pt", weights_only=True)["head"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pmt_on_a_cache_of_other_layers_is_one_line(small_cache, tmp_path):
    code, out = cli("train-head", "--cache", small_cache, "--out", tmp_path / "r", "--head", "pmt", "--no-progress")
    assert code == 1
    assert "the pmt head reads blocks 2,5,8,11 of vits14" in out and "extract with --layers 2,5,8,11" in out
    assert "Traceback" not in out and not (tmp_path / "r").exists()
