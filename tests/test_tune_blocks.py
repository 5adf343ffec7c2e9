"""Tap caches and --tune-blocks: the last blocks trained from the cached stream compute exactly what
the full model with a frozen prefix computes; runs resume exactly and evaluate from images."""

import copy
import json

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg.backbones import load_backbone
from seg.cache import FeatureCache, verify
from seg.cli import main
from seg.runtime.errors import SegError
from seg.extract_features import ExtractConfig, extract
from seg.heads.resize import resize_bilinear
from seg.train.presets import resolve
from seg.train_head import RunOptions, Trainer, train
from interrupt import train_interrupted_at

pytestmark = pytest.mark.slow  # not in the quick lane (README: Development)

QUIET = dict(log=lambda s: None)
TAP = {"vits14_reg": ("224x126", 10), "dinov3_vits16": ("224x128", 9)}  # (size, tap block) of 12 blocks
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def opts(**kw):
    return RunOptions(device="cpu", progress=False, allow_mismatch=True, **kw)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def make_tap_cache(dataset, out, backbone="vits14_reg", half=False, **kw):
    size, tap = TAP[backbone]
    extract(ExtractConfig(data=str(dataset), out=str(out), backbone=backbone, size=size, random_init=True,
                          tap_block=kw.pop("tap_block", tap), batch_size=4, shard_size=4, workers=0,
                          half=half, progress=False, **kw), **QUIET)
    return out


@pytest.fixture(scope="module", params=sorted(TAP))
def tap_cache(request, dataset, tmp_path_factory):
    return request.param, make_tap_cache(dataset, tmp_path_factory.mktemp("tap") / "c", request.param)


def reference_images(dataset, names, size):
    """The samples' images resized and normalised the way the manifest says (cv2 bilinear, ImageNet)."""
    w, h = size
    out = []
    for name in names:
        bgr = cv2.imread(str(dataset / "Offroad_Segmentation_Training_Dataset" / "train" / "Color_Images" / name))
        rgb = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (w, h), interpolation=cv2.INTER_LINEAR)
        out.append(rgb)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0  # float32 steps, as on the device
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_tap_cache_holds_the_stream_entering_the_block(tap_cache, dataset):
    backbone, path = tap_cache
    cache = FeatureCache(path)
    m = cache.manifest
    size, tap = TAP[backbone]
    w, h = (int(v) for v in size.split("x"))
    grid = (h // m["patch_size"]) * (w // m["patch_size"])
    assert m["format_version"] == 4 and m["tap_block"] == tap and m["layer_norm"] is False
    assert m["token_shape"] == [1 + 4 + grid, 384]  # cls, 4 registers, patches
    split = cache.split("train")
    tokens, _ = split.read_rows(np.arange(len(split)))
    # Independently: the full model's own forward on the first extraction batch (same shapes, so the
    # same float32 arithmetic), the stream captured where it enters the block, stored as float16.
    model, _ = load_backbone(backbone, random_init=True, seed=0)
    seen = []
    model.blocks[tap].register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    with torch.no_grad():
        model.forward_features(reference_images(dataset, split.images[:4], (w, h)))
    expected = seen[0].half().numpy()
    assert tokens.dtype == np.float16 and tokens[:4].shape == expected.shape
    assert np.array_equal(tokens[:4], expected)
    largest = max(sh["max_abs"] for sh in m["splits"]["train"]["shards"])
    assert largest == float(np.abs(tokens).max()) > 0  # the range report is the data's true maximum
    assert verify(path) == []


def _reference(backbone, tap, trainer):
    """The full model with blocks < tap frozen (prefix output rounded to float16, as the cache stores
    it) and a copy of the trainer's initial head; its optimizer built from the spec: AdamW, head at
    lr, every tuned parameter at lr / 10."""
    full, _ = load_backbone(backbone, random_init=True, seed=0)
    full.requires_grad_(False)
    tuned = [p for blk in full.blocks[tap:] for p in blk.parameters()] + list(full.norm.parameters())
    for p in tuned:
        p.requires_grad_(True)
    full.blocks[tap].register_forward_pre_hook(lambda mod, args: (args[0].half().float(),) + args[1:])
    head = copy.deepcopy(trainer.head.head)
    cfg = trainer.cfg
    opt = torch.optim.AdamW([{"params": list(head.parameters()), "lr": cfg.lr},
                             {"params": tuned, "lr": cfg.lr / 10}], weight_decay=cfg.weight_decay)
    return full, head, tuned, opt


def _grads(params):
    return [p.grad.clone() for p in params]


def close(a, b):
    """rtol 1e-4, with an absolute floor of 1e-5 of the tensor's largest value for elements near zero
    (float32 sums in another order, and Adam steps on gradients near its eps, differ there by ~1e-9)."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_tuned_blocks_from_the_cache_equal_the_full_model_with_a_frozen_prefix(tap_cache, dataset, tmp_path):
    backbone, path = tap_cache
    size, tap = TAP[backbone]
    w, h = (int(v) for v in size.split("x"))
    cfg = resolve(3, {"tune_blocks": 12 - tap, "amp": False, "lr": 1e-3, "schedule": "none"})
    trainer = Trainer(cfg, str(path), str(tmp_path / "r"), opts(), **QUIET)
    trainer._build()
    split = trainer.train_split
    rows = np.arange(4)  # the first extraction batch: the reference computes the prefix in the same shapes
    tokens, masks = (torch.from_numpy(a) for a in split.read_rows(rows))
    x = reference_images(dataset, [split.sample_info(int(k))[0] for k in rows], (w, h))
    full, ref_head, ref_tuned, ref_opt = _reference(backbone, tap, trainer)
    mine = [p for blk in trainer.head.tail.blocks for p in blk.parameters()] + list(trainer.head.tail.norm.parameters())
    assert len(mine) == len(ref_tuned)

    def ref_loss():
        feats = full.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]
        logits = resize_bilinear(ref_head(feats), (h, w))  # equals F.interpolate (test_losses.py)
        return trainer.criterion(logits, masks)

    for step in range(4):  # compare, then step both; after 3 steps compare once more
        trainer.opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        _, loss = trainer.epochs.forward_loss(tokens, masks)
        expected = ref_loss()
        loss.backward()
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
        for a, b in zip(_grads(mine), _grads(ref_tuned)):
            close(a, b)
        for a, b in zip(_grads(trainer.head.head.parameters()), _grads(ref_head.parameters())):
            close(a, b)
        if step < 3:
            trainer.opt.step()
            ref_opt.step()
    for a, b in zip(list(mine) + list(trainer.head.head.parameters()), ref_tuned + list(ref_head.parameters())):
        close(a.detach(), b.detach())
    moved = sum(float((a.detach() - b).abs().max()) for a, b in zip(mine, load_backbone(
        backbone, random_init=True, seed=0)[0].blocks[tap].parameters()))
    assert moved > 0  # the blocks did train


def test_checkpointing_and_layer_decay(tap_cache, tmp_path):
    backbone, path = tap_cache
    k = 12 - TAP[backbone][1]
    cfg = resolve(3, {"tune_blocks": k, "amp": False, "backbone_lr": 2e-5, "layer_decay": 0.5, "schedule": "none"})
    plain = Trainer(cfg, str(path), str(tmp_path / "a"), opts(), **QUIET)
    ckpt = Trainer(cfg, str(path), str(tmp_path / "b"), opts(checkpointing=True), **QUIET)
    grads, calls = [], []
    for t in (plain, ckpt):
        t._build()
        tokens, masks = (torch.from_numpy(a) for a in t.train_split.read_rows(np.array([0, 1])))
        t.head.train()
        runs, block = [], t.head.tail.blocks[0]
        real = block.forward  # forward hooks do not fire on checkpoint's recompute; a wrapper does
        block.forward = lambda *a, real=real: runs.append(1) or real(*a)
        t.epochs.forward_loss(tokens, masks)[1].backward()
        grads.append([p.grad for p in t.head.tail.parameters()])
        calls.append(len(runs))
    assert calls == [1, 2]  # checkpointing recomputes each block in backward ...
    for a, b in zip(*grads):  # ... and changes nothing else
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # head, then block i of k at 2e-5 x 0.5^(k-1-i), then the final norm
    assert [g["lr"] for g in plain.opt.param_groups] == [cfg.lr, *(2e-5 * 0.5 ** (k - 1 - i) for i in range(k)), 2e-5]


def test_tuned_run_end_to_end_resumes_exactly_and_scores_images_like_the_cache(dataset, tmp_path, monkeypatch):
    cache = make_tap_cache(dataset, tmp_path / "c", splits=("train", "val"))
    cfg = resolve(3, {"tune_blocks": 2, "epochs": 3, "lr": 1e-3, "batch_size": 2, "accum": 1})
    train(cfg, str(cache), str(tmp_path / "full"), opts(), **QUIET)
    train_interrupted_at(monkeypatch, 1, cfg, str(cache), str(tmp_path / "cut"), opts(), **QUIET)
    train(cfg, str(cache), str(tmp_path / "cut"), opts(resume=True), **QUIET)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert any(k.startswith("tail.blocks.1.") for k in full["head"])
    for k in full["head"]:
        assert torch.equal(full["head"][k], cut["head"][k]), k
    # best.pt holds tuned blocks: they differ from the backbone's own
    best = torch.load(tmp_path / "full" / "best.pt", weights_only=True)
    original = load_backbone("vits14_reg", random_init=True, seed=0)[0].blocks[11].state_dict()
    assert not torch.equal(best["head"]["tail.blocks.1.mlp.fc1.weight"], original["mlp.fc1.weight"])
    r1 = invoke("eval", "--run", tmp_path / "full", "--cache", cache, "--out", tmp_path / "ec")
    r2 = invoke("eval", "--run", tmp_path / "full", "--data", dataset, "--out", tmp_path / "ei", "--workers", "0")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("ec", "ei"))
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["miou"] == b["miou"]
    r3 = invoke("predict", "--run", tmp_path / "full", "--out", tmp_path / "p", "--workers", "0", "--tta", "flip",
                "--images", dataset / "Offroad_Segmentation_Training_Dataset" / "val" / "Color_Images")
    assert r3.exit_code == 0, r3.output
    assert len(list((tmp_path / "p" / "color").iterdir())) == 3


def test_tuning_errors_are_one_line(dataset, small_cache, tmp_path):
    cache = make_tap_cache(dataset, tmp_path / "c", splits=("train", "val"))
    r = invoke("train-head", "--cache", small_cache, "--out", tmp_path / "r1", "--tune-blocks", "2", "--allow-mismatch")
    assert r.exit_code == 1 and "needs a tap cache of the stream entering block 10: extract with " \
        "`seg extract --tap-block 10`" in r.output
    r = invoke("train-head", "--cache", cache, "--out", tmp_path / "r2", "--allow-mismatch")
    assert r.exit_code == 1 and "holds the stream entering block 10 of 12" in r.output and "--tune-blocks 2" in r.output
    r = invoke("train-head", "--cache", cache, "--out", tmp_path / "r3", "--tune-blocks", "3", "--allow-mismatch")
    assert r.exit_code == 1 and "pass --tune-blocks 2 (not 3)" in r.output
    r = invoke("train-head", "--cache", cache, "--out", tmp_path / "r4", "--backbone-lr", "1e-5", "--allow-mismatch")
    assert r.exit_code == 1 and "add --tune-blocks" in r.output
    r = invoke("extract", "--data", dataset, "--out", tmp_path / "x", "--backbone", "vits14", "--size", "224x126",
               "--random-init", "--tap-block", "12")
    assert r.exit_code == 1 and "--tap-block must be a block of vits14, 0..11" in r.output
    for r in (r,):
        assert "Traceback" not in r.output


def test_tuning_needs_the_recorded_weights_file(dataset, tmp_path):
    model, _ = load_backbone("vits14", random_init=True, seed=5)
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    cache = tmp_path / "c"
    r = invoke("extract", "--data", dataset, "--out", cache, "--backbone", "vits14", "--size", "224x126",
               "--weights", weights, "--tap-block", "11", "--workers", "0", "--splits", "train,val")
    assert r.exit_code == 0, r.output
    weights.rename(tmp_path / "moved.pth")
    args = ["train-head", "--cache", cache, "--tune-blocks", "1", "--epochs", "1", "--allow-mismatch"]
    r = invoke(*args, "--out", tmp_path / "r1")
    assert r.exit_code == 1 and f"weights the features were computed with are not at {weights}" in r.output
    other, _ = load_backbone("vits14", random_init=True, seed=6)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    r = invoke(*args, "--out", tmp_path / "r2", "--weights", tmp_path / "other.pth")
    assert r.exit_code == 1 and "sha256 differs" in r.output
    r = invoke(*args, "--out", tmp_path / "r3", "--weights", tmp_path / "moved.pth")
    assert r.exit_code == 0, r.output


def test_a_stream_beyond_float16_is_refused(dataset, tmp_path):
    model, _ = load_backbone("vits14", random_init=True, seed=0)
    state = model.state_dict()
    state["pos_embed"] = state["pos_embed"] * 1e7  # |values| ~ 1e5 entering block 0
    torch.save(state, tmp_path / "w.pth")
    r = invoke("extract", "--data", dataset, "--out", tmp_path / "c", "--backbone", "vits14", "--size", "224x126",
               "--weights", tmp_path / "w.pth", "--tap-block", "0", "--workers", "0", "--fp32")
    assert r.exit_code == 1 and "values beyond the float16 range" in r.output and "Traceback" not in r.output


def test_manifest_version_and_tap_must_agree(dataset, tmp_path):
    cache = make_tap_cache(dataset, tmp_path / "c", splits=("val",))
    m = json.loads((cache / "manifest.json").read_text())
    m["format_version"] = 3
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SegError, match="format version 3 with tap_block 10"):
        FeatureCache(cache)
