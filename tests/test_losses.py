"""Losses against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from seg.losses import SegLoss, dice_loss, focal_loss, inverse_frequency_weights, lin_focal_loss

LN3 = math.log(3.0)


def two_pixel_case():
    # 2 classes, 1x3 image. Pixel 0: logits (0, ln 3) -> p = (1/4, 3/4). Pixel 1: (ln 3, 0) -> (3/4, 1/4).
    # Pixel 2 is ignored, whatever its logits.
    logits = torch.tensor([[[[0.0, LN3, 50.0]], [[LN3, 0.0, -50.0]]]])
    target = torch.tensor([[[1, 1, 255]]])
    return logits, target


def test_cross_entropy():
    logits, target = two_pixel_case()
    # pixel 0: -ln(3/4); pixel 1: -ln(1/4)
    expect = (-math.log(0.75) - math.log(0.25)) / 2
    assert SegLoss("ce")(logits, target).item() == pytest.approx(expect, rel=1e-6)


def test_weighted_cross_entropy_is_weighted_mean():
    logits = torch.tensor([[[[0.0, LN3]], [[LN3, 0.0]]]])
    target = torch.tensor([[[1, 0]]])
    w = torch.tensor([2.0, 0.5])
    # pixel 0: target 1, p = 3/4 ; pixel 1: target 0, p = 3/4; PyTorch divides by the summed weights
    expect = (0.5 * -math.log(0.75) + 2.0 * -math.log(0.75)) / 2.5
    assert SegLoss("weighted_ce", w)(logits, target).item() == pytest.approx(expect, rel=1e-6)


def published_focal_by_hand():
    # The published listing, worked by hand for weights w = (1, 2); both valid pixels are class 1:
    # pixel 0: p_1 = 3/4, ce = 2 ln(4/3), pt = exp(-ce) = (3/4)^2 = 9/16, factor (1 - 9/16)^2 = 49/256
    # pixel 1: p_1 = 1/4, ce = 2 ln 4,     pt = (1/4)^2 = 1/16,             factor (15/16)^2 = 225/256
    return (49 / 256 * 2 * math.log(4 / 3) + 225 / 256 * 2 * math.log(4)) / 2


def test_published_focal_by_hand():
    logits, target = two_pixel_case()
    got = focal_loss(logits, target, gamma=2.0, class_weights=torch.tensor([1.0, 2.0])).item()
    assert got == pytest.approx(published_focal_by_hand(), rel=1e-6)
    # the textbook form puts the weight outside the modulation: a different number (0.7436 vs 0.6339 here)
    textbook = 2.0 * ((0.25 ** 2) * math.log(4 / 3) + (0.75 ** 2) * math.log(4)) / 2
    assert abs(got - textbook) > 0.1
    # with unit weights both forms are the same (and gamma = 0 is plain cross-entropy)
    assert focal_loss(logits, target, 0.0).item() == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-6)


def test_published_focal_modulation_differs_100x_from_textbook_for_extreme_weights():
    # one pixel with p_t = 0.9: textbook factor (1 - 0.9)^2 = 0.01 whatever the weight; the published
    # factor is (1 - 0.9^w)^2: w = 0.05 (Sky-like) -> 2.7e-5, w = 5 (Logs-like) -> 0.168
    logits = torch.tensor([[[[math.log(9.0)]], [[0.0]]]])  # p = (0.9, 0.1)
    target = torch.tensor([[[0]]])
    for w, factor in ((0.05, (1 - 0.9 ** 0.05) ** 2), (5.0, (1 - 0.9 ** 5) ** 2)):
        got = focal_loss(logits, target, 2.0, torch.tensor([w, 1.0])).item()
        assert got == pytest.approx(factor * w * -math.log(0.9), rel=1e-5)
        lin = lin_focal_loss(logits, target, 2.0, torch.tensor([w, 1.0])).item()
        assert lin == pytest.approx(0.01 * w * -math.log(0.9), rel=1e-5)


def test_lin_focal_by_hand():
    logits, target = two_pixel_case()
    alpha = torch.tensor([1.0, 2.0])
    # pixel 0: p_t = 3/4 -> (1/4)^2 * -ln(3/4); pixel 1: p_t = 1/4 -> (3/4)^2 * -ln(1/4); alpha_t = 2 for both
    expect = 2.0 * ((0.25 ** 2) * -math.log(0.75) + (0.75 ** 2) * -math.log(0.25)) / 2
    assert lin_focal_loss(logits, target, gamma=2.0, alpha=alpha).item() == pytest.approx(expect, rel=1e-6)


def test_published_focal_is_a_plain_mean_over_valid_pixels():
    # the class weights do not normalise the mean (weighted CE's reduction would divide by sum of w_t)
    logits = torch.zeros(1, 2, 1, 2)  # p = 1/2 everywhere
    target = torch.tensor([[[0, 255]]])
    w = torch.tensor([4.0, 1.0])
    ce = 4 * math.log(2)
    assert focal_loss(logits, target, 2.0, w).item() == pytest.approx((1 - 0.5 ** 4) ** 2 * ce, rel=1e-6)


def test_dice_by_hand():
    logits, target = two_pixel_case()
    # over ALL classes, smooth 1, ignore pixel excluded:
    # class 0 (absent): I = 0, P = 1/4 + 3/4 = 1, T = 0 -> (0 + 1) / (1 + 0 + 1) = 1/2
    # class 1: I = 3/4 + 1/4 = 1, P = 1, T = 2 -> (2 + 1) / (1 + 2 + 1) = 3/4
    assert dice_loss(logits, target).item() == pytest.approx(1 - (1 / 2 + 3 / 4) / 2, rel=1e-6)


def test_dice_averages_all_classes_and_absent_predicted_mass_costs():
    # 3 classes, 3 pixels all of class 1; p = (1/4, 3/4, 0), (3/4, 1/4, 0), (1/4, 3/4, 0)
    logits = torch.tensor([[[[0.0, LN3, 0.0]], [[LN3, 0.0, LN3]], [[-60.0, -60.0, -60.0]]]])
    target = torch.tensor([[[1, 1, 1]]])
    c0 = 1 / (5 / 4 + 1)                  # absent, predicted mass 5/4: term 4/9, pulled towards 0
    c1 = (2 * 7 / 4 + 1) / (7 / 4 + 3 + 1)  # present
    c2 = 1.0                              # absent and not predicted: (0 + 1) / (0 + 0 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - (c0 + c1 + c2) / 3, rel=1e-5)
    # moving probability onto the absent class 2 raises the loss
    more = logits.clone()
    more[0, 2] = 0.0
    assert dice_loss(more, target).item() > dice_loss(logits, target).item() + 0.05


def test_phase3_loss_is_published_focal_plus_half_dice():
    logits, target = two_pixel_case()
    w = torch.tensor([1.0, 2.0])
    expect = published_focal_by_hand() + 0.5 * (1 - (1 / 2 + 3 / 4) / 2)
    assert SegLoss("focal_dice", w)(logits, target).item() == pytest.approx(expect, rel=1e-6)
    lin = 2.0 * ((0.25 ** 2) * math.log(4 / 3) + (0.75 ** 2) * math.log(4)) / 2 + 0.5 * (1 - (1 / 2 + 3 / 4) / 2)
    assert SegLoss("lin_focal_dice", w)(logits, target).item() == pytest.approx(lin, rel=1e-6)


@pytest.mark.parametrize("kind", ["ce", "weighted_ce", "focal_dice", "lin_focal_dice"])
def test_all_ignored_is_zero_not_nan(kind):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    loss = SegLoss(kind, torch.ones(3))(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_inverse_frequency_weights():
    w = inverse_frequency_weights(torch.tensor([100, 300, 0, 600]))
    # freq .1 .3 - .6 -> inverse 10, 3.33, -, 1.67 -> scaled to max 5
    assert w.tolist() == pytest.approx([5.0, 5 / 3, 5.0, 5 / 6])
