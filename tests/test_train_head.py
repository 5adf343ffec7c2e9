"""Stage two: phases end to end, schedules, overfitting, resume, preload vs stream, errors."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg import train_head as th
from seg.train.epochs import EpochRunner
from seg.cache import FeatureCache
from seg.cli import main
from seg.runtime.errors import SegError
from seg.train.presets import PRESETS, resolve
from seg.train.sources import PreloadedSplit, StreamedSplit, batches_of, epoch_indices
from seg.train_head import RunOptions, train
from token_cache import learnable_split, write_token_cache
from interrupt import train_interrupted_at

QUIET = dict(log=lambda s: None)


def opts(**kw):
    return RunOptions(device="cpu", progress=False, allow_mismatch=True, **kw)


@pytest.fixture(scope="module")
def learnable_cache(tmp_path_factory):
    rng = np.random.default_rng(0)
    train_t, train_m = learnable_split(12, rng)
    val_t, val_m = learnable_split(4, rng)
    return write_token_cache(tmp_path_factory.mktemp("tok") / "c", {"train": (train_t, train_m), "val": (val_t, val_m)})


@pytest.mark.parametrize("phase", [1, 2, 3])
def test_each_phase_end_to_end(small_cache, tmp_path, phase):
    cfg = resolve(phase, {"epochs": 2})
    out = tmp_path / f"p{phase}"
    metrics = train(cfg, str(small_cache), str(out), opts(), **QUIET)
    for name in ["best.pt", "last.pt", "config.json", "history.csv", "history.json", "metrics.json",
                 "metrics.txt", "curves.png", "per_class_iou.png"]:
        assert (out / name).is_file(), name
    for key in ["miou", "iou", "dice", "mdice", "acc", "macc", "aacc", "epoch", "class_names"]:
        assert key in metrics
    assert len(metrics["iou"]) == 10 and metrics["class_names"][9] == "Sky"
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in history)
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "train_loss", "val_loss", "val_miou", "lr"] and "iou_Logs" in header
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["phase"] == phase and config["backbone"]["backbone"] == "vits14"
    best = torch.load(out / "best.pt", weights_only=True)
    assert set(best) >= {"head", "config", "class_table", "cache_fingerprint", "backbone", "epoch"}
    if phase == 1:
        assert best["epoch"] == 2  # phase 1 keeps the final weights
        assert config["class_weights"] is None
    else:  # inverse pixel frequency over the train masks, scaled so the largest weight is 5, by hand
        import h5py

        counts = np.zeros(10)
        for shard in sorted(small_cache.glob("train-*.h5")):
            with h5py.File(shard) as f:
                m = f["masks"][()]
            counts += np.bincount(m[m < 10].ravel(), minlength=10)
        inv = np.where(counts > 0, counts.sum() / np.maximum(counts, 1), 0.0)
        expect = np.where(counts > 0, inv / inv.max() * 5.0, 5.0)
        assert config["class_weights"] == pytest.approx(expect.tolist(), rel=1e-5)


def test_schedules_give_the_published_learning_rates():
    p2 = PRESETS[2]
    lrs = [p2.lr * p2.lr_factor(e) for e in range(30)]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1)], lr=5e-4), T_max=30, eta_min=1e-6)
    ref = []
    for _ in range(30):
        ref.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx(ref, rel=1e-9)
    p3 = PRESETS[3]
    lrs3 = [p3.lr * p3.lr_factor(e) for e in range(40)]
    assert lrs3[:4] == pytest.approx([1e-4, 2e-4, 3e-4, 3e-4])
    assert lrs3[3 + 37 // 2] < 3e-4 * 0.55 and lrs3[-1] == pytest.approx(3e-4 * (1 + math.cos(math.pi * 36 / 37)) / 2)
    assert all(a >= b for a, b in zip(lrs3[3:], lrs3[4:]))
    assert all(PRESETS[1].lr_factor(e) == 1.0 for e in range(10))


def test_trainer_applies_the_schedule_per_epoch(learnable_cache, tmp_path):
    cfg = resolve(3, {"epochs": 4, "warmup_epochs": 2})
    train(cfg, str(learnable_cache), str(tmp_path / "r"), opts(), **QUIET)
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    expect = [3e-4 * cfg.lr_factor(e) for e in range(4)]
    assert [h["lr"] for h in history] == pytest.approx(expect)
    assert expect[:2] == pytest.approx([1.5e-4, 3e-4])


def test_head_overfits_a_learnable_task(learnable_cache, tmp_path):
    cfg = resolve(2, {"epochs": 25, "lr": 3e-3, "batch_size": 2, "amp": False})
    metrics = train(cfg, str(learnable_cache), str(tmp_path / "r"), opts(), **QUIET)
    assert metrics["miou"] > 0.9


def test_epoch_draw_is_one_seed_per_image():
    idx = epoch_indices(5, 3, epoch=2, seed=0)
    assert sorted(idx % 5) == [0, 1, 2, 3, 4] and idx.max() < 15
    assert np.array_equal(idx, epoch_indices(5, 3, epoch=2, seed=0))
    assert not np.array_equal(idx, epoch_indices(5, 3, epoch=3, seed=0))
    draws = np.stack([epoch_indices(5, 3, e, 0) for e in range(60)])
    assert set(np.unique(draws // 5)) == {0, 1, 2}  # every cached seed gets used
    assert sorted(epoch_indices(5, 3, 0, 0, all_seeds=True)) == list(range(15))


def test_preloaded_and_streamed_batches_are_identical_every_epoch_from_one_set_of_readers(small_cache):
    split = FeatureCache(small_cache).split("train")
    pre, streamed = PreloadedSplit(split, torch.device("cpu")), StreamedSplit(split, torch.device("cpu"), workers=2)
    pids = None
    # epochs of other draws and lengths, an empty one too (a DDP rank's empty validation slice)
    for epoch, size in [(0, 5), (1, 4), (2, 5), (3, 0), (4, 5)]:
        idx = epoch_indices(len(split.images), len(split.seeds), epoch, 0, all_seeds=True)[:None if size else 0]
        batches = batches_of(idx, size or 1)
        got, want = list(streamed.batches(batches)), list(pre.batches(batches))
        assert len(got) == len(want) == len(batches)
        for (t1, m1), (t2, m2) in zip(want, got):
            assert torch.equal(t1, t2) and torch.equal(m1, m2)
        # the same reader processes serve every epoch (private, but the pids are the point)
        now = [w.pid for w in streamed.loader()._iterator._workers]
        assert pids is None or now == pids
        pids = now
    streamed.close()
    assert streamed._loader is None


def test_streaming_readers_start_under_spawn(small_cache):
    """Python 3.14 starts processes by forkserver on Linux, macOS by spawn: the reader processes
    then get the split by pickling, not by fork."""
    import multiprocessing

    split = FeatureCache(small_cache).split("train")
    batches = batches_of(np.arange(len(split)), 4)
    before = multiprocessing.get_start_method()
    multiprocessing.set_start_method("spawn", force=True)
    try:
        streamed = StreamedSplit(split, torch.device("cpu"), workers=1)
        got = list(streamed.batches(batches))
        streamed.close()
    finally:
        multiprocessing.set_start_method(before, force=True)
    want = list(PreloadedSplit(split, torch.device("cpu")).batches(batches))
    assert len(got) == len(want) and all(torch.equal(a[0], b[0]) for a, b in zip(got, want))


def test_preload_modes_train_identically(learnable_cache, tmp_path):
    cfg = resolve(1, {"epochs": 2})
    train(cfg, str(learnable_cache), str(tmp_path / "a"), opts(preload="always"), **QUIET)
    train(cfg, str(learnable_cache), str(tmp_path / "b"), opts(preload="never", workers=1), **QUIET)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["head"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["head"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_stop_gives_the_same_weights(learnable_cache, tmp_path, monkeypatch):
    cfg = resolve(3, {"epochs": 4})
    train(cfg, str(learnable_cache), str(tmp_path / "full"), opts(), **QUIET)

    train_interrupted_at(monkeypatch, 2, cfg, str(learnable_cache), str(tmp_path / "cut"), opts(), **QUIET)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(SegError, match="holds a seg run already; pass --resume to continue it, --overwrite"):
        train(cfg, str(learnable_cache), str(tmp_path / "cut"), opts(), **QUIET)
    train(cfg, str(learnable_cache), str(tmp_path / "cut"), opts(resume=True), **QUIET)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert cut["epoch"] == 3
    for k in full["head"]:
        assert torch.equal(full["head"][k], cut["head"][k]), k
    assert [h["val_miou"] for h in full["history"]] == [h["val_miou"] for h in cut["history"]]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(learnable_cache, tmp_path, monkeypatch):
    cfg = resolve(1, {"epochs": 3})
    real = EpochRunner.forward_loss

    def poisoned(self, tokens, masks, module=None, n_source=None):
        logits, loss = real(self, tokens, masks, module, n_source)
        if self.model.training and self.sched.last_epoch == 1:
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(EpochRunner, "forward_loss", poisoned)
    with pytest.raises(SegError, match=r"train loss became nan at epoch 2, step 1; stopped\. The last good checkpoint is "
                                       r".*last\.pt \(epoch 1\)"):
        train(cfg, str(learnable_cache), str(tmp_path / "r"), opts(), **QUIET)
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["epoch"] == 0


def test_early_stopping(learnable_cache, tmp_path, monkeypatch):
    cfg = resolve(2, {"epochs": 10, "patience": 2})
    from seg.scoring import metrics

    def flat(cm, names):
        s = metrics.summarize(cm, names)
        s["miou"] = 0.5
        return s

    monkeypatch.setattr(th, "summarize", flat)
    train(cfg, str(learnable_cache), str(tmp_path / "r"), opts(), **QUIET)
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert len(history) == 3  # best at epoch 1, then 2 epochs without gain


def test_cli_mismatch_and_overrides(small_cache, tmp_path):
    r = CliRunner().invoke(main, ["train-head", "--cache", str(small_cache), "--out", str(tmp_path / "r"), "--phase", "3",
                                  "--strict-preset"])
    assert r.exit_code == 1
    assert f"Error: {small_cache}: cache is vits14 @ 224x126, but phase 3 is vitb14_reg @ 644x364" in r.output
    assert "drop --strict-preset" in r.output and not (tmp_path / "r").exists()
    for flags, out in (([], "r"), (["--allow-mismatch", "--strict-preset"], "r2")):  # old scripts' flag still works
        r = CliRunner().invoke(main, ["train-head", "--cache", str(small_cache), "--out", str(tmp_path / out), "--phase",
                                      "3", *flags, "--epochs", "1", "--head", "convnext", "--lr", "0.001",
                                      "--accum", "1", "--device", "cpu", "--patience", "0"])
        assert r.exit_code == 0, r.output
        assert "note: not the published phase 3 configuration (cache is vits14 @ 224x126" in r.output
    assert "effective_batch      2" in r.output and "head                 convnext" in r.output
    assert "best epoch 1 on val:" in r.output and "Sky" in r.output
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert (cfg["head"], cfg["lr"], cfg["accum"], cfg["patience"], cfg["loss"]) == ("convnext", 0.001, 1, None, "focal_dice")
    r = CliRunner().invoke(main, ["train-head", "--cache", str(tmp_path), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "not a feature cache" in r.output


def test_resume_from_a_corrupt_last_checkpoint_is_a_one_line_error(learnable_cache, tmp_path):
    out = tmp_path / "r"
    train(resolve(1, {"epochs": 1}), str(learnable_cache), str(out), opts(), **QUIET)
    (out / "last.pt").write_bytes(b"truncated")
    with pytest.raises(SegError, match=r"last\.pt: unreadable checkpoint; cannot resume"):
        train(resolve(1, {"epochs": 1}), str(learnable_cache), str(out), opts(resume=True), **QUIET)


class _SplitOfShape:
    """Just what choose_preload reads of a split: its manifest shapes and its length."""

    def __init__(self, n: int, token_shape: list, mask_shape: list, int8: bool = False) -> None:
        from seg.cache.quant import QuantSpec

        self.manifest, self.n = {"token_shape": token_shape, "mask_shape": mask_shape}, n
        spec = QuantSpec.for_tokens(token_shape, False)
        self.row_shape, self.row_dtype = ((spec.row_bytes,), np.dtype(np.uint8)) if int8 else \
            (tuple(token_shape), np.dtype(np.float16))

    def __len__(self) -> int:
        return self.n


def test_gpu_readiness_by_construction(small_cache):
    from seg.train.sources import choose_preload

    split = FeatureCache(small_cache).split("train")
    assert StreamedSplit(split, torch.device("cuda"), workers=0).loader().pin_memory
    assert not StreamedSplit(split, torch.device("cpu"), workers=0).loader().pin_memory
    # README: a 6 GB laptop GPU (about 5.8 GB free) preloads about 1,400 vitb14_reg @ 644x364 samples
    # of 26x46x768 float16 tokens + a 364x644 uint8 mask (2,071,472 bytes) on its own (auto: half the free memory)
    vitb = ([1, 768, 26, 46], [364, 644])
    assert (26 * 46 * 768 * 2 + 364 * 644) == 2_071_472
    cuda = torch.device("cuda")
    assert choose_preload("auto", [_SplitOfShape(1399, *vitb)], cuda, free=int(5.8e9))[0]
    assert not choose_preload("auto", [_SplitOfShape(1400, *vitb)], cuda, free=int(5.8e9))[0]
    assert "streaming" in choose_preload("auto", [_SplitOfShape(2857 + 317, *vitb)], cuda, free=int(5.8e9))[1]
    # int8 tokens stay 8-bit in a preload (918,528 value bytes + 28,704 float16 scales + the mask =
    # 1,210,352 bytes): about 2,400 samples fit where 1,400 did
    assert (26 * 46 * 768 + 26 * 46 * 24 * 2 + 364 * 644) == 1_210_352
    assert choose_preload("auto", [_SplitOfShape(2395, *vitb, int8=True)], cuda, free=int(5.8e9))[0]
    assert not choose_preload("auto", [_SplitOfShape(2396, *vitb, int8=True)], cuda, free=int(5.8e9))[0]


def test_the_preload_estimate_counts_what_training_the_head_needs(learnable_cache, tmp_path):
    from seg.train.sources import choose_preload, gradient_bytes, optimizer_state_bytes

    lin = torch.nn.Linear(10, 4)  # 44 float32 parameters = 176 bytes
    assert gradient_bytes(lin) == 176
    assert optimizer_state_bytes(lin, torch.optim.AdamW(lin.parameters())) == 352  # two moments
    assert optimizer_state_bytes(lin, torch.optim.SGD(lin.parameters(), lr=1, momentum=0.9)) == 176
    assert optimizer_state_bytes(lin, torch.optim.SGD(lin.parameters(), lr=1)) == 0
    vitb = ([1, 768, 26, 46], [364, 644])
    cuda = torch.device("cuda")
    data = _SplitOfShape(1000, *vitb)  # 2.07 GB: under half of 5.8 GB
    ok, why = choose_preload("auto", [data], cuda, free=int(5.8e9), training=int(3.0e9), training_how="measured")
    assert ok and "2.07 GB of data + 3.00 GB to train the head (measured), 5.8 GB free" in why
    ok, why = choose_preload("auto", [data], cuda, free=int(5.8e9), training=int(3.2e9), training_how="measured")
    assert not ok and "2.07 GB of data + 3.20 GB to train the head (measured) > 90 % of 5.8 GB free" in why
    lines = []
    train(resolve(2, {"epochs": 1}), str(learnable_cache), str(tmp_path / "r"),
          RunOptions(device="cpu", progress=False, allow_mismatch=True), log=lines.append)
    assert any("to train the head (optimizer state and gradients)" in line for line in lines), lines
