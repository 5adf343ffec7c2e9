"""A teacher's flip TTA from the cache: `extract --flip-views` caches each view of an unlabeled split
mirrored (the same draw, flipped left-right) as split NAME-flip, and `seg pseudo-label` averages the
view's softmax with its mirror's flipped back, as `seg eval --tta flip` does from images."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg.adapt.pseudo_label import PseudoOptions, pseudo_label, split_predictions
from seg.cache import FeatureCache
from seg.cache import format as cf
from seg.cli import main
from seg.data.augment import Augmenter
from seg.data.decode import MaskDecoder
from seg.data.classes import default_class_table
from seg.data.unlabeled import flipped_twin, unlabeled_split
from seg.extract_features import ExtractConfig, extract
from seg.extraction.samples import ExtractionSamples
from seg.heads import head_logits
from seg.infer.runs import load_run
from seg.runtime.errors import SegError
from seg.train.presets import resolve
from seg.train.sources import read_batch
from seg.train_head import RunOptions, train

QUIET = dict(log=lambda s: None)
TINY = dict(backbone="vits14", size="112x56", random_init=True, aug_policy="phase3", aug_seeds=1, batch_size=4,
            shard_size=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def flipped(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("flip") / "cache"
    folder = dataset / "Offroad_Segmentation_testImages" / "Color_Images"
    extract(ExtractConfig(data=str(dataset), out=str(out), unlabeled=(f"target={folder}",), flip_views=True, **TINY),
            **QUIET)
    run = out.parent / "run"
    train(resolve(1, {"epochs": 1}), str(out), str(run), RunOptions(device="cpu", progress=False), **QUIET)
    return out, run, folder


def test_the_twin_holds_each_view_flipped_left_right(dataset):
    files = unlabeled_split(f"target={dataset / 'Offroad_Segmentation_testImages' / 'Color_Images'}")
    twin = flipped_twin(files)
    assert (twin.split, twin.flip_of, twin.names) == ("target-flip", "target", files.names)
    augmenter = Augmenter("phase3", (56, 112))
    decoder = MaskDecoder.of(default_class_table())
    views, mirrors = (ExtractionSamples(f, [0, 1], augmenter, decoder) for f in (files, twin))
    for k in range(len(views)):
        a, b = views[k]["image"].numpy(), mirrors[k]["image"].numpy()
        assert np.array_equal(a[:, ::-1], b) and not np.array_equal(a, b)   # the same draw (seed 1 too), mirrored


def test_the_twin_is_a_split_of_the_cache_and_a_false_one_is_refused(flipped):
    out, _, _ = flipped
    m = json.loads((out / "manifest.json").read_text())
    t, f = m["splits"]["target"], m["splits"]["target-flip"]
    assert f["flip_of"] == "target" and (f["images"], f["seeds"]) == (t["images"], t["seeds"]) == (t["images"], [0, 1])
    assert cf.flip_twin(m, "target") == "target-flip" and cf.flip_twin(m, "val") is None
    assert "views of 'target' flipped left-right" in CliRunner().invoke(main, ["cache", "info", str(out)]).output
    f["seeds"] = [0]
    assert any("flip_of names 'target'" in p for p in cf.manifest_problems(m))


def test_pseudo_labels_average_the_view_and_its_mirror_flipped_back(flipped, tmp_path):
    out, run_dir, _ = flipped
    cache = FeatureCache(out)
    run = load_run(run_dir, torch.device("cpu"))
    split, twin = cache.split("target"), cache.split("target-flip")
    rows = np.arange(len(split))
    h, w = split.manifest["mask_shape"]
    view = head_logits(run.head, read_batch(split, rows, torch.device("cpu"))[0], (h, w), None, run.grid).softmax(1)
    mirror = head_logits(run.head, read_batch(twin, rows, torch.device("cpu"))[0], (h, w), None, run.grid).softmax(1)
    (_, logits, _), = split_predictions(run, split, torch.device("cpu"), 8, twin=twin)
    assert torch.allclose(logits.softmax(1), (view + mirror.flip(-1)) / 2, atol=1e-5)
    assert not torch.allclose(logits.softmax(1), view, atol=1e-3)   # the mirror changes something
    auto = pseudo_label(PseudoOptions(run=str(run_dir), cache=str(out), split="target", out=str(tmp_path / "a"),
                                      device="cpu", progress=False), **QUIET)
    plain = pseudo_label(PseudoOptions(run=str(run_dir), cache=str(out), split="target", out=str(tmp_path / "n"),
                                       device="cpu", progress=False, tta="none"), **QUIET)
    assert auto["method"]["tta"].startswith("flip") and "tta_split_fingerprint" in auto and plain["method"]["tta"] == "none"
    assert auto["thresholds"] != plain["thresholds"]


def test_flip_tta_without_the_mirrored_views_is_refused(flipped, phase3_run, small_cache, tmp_path):
    with pytest.raises(SegError, match="--tta flip needs the mirrored views of 'val'"):
        pseudo_label(PseudoOptions(run=str(phase3_run), cache=str(small_cache), split="val", out=str(tmp_path / "p"),
                                   device="cpu", progress=False, tta="flip"), **QUIET)
    with pytest.raises(SegError, match="--flip-views applies to --unlabeled splits"):
        extract(ExtractConfig(data=str(tmp_path), out=str(tmp_path / "c"), flip_views=True, **TINY), **QUIET)


def test_cache_info_shows_a_pseudo_label_folder(flipped, tmp_path):
    out, run_dir, _ = flipped
    pseudo_label(PseudoOptions(run=str(run_dir), cache=str(out), split="target", out=str(tmp_path / "p"), device="cpu",
                               progress=False), **QUIET)
    r = CliRunner().invoke(main, ["cache", "info", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "split 'target'" in r.output and f"teacher      {run_dir.resolve()}" in r.output
    assert "TTA flip (mean softmax with the mirrored views of 'target-flip')" in r.output
    assert "threshold" in r.output and "Landscape" in r.output and "coverage" in r.output
    masks = tmp_path / "p" / "masks.npy"
    masks.write_bytes(masks.read_bytes()[:-1] + b"\x07")
    r = CliRunner().invoke(main, ["cache", "info", str(tmp_path / "p")])
    assert r.exit_code != 0 and "changed since `seg pseudo-label` wrote it" in r.output


def test_adapt_rounds_label_and_measure_under_flip_tta(flipped, tmp_path):
    """With the twin cached, a round's teacher labels with flip TTA and its student's target shares
    (the shift sign's input) are measured the same way."""
    from seg.adapt.guard import GuardSettings
    from seg.adapt.record import measure
    from seg.adapt.rounds import AdaptOptions, adapt
    from seg.cache.pseudo import read_pseudo

    out, run_dir, _ = flipped
    off = GuardSettings(collapse_fraction=0.0, swallow_share=1.0, val_drop=1e9, shift_factor=1e9)
    state = adapt(AdaptOptions(run=str(run_dir), cache=str(out), target="target", out=str(tmp_path / "a"), rounds=1,
                               student={"epochs": 1}, guard=off, run_options=RunOptions(device="cpu"), progress=False),
                  **QUIET)
    (r1,) = state["rounds"]
    assert read_pseudo(tmp_path / "a" / "round-1" / "pseudo")["method"]["tta"].startswith("flip")
    cache, cpu = FeatureCache(out), torch.device("cpu")
    assert r1["student_shares"] == measure(r1["student"], cache, "target", cpu, "target-flip")["shares"]
    assert r1["student_shares"] != measure(r1["student"], cache, "target", cpu)["shares"]
