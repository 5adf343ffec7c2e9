"""Self-training from the cache, end to end on the synthetic desert: an unlabeled split added to a
cache without touching its other splits, pseudo-labels that line up with the cached views they were
predicted on, students trained on source + target, the guard stopping a teacher that is wrong about a
whole class, refusals, and a resume after a kill."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg.adapt.guard import GuardSettings
from seg.adapt.pseudo_label import PseudoOptions, pseudo_label
from seg.adapt.rounds import AdaptOptions, adapt
from seg.cache import FeatureCache
from seg.cli import main
from seg.extract_features import ExtractConfig, extract
from seg.runtime.errors import SegError
from seg.train.presets import resolve
from seg.train_head import RunOptions, train

pytestmark = pytest.mark.slow
QUIET = dict(log=lambda s: None)
SETTINGS = dict(backbone="vits14", size="224x126", random_init=True, aug_policy="phase3", aug_seeds=2,
                batch_size=4, shard_size=4, workers=0, progress=False)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def adapted_cache(tmp_path_factory, dataset):
    """A train/val cache of the synthetic desert, then its test images added as an unlabeled split."""
    root = tmp_path_factory.mktemp("adapt")
    out = root / "cache"
    extract(ExtractConfig(data=str(dataset), out=str(out), **SETTINGS), **QUIET)
    before = {p.name: sha(p) for p in out.glob("*.h5")}
    folder = dataset / "Offroad_Segmentation_testImages" / "Color_Images"
    extract(ExtractConfig(data=str(dataset), out=str(out), unlabeled=(f"target={folder}",), **SETTINGS), **QUIET)
    return out, before, folder


@pytest.fixture(scope="module")
def teacher(adapted_cache, tmp_path_factory):
    """A head trained long enough on the train views to fit them (random features: it overfits)."""
    out = tmp_path_factory.mktemp("teacher") / "t"
    train(resolve(2, {"epochs": 12, "lr": 2e-3, "all_seeds": True}), str(adapted_cache[0]), str(out),
          RunOptions(device="cpu", progress=False), **QUIET)
    return out


def adapt_killed_in_second_epoch(opts, monkeypatch) -> None:
    """Runs adapt(opts) and kills it (KeyboardInterrupt) as the second epoch it trains begins."""
    from seg.train.epochs import EpochRunner

    real, calls = EpochRunner.train_epoch, []

    def killed(self, source, epoch, target=None):
        calls.append(epoch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, source, epoch, target)

    monkeypatch.setattr(EpochRunner, "train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        adapt(opts, **QUIET)
    monkeypatch.setattr(EpochRunner, "train_epoch", real)


def test_an_unlabeled_split_is_added_and_the_others_stay_byte_for_byte(adapted_cache):
    out, before, folder = adapted_cache
    assert {n: sha(out / n) for n in before} == before
    m = json.loads((out / "manifest.json").read_text())
    s = m["splits"]["target"]
    assert (s["labels"], s["seeds"], len(s["images"])) == ("none", [0, 1, 2], 2)
    split = FeatureCache(out).split("target")
    _, masks = split.read_rows(np.arange(len(split)))
    assert (masks == 255).all()  # nothing to learn from until a teacher labels it
    r = CliRunner().invoke(main, ["cache", "info", str(out)])
    assert "UNLABELED" in r.output
    r = CliRunner().invoke(main, ["cache", "verify", str(out), "--sources"])
    assert r.exit_code == 0, r.output


def test_a_second_unlabeled_split_keeps_the_first_and_a_run_not_naming_train_keeps_it(adapted_cache, dataset, tmp_path):
    out, before, folder = adapted_cache
    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    kept = {p.name: sha(p) for p in copy.glob("*.h5")}
    extract(ExtractConfig(data=str(dataset), out=str(copy), **{**SETTINGS, "splits": ()},
                          unlabeled=(f"second={folder}",)), **QUIET)
    m = json.loads((copy / "manifest.json").read_text())
    assert list(m["splits"]) == ["train", "val", "target", "second"] and m["complete"]
    assert {n: sha(copy / n) for n in kept} == kept
    assert m["splits"]["target"] == json.loads((out / "manifest.json").read_text())["splits"]["target"]


def test_labels_needing_commands_refuse_an_unlabeled_split(adapted_cache, teacher, tmp_path):
    out, _, folder = adapted_cache
    r = CliRunner().invoke(main, ["eval", "--run", str(teacher), "--cache", str(out), "--split", "target"])
    assert r.exit_code == 1 and "the target split is unlabeled" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["extract", "--data", str(folder), "--out", str(tmp_path / "c"), "--unlabeled",
                                  f"val={folder}", "--random-init", "--splits", "none"])
    assert r.exit_code == 1 and "not train, val, test" in r.output


def test_pseudo_labels_line_up_with_the_views_they_were_predicted_on(adapted_cache, teacher, tmp_path):
    """Labelling the (labelled) train split: the teacher fits its views, so each pseudo-mask agrees
    with its own view's true mask far more than with another view's of the same image."""
    out, _, _ = adapted_cache
    record = pseudo_label(PseudoOptions(run=str(teacher), cache=str(out), split="train", out=str(tmp_path / "p"),
                                        portion=0.8, stride=1, device="cpu", progress=False), **QUIET)
    split = FeatureCache(out).split("train")
    _, truth = split.read_rows(np.arange(len(split)))
    pseudo = np.load(tmp_path / "p" / "masks.npy")
    n = len(split.images)

    def agreement(a, b):
        kept = (a != 255) & (b != 255)
        return (a[kept] == b[kept]).mean()

    aligned = np.mean([agreement(pseudo[k], truth[k]) for k in range(len(split))])
    other_view = np.mean([agreement(pseudo[k], truth[(k + n) % len(split)]) for k in range(len(split))])
    other_image = np.mean([agreement(pseudo[k], truth[k // n * n + (k + 1) % n]) for k in range(len(split))])
    # measured: aligned 0.69, the same image's other augmented view 0.49
    assert aligned > 0.6 and aligned > max(other_view, other_image) + 0.1, (aligned, other_view, other_image)
    assert record["kept_label_accuracy"] == pytest.approx(
        sum(((pseudo[k] == truth[k]) & (pseudo[k] != 255) & (truth[k] != 255)).sum() for k in range(len(split)))
        / sum(((pseudo[k] != 255) & (truth[k] != 255)).sum() for k in range(len(split))))
    assert 0 < record["coverage"] < 1 and len(record["thresholds"]) == 10


def test_students_train_on_source_and_target(adapted_cache, teacher, tmp_path, monkeypatch):
    out, _, _ = adapted_cache
    pseudo_label(PseudoOptions(run=str(teacher), cache=str(out), split="target", out=str(tmp_path / "p"),
                               device="cpu", progress=False), **QUIET)
    from seg.train.epochs import EpochRunner

    seen, real = [], EpochRunner.forward_loss

    def spy(self, tokens, masks, module=None, n_source=None):
        if self.model.training:
            seen.append((len(tokens), n_source, int((masks[n_source:] != 255).sum()) if n_source else 0))
        return real(self, tokens, masks, module, n_source)

    monkeypatch.setattr(EpochRunner, "forward_loss", spy)
    cfg = resolve(2, {"epochs": 1, "batch_size": 4, "target_ratio": 0.5, "target_weight": 1.0})
    train(cfg, str(out), str(tmp_path / "s"), RunOptions(device="cpu", progress=False, target=str(tmp_path / "p")),
          **QUIET)
    assert seen and all(b == 4 and n == 2 for b, n, _ in seen) and sum(t for *_, t in seen) > 0
    record = json.loads((tmp_path / "s" / "config.json").read_text())
    assert record["target"]["split"] == "target" and record["config"]["target_ratio"] == 0.5
    # target weight 0: the target samples are in the batch but teach nothing -> another model than weight 1
    seen.clear()
    train(resolve(2, {"epochs": 1, "batch_size": 4, "target_ratio": 0.5, "target_weight": 0.0}), str(out),
          str(tmp_path / "s0"), RunOptions(device="cpu", progress=False, target=str(tmp_path / "p")), **QUIET)
    a = torch.load(tmp_path / "s" / "best.pt", weights_only=True)["head"]
    b = torch.load(tmp_path / "s0" / "best.pt", weights_only=True)["head"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SegError, match="apply to pseudo-labelled target samples: add --target"):
        train(resolve(2, {"epochs": 1, "target_ratio": 0.5}), str(out), str(tmp_path / "x"),
              RunOptions(device="cpu", progress=False), **QUIET)
    (tmp_path / "p" / "masks.npy").write_bytes(b"changed")
    with pytest.raises(SegError, match=r"masks\.npy: missing or changed since"):
        train(cfg, str(out), str(tmp_path / "y"), RunOptions(device="cpu", progress=False, target=str(tmp_path / "p")),
              **QUIET)


def test_the_guard_stops_a_teacher_wrong_about_a_whole_class(adapted_cache, teacher, tmp_path):
    """A teacher that never predicts Landscape (half the source pixels) collapses it in its
    pseudo-labels: round 1 stops before any student trains, and the source model stays the model."""
    out, _, _ = adapted_cache
    wrong = tmp_path / "wrong"
    shutil.copytree(teacher, wrong)
    best = torch.load(wrong / "best.pt", weights_only=True)
    landscape = best["class_table"]["classes"].index(next(c for c in best["class_table"]["classes"]
                                                          if c["name"] == "Landscape"))
    best["head"]["classifier.bias"][landscape] = -1e4
    torch.save(best, wrong / "best.pt")
    state = adapt(AdaptOptions(run=str(wrong), cache=str(out), target="target", out=str(tmp_path / "a"), rounds=2,
                               student={"epochs": 1}, run_options=RunOptions(device="cpu"), progress=False), **QUIET)
    (r1,) = state["rounds"]
    assert not r1["passed"] and r1["guard"][0].startswith("collapse: Landscape is 0.0% of the pseudo-labels")
    assert "student" not in r1 and state["final"]["model"] == str(wrong.resolve())
    assert "no round passed the guard" in state["final"]["why"]
    assert "STOPPED: collapse: Landscape" in (tmp_path / "a" / "adapt.txt").read_text()


def test_adapt_resumes_after_a_kill_to_the_same_result(adapted_cache, teacher, tmp_path, monkeypatch):
    out, _, _ = adapted_cache
    opts = lambda where: AdaptOptions(run=str(teacher), cache=str(out), target="target", out=str(where),  # noqa: E731
                                      rounds=2, student={"epochs": 1}, run_options=RunOptions(device="cpu"),
                                      guard=GuardSettings(collapse_fraction=0.0, val_drop=1.0, shift_factor=1e9),
                                      progress=False)
    whole = adapt(opts(tmp_path / "whole"), **QUIET)
    adapt_killed_in_second_epoch(opts(tmp_path / "cut"), monkeypatch)  # round 2's student, in its first epoch
    state = json.loads((tmp_path / "cut" / "adapt.json").read_text())
    assert state["rounds"][0]["passed"] and "val_miou" not in state["rounds"][1]
    resumed = adapt(opts(tmp_path / "cut"), **QUIET)
    assert [r["val_miou"] for r in resumed["rounds"]] == [r["val_miou"] for r in whole["rounds"]]
    assert [r["coverage"] for r in resumed["rounds"]] == [r["coverage"] for r in whole["rounds"]]
    with pytest.raises(SegError, match="holds an adaptation with other settings"):
        adapt(AdaptOptions(run=str(teacher), cache=str(out), target="target", out=str(tmp_path / "cut"), rounds=2,
                           portion=0.3, run_options=RunOptions(device="cpu"), progress=False), **QUIET)


def test_a_student_that_moves_pixels_between_classes_is_not_taken(adapted_cache, teacher, tmp_path):
    """The shift sign, wired: with a factor no student can stay within, round 1's student is trained,
    measured on the target against its teacher, and refused; the source model stays."""
    out, _, _ = adapted_cache
    state = adapt(AdaptOptions(run=str(teacher), cache=str(out), target="target", out=str(tmp_path / "a"), rounds=2,
                               student={"epochs": 1}, run_options=RunOptions(device="cpu"), progress=False,
                               guard=GuardSettings(collapse_fraction=0.0, val_drop=1.0, shift_factor=1.0 + 1e-9)),
                  **QUIET)
    (r1,) = state["rounds"]
    assert r1["student"] and len(r1["teacher_shares"]) == len(r1["student_shares"]) == 10
    assert r1["guard"] and r1["guard"][0].startswith("shift: the student predicts") and not r1["passed"]
    assert state["final"]["model"] == str(teacher.resolve())


@pytest.mark.parametrize("student", ["pmt", "tune-blocks"])
def test_the_mask_decoder_and_tuned_blocks_train_as_students(student, dataset, tmp_path):
    """Students of every kind read the target through the same joined batches: PMT's packed levels
    and a tap cache's token stream, each with an unlabeled split beside its labelled ones."""
    folder = dataset / "Offroad_Segmentation_testImages" / "Color_Images"
    extra = {"layers": "2,5,8,11", "backbone": "vits14_reg"} if student == "pmt" else {"tap_block": 10}
    cache = tmp_path / "cache"
    extract(ExtractConfig(data=str(dataset), out=str(cache), unlabeled=(f"target={folder}",),
                          **{**SETTINGS, "aug_seeds": 1, **extra}), **QUIET)
    settings = ({"head": "pmt", "queries": 8, "decoder_blocks": 1, "mask_points": 300, "batch_size": 2}
                if student == "pmt" else {"tune_blocks": 2, "batch_size": 2})
    teacher = tmp_path / "teacher"
    train(resolve(3, {**settings, "epochs": 1}), str(cache), str(teacher), RunOptions(device="cpu", progress=False),
          **QUIET)
    record = pseudo_label(PseudoOptions(run=str(teacher), cache=str(cache), split="target", out=str(tmp_path / "p"),
                                        device="cpu", progress=False), **QUIET)
    assert record["samples"] == 4 and 0 < record["coverage"] <= 1
    from seg.train.epochs import EpochRunner

    seen, pairs, real = [], [], EpochRunner.forward_loss

    def spy(self, tokens, masks, module=None, n_source=None):
        if self.model.training:
            seen.append((tuple(tokens.shape), n_source))
            criterion = self.criterion

            def paired(prediction, target_masks):  # each part of the loss gets its own rows' predictions
                rows = len(prediction[0][-1]) if isinstance(prediction, tuple) else len(prediction)
                pairs.append((rows, len(target_masks)))
                return criterion(prediction, target_masks)

            self.criterion = paired
            try:
                return real(self, tokens, masks, module, n_source)
            finally:
                self.criterion = criterion
        return real(self, tokens, masks, module, n_source)

    EpochRunner.forward_loss = spy
    try:
        train(resolve(3, {**settings, "epochs": 1, "target_ratio": 0.5, "target_weight": 1.0}), str(cache),
              str(tmp_path / "student"), RunOptions(device="cpu", progress=False, target=str(tmp_path / "p"),
                                                    init_from=str(teacher)), **QUIET)
    finally:
        EpochRunner.forward_loss = real
    assert seen and all(shape[0] == 2 and n == 1 for shape, n in seen)
    assert pairs and all(rows == n == 1 for rows, n in pairs)  # one source row, one target row, each scored alone
    assert len(seen[0][0]) == (4 if student == "pmt" else 3)  # packed levels, or the tap stream
    assert json.loads((tmp_path / "student" / "config.json").read_text())["target"]["split"] == "target"
    # on line: the EMA teacher labels the target and ClassMix mixes it with the source in this layout
    state = adapt(AdaptOptions(run=str(teacher), cache=str(cache), target="target", out=str(tmp_path / "online"),
                               mode="online", student={"epochs": 1, "target_ratio": 0.5}, guard=OFF,
                               run_options=RunOptions(device="cpu"), progress=False), **QUIET)
    (e1,) = state["epochs"]
    assert e1["passed"] and 0 <= e1["coverage"] <= 1 and sum(e1["shares"]) == pytest.approx(1.0)
    assert state["final"]["model"] == str((tmp_path / "online" / "student").resolve())


OFF = GuardSettings(collapse_fraction=0.0, swallow_share=1.0, val_drop=1e9, shift_factor=1e9)


def test_online_adapt_resumes_after_a_kill_to_the_same_result(adapted_cache, teacher, tmp_path, monkeypatch):
    """DAFormer's mode: one student, its EMA teacher saved with every epoch; killed in epoch 2 and
    resumed, it ends where an uninterrupted run ends, table and weights alike."""
    out, _, _ = adapted_cache
    opts = lambda where, **kw: AdaptOptions(run=str(teacher), cache=str(out), target="target",  # noqa: E731
                                            out=str(where), mode="online", student={"epochs": 2}, guard=OFF,
                                            run_options=RunOptions(device="cpu"), progress=False, **kw)
    whole = adapt(opts(tmp_path / "whole"), **QUIET)
    assert [e["epoch"] for e in whole["epochs"]] == [1, 2] and all(e["passed"] for e in whole["epochs"])
    last = torch.load(tmp_path / "whole" / "student" / "last.pt", weights_only=True)
    assert last["ema_teacher"]["steps"] > 0 and last["config"]["select"] == "final"
    assert json.loads((tmp_path / "whole" / "student" / "config.json").read_text())["target"]["online"]["momentum"] == 0.999
    assert "source model" in (tmp_path / "whole" / "adapt.txt").read_text()
    adapt_killed_in_second_epoch(opts(tmp_path / "cut"), monkeypatch)
    assert [e["epoch"] for e in json.loads((tmp_path / "cut" / "adapt.json").read_text())["epochs"]] == [1]
    resumed = adapt(opts(tmp_path / "cut"), **QUIET)
    assert [(e["val_miou"], e["coverage"], e["student_confidence"]) for e in resumed["epochs"]] == \
        [(e["val_miou"], e["coverage"], e["student_confidence"]) for e in whole["epochs"]]
    a, b = (torch.load(p / "student" / "best.pt", weights_only=True)["head"] for p in (tmp_path / "whole", tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SegError, match="in online mode, not rounds"):
        adapt(AdaptOptions(run=str(teacher), cache=str(out), target="target", out=str(tmp_path / "cut"),
                           run_options=RunOptions(device="cpu"), progress=False), **QUIET)
    with pytest.raises(SegError, match=r"other settings \(differs in mix\)"):
        adapt(opts(tmp_path / "cut", mix="none"), **QUIET)


def test_the_online_guard_stops_at_the_first_epoch_of_a_teacher_wrong_about_a_class(adapted_cache, teacher, tmp_path):
    """The EMA teacher starts as a source model that never predicts Landscape: its first epoch's
    pseudo-labels collapse Landscape, the epoch is not kept, and the source model stays the model."""
    out, _, _ = adapted_cache
    wrong = tmp_path / "wrong"
    shutil.copytree(teacher, wrong)
    best = torch.load(wrong / "best.pt", weights_only=True)
    landscape = [c["name"] for c in best["class_table"]["classes"]].index("Landscape")
    best["head"]["classifier.bias"][landscape] = -1e4
    torch.save(best, wrong / "best.pt")
    state = adapt(AdaptOptions(run=str(wrong), cache=str(out), target="target", out=str(tmp_path / "a"), mode="online",
                               student={"epochs": 2}, run_options=RunOptions(device="cpu"), progress=False), **QUIET)
    (e1,) = state["epochs"]
    assert not e1["passed"] and e1["guard"][0].startswith("collapse: Landscape is 0.0% of the pseudo-labels")
    assert state["final"]["model"] == str(wrong.resolve()) and "no epoch passed the guard" in state["final"]["why"]
    assert not (tmp_path / "a" / "student" / "best.pt").exists()
    assert "STOPPED: collapse: Landscape" in (tmp_path / "a" / "adapt.txt").read_text()
