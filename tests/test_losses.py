"""Losses against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from seg.train.losses import SegLoss, dice_loss, focal_loss, inverse_frequency_weights, lin_focal_loss

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


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("ignore", [False, True])
def test_fused_focal_dice_equals_the_reference_formulas(gamma, ignore):
    """The fused phase-3 loss (hand-written gradient) against focal_loss + w x dice_loss and autograd."""
    from seg.train.losses import focal_dice

    g = torch.Generator().manual_seed(int(gamma * 10) + ignore)
    logits = (torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, 5, (2, 7, 9), generator=g)
    target[1, 2] = 4  # class 3 may be absent; class 4 present
    if ignore:
        target[0, :3] = 255
    w = torch.rand(5, generator=g, dtype=torch.float64) * 4 + 0.5
    ref = focal_loss(logits, target, gamma, w) + 1.3 * dice_loss(logits, target)
    (expect,) = torch.autograd.grad(ref, logits)
    got = focal_dice(logits, target, w, gamma, 1.3)
    (grad,) = torch.autograd.grad(got, logits)
    # the reference functions compute in float32; the fused one keeps float64 input in float64
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, expect, rtol=1e-5, atol=1e-7 * float(expect.abs().max()))
    if ignore:
        assert (grad[0, :, :3] == 0).all()  # ignored pixels get no gradient
    small = logits.detach()[:1, :, 1:5, :4].clone().requires_grad_()  # ignored and valid pixels (when ignore)
    assert torch.autograd.gradcheck(lambda z: focal_dice(z, target[:1, 1:5, :4], w, gamma, 1.3), (small,))


def test_phase3_step_loss_changes_only_by_bf16_rounding():
    """The fast path (float32 upsampling by matrices, fused loss) against the one it replaced
    (bf16 F.interpolate under autocast, then the reference formulas)."""
    import torch.nn.functional as F

    from seg.runtime.device import autocast
    from seg.heads import build_head, head_logits, tokens_to_input

    torch.manual_seed(0)
    head = build_head("upernet", 64, 10, layers=1)
    tokens = torch.randn(2, 1, 64, 6, 10).half()
    target = torch.randint(0, 10, (2, 84, 140))
    w = torch.rand(10) + 0.5
    new = SegLoss("focal_dice", w)(head_logits(head, tokens, (84, 140), True), target)
    with autocast(torch.device("cpu"), True):
        old_logits = F.interpolate(head(tokens_to_input(tokens)), size=(84, 140), mode="bilinear", align_corners=False)
    old = focal_loss(old_logits.float(), target, 2.0, w) + 0.5 * dice_loss(old_logits.float(), target)
    assert new.item() == pytest.approx(old.item(), rel=4e-3)  # bf16 carries 8 bits: 2^-8 = 3.9e-3


@pytest.mark.parametrize("shape", [(26, 46, 364, 644), (7, 9, 20, 31), (20, 30, 7, 11), (1, 1, 5, 6), (4, 4, 4, 4)])
def test_matrix_resize_equals_bilinear_interpolation(shape):
    import torch.nn.functional as F

    from seg.heads.resize import resize_bilinear

    h, w, big_h, big_w = shape
    x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    a = F.interpolate(x, size=(big_h, big_w), mode="bilinear", align_corners=False)
    b = resize_bilinear(x, (big_h, big_w))
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(a)
    torch.testing.assert_close(torch.autograd.grad(b, x, g)[0], torch.autograd.grad(a, x, g)[0], rtol=1e-10, atol=1e-12)
