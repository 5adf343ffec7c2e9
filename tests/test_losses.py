"""Losses against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from seg.losses import SegLoss, dice_loss, focal_loss, inverse_frequency_weights

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


def test_focal_by_hand():
    logits, target = two_pixel_case()
    alpha = torch.tensor([1.0, 2.0])
    # pixel 0: p_t = 3/4 -> (1/4)^2 * -ln(3/4); pixel 1: p_t = 1/4 -> (3/4)^2 * -ln(1/4); alpha_t = 2 for both
    expect = 2.0 * ((0.25 ** 2) * -math.log(0.75) + (0.75 ** 2) * -math.log(0.25)) / 2
    assert focal_loss(logits, target, gamma=2.0, alpha=alpha).item() == pytest.approx(expect, rel=1e-6)
    # gamma = 0 and no alpha is plain cross-entropy
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(SegLoss("ce")(logits, target).item(), rel=1e-6)


def test_dice_by_hand():
    logits, target = two_pixel_case()
    # only class 1 is present: inter = 3/4 + 1/4 = 1, sum p1 = 1, |G1| = 2 -> dice = (2*1 + 1)/(1 + 2 + 1)
    expect = 1 - (2 * 1 + 1) / (1 + 2 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(expect, rel=1e-6)


def test_dice_gives_no_reward_for_absent_classes():
    # 3 classes, 3 pixels all of class 1; p1 = 3/4, 1/4, 3/4, class 0 takes the rest, class 2 ~ 0.
    logits = torch.tensor([[[[0.0, LN3, 0.0]], [[LN3, 0.0, LN3]], [[-60.0, -60.0, -60.0]]]])
    target = torch.tensor([[[1, 1, 1]]])
    dice1 = (2 * 7 / 4 + 1) / (7 / 4 + 3 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - dice1, rel=1e-5)
    # averaging over all classes would add class 2's free Dice of (0+1)/(0+0+1) = 1
    naive = 1 - (1 / (5 / 4 + 1) + dice1 + 1.0) / 3
    assert abs(naive - (1 - dice1)) > 0.03


def test_phase3_loss_is_focal_plus_half_dice():
    logits, target = two_pixel_case()
    w = torch.tensor([1.0, 2.0])
    total = SegLoss("focal_dice", w)(logits, target).item()
    assert total == pytest.approx(focal_loss(logits, target, 2.0, w).item() + 0.5 * dice_loss(logits, target).item())


@pytest.mark.parametrize("kind", ["ce", "weighted_ce", "focal_dice"])
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
