"""The parts of on-line self-training (seg adapt --mode online), by hand: DAFormer's EMA schedule,
its ClassMix draw (half the source batch's values, the ignore value among them), the mix moved onto
the patch-token grid in every cached layout, and how the loss weighs the pseudo-labels."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seg.heads import LinearHead, head_logits
from seg.train.classmix import class_masks, mix_tokens, mixed_labels, pixels_of, token_mask
from seg.train.ema_teacher import EmaTeacher, OnlineSettings
from seg.train.losses import SegLoss


def fill(module, value):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_the_teacher_is_an_ema_of_the_student_on_daformers_schedule():
    student = LinearHead(2, 3)
    fill(student, 1.0)
    teacher = EmaTeacher(OnlineSettings("target", momentum=0.6), student, 3, (1, 1))
    fill(student, 3.0)
    teacher.update(student)               # step 1: alpha = min(1 - 1/2, 0.6) = 0.5 -> 0.5 x 1 + 0.5 x 3
    assert all((p == 2.0).all() for p in teacher.head.parameters())
    fill(student, 6.0)
    teacher.update(student)               # step 2: alpha = min(1 - 1/3, 0.6) = 0.6 -> 0.6 x 2 + 0.4 x 6
    assert all(torch.allclose(p, torch.tensor(3.6)) for p in teacher.head.parameters())
    student.bn.running_mean.fill_(7.0)
    teacher.update(student)               # buffers (BatchNorm statistics) are the student's
    assert (teacher.head.bn.running_mean == 7.0).all() and teacher.steps == 3
    assert [teacher.alpha(s) for s in (1, 2, 9, 10 ** 6)] == pytest.approx([0.5, 0.6, 0.6, 0.6])
    assert EmaTeacher(OnlineSettings("t"), student, 3, (1, 1)).alpha(10 ** 6) == pytest.approx(0.999)
    assert not any(p.requires_grad for p in teacher.head.parameters()) and not teacher.head.training


def test_classmix_draws_half_of_the_batchs_values_the_ignore_value_among_them():
    labels = torch.zeros(2, 4, 4, dtype=torch.uint8)
    labels[1, :, :2], labels[1, :, 2:] = 1, 255   # batch values {0, 1, 255}: 2 of 3 are drawn per sample
    first, ignore_half = set(), set()
    for seed in range(40):
        m = class_masks(labels, np.random.default_rng(seed))
        assert m[0].all() or not m[0].any()       # sample 0 holds one value: all or nothing
        assert m[1].any()                         # two of three values: never none of sample 1's
        first.add(bool(m[0].all()))
        ignore_half.add(bool(m[1][:, 2:].all()))
    assert first == {True, False}                 # 0 is left out in some draws (the batch's values, not its own)
    assert ignore_half == {True, False}           # the ignore value is drawn like any other


def test_a_token_comes_from_the_source_when_half_its_pixels_do():
    px = torch.tensor([[[1, 1, 0, 1],
                        [0, 0, 0, 0],
                        [1, 1, 0, 0],
                        [1, 1, 0, 0]]], dtype=torch.bool)
    tokens = token_mask(px, (2, 2))
    assert tokens.tolist() == [[[True, False], [True, False]]]   # 2/4, 1/4, 4/4, 0/4
    assert pixels_of(tokens, (4, 4)).tolist() == [[[True, True, False, False]] * 2 + [[True, True, False, False]] * 2]


def test_tokens_mix_in_every_cached_layout_prefix_tokens_from_the_target():
    take = torch.tensor([[[True, False], [False, True]]])
    layers = mix_tokens(torch.ones(1, 2, 3, 2, 2), torch.zeros(1, 2, 3, 2, 2), take)
    assert layers[0, :, :, 0, 0].eq(1).all() and layers[0, :, :, 0, 1].eq(0).all() and layers[0, :, :, 1, 1].eq(1).all()
    levels = mix_tokens(torch.ones(1, 2, 1 + 4, 3), torch.zeros(1, 2, 1 + 4, 3), take)   # [B, L, P + N, C]
    assert levels[0, :, :, 0].tolist() == [[0, 1, 0, 0, 1]] * 2    # the cls token, then patches row-major
    tap = mix_tokens(torch.ones(1, 2 + 4, 3), torch.zeros(1, 2 + 4, 3), take)           # [B, P + N, C]
    assert tap[0, :, 0].tolist() == [0, 0, 1, 0, 0, 1]


def test_mixed_labels_keep_each_pixels_origin():
    source = torch.tensor([[[1, 2], [255, 3]]], dtype=torch.uint8)
    pseudo = torch.full((1, 2, 2), 7)
    from_source = torch.tensor([[[True, False], [True, False]]])
    src, tgt = mixed_labels(source, pseudo, from_source)
    assert src.tolist() == [[[1, 255], [255, 255]]] and tgt.tolist() == [[[255, 7], [255, 7]]]


def runner_for(student, weight=1.0):
    criterion = SegLoss("ce")
    return SimpleNamespace(amp_dtype=None, grid=None, criterion=criterion,
                           cfg=SimpleNamespace(seed=0, target_weight=weight),
                           head_out=lambda tokens, size, module=None: head_logits(student, tokens, size, None, None))


def test_the_online_loss_weighs_the_target_by_the_confident_share():
    torch.manual_seed(0)
    student = LinearHead(4, 3).eval()
    tokens = torch.randn(4, 1, 4, 2, 2)                     # 2 source + 2 target samples, 2x2 token grid
    masks = torch.randint(0, 3, (4, 4, 4), dtype=torch.uint8)
    src_loss = SegLoss("ce")(head_logits(student, tokens[:2], (4, 4), None, None), masks[:2])

    def loss(threshold, mix, weight=1.0, m=masks):
        teacher = EmaTeacher(OnlineSettings("t", threshold=threshold, mix=mix), student, 3, (2, 2))
        return teacher.loss(runner_for(student, weight), tokens, m, 2, 0, 0), teacher

    none_confident, teacher = loss(1.5, "none")
    assert torch.allclose(none_confident, src_loss)        # q = 0: the source loss alone
    assert teacher.epoch_stats()["coverage"] == 0.0
    all_confident, teacher = loss(0.0, "none", weight=2.0)  # q = 1: + 2 x the loss on the teacher's argmax
    pseudo = head_logits(teacher.head, tokens[2:], (4, 4), None, None).argmax(1)
    tgt_loss = SegLoss("ce")(head_logits(student, tokens[2:], (4, 4), None, None), pseudo)
    assert torch.allclose(all_confident, src_loss + 2.0 * tgt_loss)
    stats = teacher.epoch_stats()
    assert stats["coverage"] == 1.0 and sum(stats["shares"]) == pytest.approx(1.0) and stats["pixels"] == 2 * 16
    assert teacher.epoch_stats() is None                    # read once: the next epoch counts afresh
    # One value in the source batch: it is always drawn, every token comes from the source, and the
    # mix is the source again: loss = (1 + w) x source loss.
    one_class = masks.clone()
    one_class[:2] = 1
    src_one = SegLoss("ce")(head_logits(student, tokens[:2], (4, 4), None, None), one_class[:2])
    mixed, _ = loss(0.0, "classmix", weight=0.5, m=one_class)
    assert torch.allclose(mixed, 1.5 * src_one)


def test_the_mix_loss_weighs_source_pixels_one_and_target_pixels_q():
    """One source view whose left token column is class 0 and right column ignored, one target view:
    the draw takes 0 (left from the source) or 255 (right, all ignored, from the source). Each case by
    hand: the mixed tokens, then the CE of source pixels (weight 1) and target pixels (weight q) over
    the pixels that carry a label."""
    torch.manual_seed(1)
    student = LinearHead(4, 3).eval()
    tokens = torch.randn(2, 1, 4, 2, 2)
    masks = torch.full((2, 4, 4), 255, dtype=torch.uint8)
    masks[0, :, :2] = 0
    ce = torch.nn.functional.cross_entropy
    left = torch.zeros(2, 2, dtype=torch.bool)
    left[:, 0] = True
    cases = set()
    for epoch, (threshold, q) in enumerate([(1.5, 0.0), (0.0, 1.0)] * 3):
        teacher = EmaTeacher(OnlineSettings("t", threshold=threshold), student, 3, (2, 2))
        got = teacher.loss(runner_for(student), tokens, masks, 1, epoch, 0)
        src_loss = ce(head_logits(student, tokens[:1], (4, 4), None, None), masks[:1].long(), ignore_index=255)
        pseudo = head_logits(student, tokens[1:], (4, 4), None, None).argmax(1)
        took_zero = class_masks(masks[:1], np.random.default_rng([0, epoch, 0, 2]))[0, 0, 0].item()
        cases.add((q, took_zero))
        from_source = left if took_zero else ~left
        mixed = torch.where(from_source, tokens[0], tokens[1])[None]
        logits = head_logits(student, mixed, (4, 4), None, None)
        px = from_source.repeat_interleave(2, 0).repeat_interleave(2, 1)
        per_pixel_src = ce(logits, masks[:1].long(), ignore_index=255, reduction="none")[0]
        per_pixel_tgt = ce(logits, pseudo, reduction="none")[0]
        labelled_src = px & (masks[0] != 255)
        total = (per_pixel_src * labelled_src).sum() + q * (per_pixel_tgt * ~px).sum()
        expected = src_loss + total / (labelled_src.sum() + (~px).sum())
        assert torch.allclose(got, expected, atol=1e-6), (threshold, took_zero)
    assert {took for _, took in cases} == {True, False}


def test_a_pixel_at_the_threshold_counts_as_confident():
    student = LinearHead(4, 3).eval()
    with torch.no_grad():
        student.classifier.bias.copy_(torch.tensor([100.0, 0.0, 0.0]))   # softmax exactly 1.0 in float32
    teacher = EmaTeacher(OnlineSettings("t", threshold=1.0, mix="none"), student, 3, (2, 2))
    teacher.loss(runner_for(student), torch.zeros(2, 1, 4, 2, 2), torch.zeros(2, 4, 4, dtype=torch.uint8), 1, 0, 0)
    assert teacher.epoch_stats()["coverage"] == 1.0   # DAFormer: pseudo_prob.ge(threshold)
