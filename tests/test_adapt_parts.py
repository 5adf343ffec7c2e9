"""The parts of self-training, by hand: CBST's class-balanced thresholds and label selection (values
worked out from the definition in CRST's kc_parameters and label_selection), and the collapse guard's
three signs."""

import numpy as np
import pytest
import torch

from seg.adapt.guard import GuardSettings, drift_problem, label_problems, mean_confidence
from seg.adapt.thresholds import class_thresholds, sampled_confidences, select_labels


def test_thresholds_are_the_portion_quantile_of_each_classes_confidences():
    conf = [np.array([0.6, 0.9, 0.7, 0.8]),     # sorted: .9 .8 .7 .6; floor(4 x 0.5) = 2 -> the 2nd: 0.8
            np.array([0.3]),                    # floor(1 x 0.5) = 0 -> kept at 1 (CRST's initial value)
            None,                               # never predicted -> 1
            np.array([0.4, 0.5, 0.45])]         # floor(3 x 0.5) = 1 -> the largest: 0.5
    assert class_thresholds(conf, 0.5).tolist() == pytest.approx([0.8, 1.0, 1.0, 0.5])
    # portion 1: the smallest confidence of each class; portion 0.25 of 4: the largest
    assert class_thresholds(conf, 1.0).tolist() == pytest.approx([0.6, 0.3, 1.0, 0.4])
    assert class_thresholds(conf, 0.25)[0] == pytest.approx(0.9)


def test_labels_are_the_argmax_of_probability_over_threshold_where_it_reaches_one():
    probs = torch.tensor([[0.60, 0.30, 0.10],   # / [0.8, 0.25, 1] = .75, 1.2, .1  -> class 1 (not the argmax 0)
                          [0.90, 0.05, 0.05],   # 1.125, .2, .05                  -> class 0
                          [0.50, 0.20, 0.30],   # .625, .8, .3                    -> ignored
                          [0.20, 0.25, 0.55]])  # .25, 1.0, .55                   -> class 1 (ratio exactly 1 kept)
    probs = probs.T.reshape(1, 3, 2, 2)
    labels = select_labels(probs, torch.tensor([0.8, 0.25, 1.0]))
    assert labels.flatten().tolist() == [1, 0, 255, 1]
    pred, conf = sampled_confidences(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), 4)
    assert pred.shape == conf.shape == (2 * 2 * 2,)


def record(shares, prior, conf=(0.5, 0.5, 0.5), pixels=(10, 10, 10)):
    return {"classes": ["ground", "sky", "rocks"], "shares": list(shares), "source_prior": list(prior),
            "teacher_confidence": list(conf), "teacher_pixels": list(pixels)}


def test_the_guard_names_a_collapsed_class_and_a_swallowing_one():
    g = GuardSettings()
    assert label_problems(record([0.5, 0.3, 0.2], [0.5, 0.35, 0.15]), g) == []
    # a rare class becoming common (Rocks 1% -> 18%) is the domain shift, not a collapse
    assert label_problems(record([0.47, 0.35, 0.18], [0.64, 0.35, 0.01]), g) == []
    problems = label_problems(record([0.7, 0.02, 0.28], [0.5, 0.35, 0.15]), g)
    assert problems == ["collapse: sky is 2.0% of the pseudo-labels against 35.0% of the source pixels (below 0.1 x)"]
    problems = label_problems(record([0.9, 0.05, 0.05], [0.3, 0.35, 0.35]), g)
    assert any(p.startswith("swallow: ground takes 90.0%") for p in problems)
    assert label_problems(record([0.02, 0.5, 0.48], [0.009, 0.5, 0.491]), g) == []  # under min_prior: not watched


def test_drift_is_confidence_up_while_source_accuracy_falls():
    g = GuardSettings(val_drop=0.01)
    assert drift_problem(0.8, 0.6, 0.50, 0.55, g).startswith("drift: confidence on the target rose 0.600 -> 0.800")
    assert drift_problem(0.8, 0.6, 0.545, 0.55, g) is None   # fell, but within val_drop
    assert drift_problem(0.5, 0.6, 0.40, 0.55, g) is None    # fell, but less confident: not this failure
    assert mean_confidence(record([1, 0, 0], [1, 0, 0], conf=(0.9, 0.5, None), pixels=(30, 10, 0))) == pytest.approx(0.8)


def test_shift_is_a_class_moving_by_more_than_the_factor():
    from seg.adapt.guard import shift_problem

    g, names = GuardSettings(shift_factor=2.0), ["ground", "sky", "logs"]
    # measured on the light desert, round 1: Logs 9.0% -> 26.3% of the predictions, Landscape 23% -> 7.9%
    assert shift_problem([0.60, 0.31, 0.09], [0.45, 0.29, 0.263], names, g) == \
        "shift: the student predicts logs on 26.3% of the target pixels, its teacher on 9.0% (2.9x, over 2x)"
    assert shift_problem([0.60, 0.31, 0.09], [0.55, 0.30, 0.15], names, g) is None      # 1.67x: sharpening
    assert shift_problem([0.60, 0.395, 0.005], [0.60, 0.391, 0.009], names, g) is None  # under 1 %: noise
    assert shift_problem([0.5, 0.5, 0.0], [0.5, 0.2, 0.3], names, g).startswith("shift: the student predicts logs")


def test_init_from_accepts_a_class_table_that_differs_only_in_ignored_values(phase3_run):
    """A target domain's cache may ignore other mask values than the source's; the classes (ids,
    names, values, colours) must still be the same for a head to start from another run's weights."""
    import copy

    from seg.heads import build_head
    from seg.runtime.errors import SegError
    from seg.train.init_from import init_head_from

    best = torch.load(phase3_run / "best.pt", weights_only=True)
    head = build_head(best["config"]["head"], best["in_channels"], len(best["class_table"]["classes"]))
    record = {"class_table": copy.deepcopy(best["class_table"]), "backbone": best["backbone"],
              "config": best["config"]}
    record["class_table"]["ignore_values"] = [*record["class_table"]["ignore_values"], 4242]
    init_head_from(head, phase3_run, record)
    assert all(torch.equal(head.state_dict()[k], v) for k, v in best["head"].items())
    for change in ("name", "values", "color"):
        other = copy.deepcopy(record)
        c = other["class_table"]["classes"][1]
        c[change] = "Shrubs" if change == "name" else [4243] if change == "values" else [1, 2, 3]
        with pytest.raises(SegError, match="trained on other classes than this cache's"):
            init_head_from(head, phase3_run, other)


def test_adapt_owns_its_record_and_step_folders_and_nothing_named_like_them(tmp_path):
    from seg.adapt.record import adapt_output

    (tmp_path / "adapt.json").write_text('{"mode": "online"}')
    owns = adapt_output(tmp_path).owns
    assert owns("student/best.pt") and owns("round-2/pseudo/masks.npy") and owns("adapt.txt")
    assert not owns("student-notes.txt") and not owns("round-notes/a.txt") and not owns("students/x")
    (tmp_path / "adapt.json").write_text('{"mode": "mine"}')  # a record seg adapt did not write vouches for nothing
    assert not adapt_output(tmp_path).owns("adapt.txt")


def test_a_stopped_step_says_its_first_problem_and_how_many_more():
    from seg.adapt.guard import verdict

    assert verdict(["collapse: Sky"]) == "collapse: Sky"
    assert verdict(["collapse: Sky", "shift: Rocks", "drift"]) == "collapse: Sky (+2 more)"


def test_the_source_prior_is_each_classes_share_of_the_train_pixels(small_cache):
    from seg.adapt.pseudo_label import source_prior
    from seg.cache import FeatureCache

    cache = FeatureCache(small_cache)
    counts = cache.class_counts("train").sum(0)
    prior = source_prior(cache)
    assert sum(prior) == pytest.approx(1.0) and all(p >= 0 for p in prior)
    assert prior[int(counts.argmax())] == pytest.approx(counts.max() / counts.sum())
