"""Metric values worked out by hand (mmsegmentation's definitions)."""

import json
import math

import numpy as np
import pytest
import torch

from seg.scoring.metrics import confusion_matrix, format_table, jsonable, summarize

NAMES = ["a", "b", "c", "d", "e"]
# ground truth and prediction, 255 = ignore
GT = np.array([[0, 0, 1, 1],
               [0, 1, 1, 3],
               [255, 255, 3, 3]])
PRED = np.array([[0, 1, 1, 1],
                 [2, 1, 0, 3],
                 [4, 0, 3, 2]])
# Valid pixels (10): (gt, pred) = (0,0) (0,1) (1,1) (1,1) (0,2) (1,1) (1,0) (3,3) (3,3) (3,2)
# class a(0): TP 1, FN 2 (->1, ->2), FP 1 (from b)  -> IoU 1/4, Dice 2/5, acc 1/3
# class b(1): TP 3, FN 1 (->0),      FP 1 (from a)  -> IoU 3/5, Dice 6/8, acc 3/4
# class c(2): TP 0, FN 0,            FP 2 (a, d)    -> IoU 0 (only predicted), Dice 0, acc NaN
# class d(3): TP 2, FN 1 (->2),      FP 0           -> IoU 2/3, Dice 4/5, acc 2/3
# class e(4): only predicted on an ignored pixel -> absent: IoU NaN


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, GT, 5)
    expect = np.zeros((5, 5), np.int64)
    for g, p in [(0, 0), (0, 1), (1, 1), (1, 1), (0, 2), (1, 1), (1, 0), (3, 3), (3, 3), (3, 2)]:
        expect[g, p] += 1
    np.testing.assert_array_equal(cm, expect)
    assert cm.sum() == 10  # the two ignore pixels are not counted


def test_summary_by_hand():
    s = summarize(confusion_matrix(PRED, GT, 5), NAMES)
    iou = [1 / 4, 3 / 5, 0.0, 2 / 3]
    assert s["iou"][:4] == pytest.approx(iou) and math.isnan(s["iou"][4])
    assert s["miou"] == pytest.approx(sum(iou) / 4)  # 'c' (only predicted) counts as 0; 'e' is excluded
    assert s["dice"][:4] == pytest.approx([2 / 5, 6 / 8, 0.0, 4 / 5]) and math.isnan(s["dice"][4])
    assert s["mdice"] == pytest.approx((2 / 5 + 6 / 8 + 0 + 4 / 5) / 4)
    assert s["acc"][0] == pytest.approx(1 / 3) and s["acc"][1] == pytest.approx(3 / 4)
    assert math.isnan(s["acc"][2]) and s["acc"][3] == pytest.approx(2 / 3)
    assert s["macc"] == pytest.approx((1 / 3 + 3 / 4 + 2 / 3) / 3)
    assert s["aacc"] == pytest.approx(6 / 10)
    assert s["present"] == ["a", "b", "d"] and s["absent"] == ["e"]
    assert s["miou_present"] == pytest.approx((1 / 4 + 3 / 5 + 2 / 3) / 3)
    assert s["gt_share"] == pytest.approx([0.3, 0.4, 0.0, 0.3, 0.0])


def test_class_only_in_ground_truth():
    cm = confusion_matrix(np.array([0, 0, 0]), np.array([0, 1, 1]), 2)
    s = summarize(cm, ["x", "y"])
    assert s["iou"] == pytest.approx([1 / 3, 0.0]) and s["acc"] == pytest.approx([1.0, 0.0])
    assert s["miou"] == pytest.approx(1 / 6)


def test_accumulation_equals_one_call_and_torch_matches_numpy():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 6, (3, 17, 23)) for _ in range(4)]
    preds = [rng.integers(0, 6, (3, 17, 23)) for _ in range(4)]
    for g in gts:
        g[g == 5] = 255
    total = np.zeros((5, 5), np.int64)
    for p, g in zip(preds, gts):
        total += confusion_matrix(p % 5, g, 5)
    whole = confusion_matrix(np.concatenate(preds) % 5, np.concatenate(gts), 5)
    np.testing.assert_array_equal(total, whole)
    t = confusion_matrix(torch.from_numpy(np.concatenate(preds) % 5), torch.from_numpy(np.concatenate(gts)), 5)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64
    np.testing.assert_array_equal(t.numpy(), whole)
    # averaging per batch is NOT the same number: the reason to accumulate
    per_batch = np.mean([summarize(confusion_matrix(p % 5, g, 5), NAMES)["miou"] for p, g in zip(preds, gts)])
    assert per_batch != pytest.approx(summarize(whole, NAMES)["miou"], abs=1e-9)


def test_bad_inputs():
    with pytest.raises(ValueError, match="sizes differ"):
        confusion_matrix(np.zeros(3), np.zeros(4), 2)
    with pytest.raises(ValueError, match="class ids in 0..1"):
        confusion_matrix(np.array([2]), np.array([0]), 2)


def test_json_and_table():
    s = summarize(confusion_matrix(PRED, GT, 5), NAMES)
    text = json.dumps(jsonable(s), allow_nan=False)
    assert json.loads(text)["iou"][4] is None
    table = format_table(s)
    assert "e " in table and "(absent: not in GT, not predicted)" in table
    assert "(not in GT)" in table.splitlines()[4]  # class c
    assert "absent (excluded from means): e" in table
    assert f"{s['miou']:.4f}" in table
