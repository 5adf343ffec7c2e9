"""Losses for the three phases, as published. Pixels with the ignore index count nowhere."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.data.classes import IGNORE_INDEX

LOSSES = ("ce", "weighted_ce", "focal_dice", "lin_focal_dice")


def inverse_frequency_weights(pixel_counts: Tensor, max_weight: float = 5.0) -> Tensor:
    """1 / pixel frequency, scaled so the largest weight is max_weight. A class with no pixels
    cannot be weighed by its frequency; it gets max_weight (it never appears as a target)."""
    counts = pixel_counts.double()
    freq = counts / counts.sum()
    inv = torch.where(counts > 0, 1.0 / freq.clamp_min(1e-12), torch.zeros_like(freq))
    weights = inv / inv.max() * max_weight
    return torch.where(counts > 0, weights, torch.full_like(weights, max_weight)).float()


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, class_weights: Optional[Tensor] = None,
               ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The published phase-3 focal loss, exactly (DESIGN.md section 2):
    ce = w_t * -log p_t (cross-entropy with class weights, per pixel), pt = exp(-ce) = p_t ** w_t,
    loss = plain mean over valid pixels of (1 - pt) ** gamma * ce. The class weight enters the
    modulating factor, unlike Lin et al.'s focal loss (`lin_focal_loss`)."""
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    w = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    ce = F.cross_entropy(logits.float(), target.long(), weight=w, ignore_index=ignore_index, reduction="none")
    pt = torch.exp(-ce)
    return ((1.0 - pt) ** gamma * ce)[valid].mean()


def lin_focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: Optional[Tensor] = None,
                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The textbook focal loss (Lin et al. 2017): mean over valid pixels of -alpha_t (1 - p_t)^gamma log p_t."""
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    logp = F.log_softmax(logits.float(), dim=1)
    t = target.clone().long()
    t[~valid] = 0
    logp_t = logp.gather(1, t.unsqueeze(1)).squeeze(1)[valid]
    loss = -((1.0 - logp_t.exp()) ** gamma) * logp_t
    if alpha is not None:
        loss = loss * alpha.to(loss.device)[t[valid]]
    return loss.mean()


# The published listing does not give DiceLoss's smoothing term; 1.0 is the common default of the
# public DiceLoss snippets it follows, and keeps an empty class's term finite (DESIGN.md).
DICE_SMOOTH = 1.0


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, smooth: float = DICE_SMOOTH) -> Tensor:
    """The published Dice loss: 1 - mean over ALL K classes of (2 I_c + smooth) / (P_c + T_c + smooth),
    softmax probabilities and one-hot targets summed over the batch; ignore pixels count nowhere.
    A class absent from the batch is no free reward: predicted mass P_c on it drives its term to 0."""
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    if not valid.any():
        return logits.sum() * 0.0
    probs = F.softmax(logits.float(), dim=1) * valid
    t = target.clone().long()
    t[~valid.squeeze(1)] = 0
    onehot = F.one_hot(t, num_classes).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


def _class_sums(classes: Tensor, weights: Tensor, k: int) -> Tensor:
    """Per class, the sum of the weights of its pixels. bincount, whose CUDA kernel adds with atomics:
    under torch's deterministic mode, scatter_add_, which torch then runs deterministically."""
    if torch.are_deterministic_algorithms_enabled():
        return torch.zeros(k, dtype=weights.dtype, device=weights.device).scatter_add_(0, classes, weights)
    return torch.bincount(classes, weights=weights, minlength=k)


def _mean_ce(logits: Tensor, target: Tensor, weight: Optional[Tensor]) -> Tensor:
    """F.cross_entropy's weighted mean over valid pixels. Under torch's deterministic mode it is summed
    from the per-pixel losses: CUDA's kernel for the mean adds with atomics, and torch refuses it there."""
    if not torch.are_deterministic_algorithms_enabled():
        return F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX)
    per_pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="none")
    valid = target != IGNORE_INDEX
    total = valid.sum() if weight is None else (weight[torch.where(valid, target, 0)] * valid).sum()
    return per_pixel.sum() / total


class _FocalDice(torch.autograd.Function):
    """focal_loss + dice_weight x dice_loss in a few passes over the full-resolution logits, with the
    gradient written out by hand: softmax once, no one-hot, no boolean indexing, one saved tensor.
    The same formulas as the two reference functions above (a test compares values and gradients)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weights: Tensor, gamma: float, dice_weight: float,
                smooth: float) -> Tensor:
        k = logits.shape[1]
        valid = target != IGNORE_INDEX
        all_valid = bool(valid.all())
        vf = valid.to(torch.promote_types(logits.dtype, torch.float32))
        t = torch.where(valid, target, 0)
        p = torch.log_softmax(logits, dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))
        logp_t = p.gather(1, t.unsqueeze(1)).squeeze(1)
        p.exp_()  # the log-probabilities are not needed again: p holds the probabilities from here
        n_valid = vf.sum()
        w_t = weights[t]
        ce = -w_t * logp_t
        pt = torch.exp(-ce)
        one_m = 1.0 - pt
        focal = (one_m.pow(gamma) * ce * vf).sum() / n_valid
        p_t = logp_t.exp()
        flat_t = t.flatten()
        p_sum = p.sum((0, 2, 3)) if all_valid else torch.einsum("bkhw,bhw->k", p, vf)
        t_sum = _class_sums(flat_t, vf.flatten(), k).to(p.dtype)
        inter = _class_sums(flat_t, (p_t * vf).flatten(), k).to(p.dtype)
        den = p_sum + t_sum + smooth
        dice = 1.0 - ((2 * inter + smooth) / den).mean()
        ctx.save_for_backward(p, t, vf, w_t, ce, pt, p_t, den, inter)
        ctx.gamma, ctx.dice_weight, ctx.smooth, ctx.all_valid = gamma, dice_weight, smooth, all_valid
        ctx.n_valid = n_valid
        return focal + dice_weight * dice

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        p, t, vf, w_t, ce, pt, p_t, den, inter = ctx.saved_tensors
        gamma, dw, g = ctx.gamma, ctx.dice_weight * grad_out, grad_out
        k = p.shape[1]
        one_m = 1.0 - pt
        # d focal / d ce per pixel; the first term vanishes with gamma = 0 or at pt = 1 (where ce = 0)
        d_ce = one_m.pow(gamma)
        if gamma != 0:
            d_ce = d_ce + torch.where(one_m > 0, gamma * one_m.pow(gamma - 1) * pt * ce, torch.zeros_like(ce))
        s = g * d_ce * vf / ctx.n_valid
        # dice: d/dp_c = valid x (a_c [t = c] + b_c); through the softmax: p_k (g_k - sum_j p_j g_j)
        a = dw * -2.0 / (k * den)
        b = dw * (2 * inter + ctx.smooth) / (k * den * den)
        pb = torch.einsum("bkhw,k->bhw", p, b)
        alpha = (s * w_t - (pb + a[t] * p_t) * vf)
        grad = torch.add(alpha.unsqueeze(1), b.view(1, k, 1, 1))
        grad.mul_(p)
        if not ctx.all_valid:
            grad.mul_(vf.unsqueeze(1))
        beta = (-s * w_t + a[t] * p_t * vf)
        grad.scatter_add_(1, t.unsqueeze(1), beta.unsqueeze(1))
        return grad, None, None, None, None, None


def focal_dice(logits: Tensor, target: Tensor, class_weights: Tensor, gamma: float = 2.0,
               dice_weight: float = 0.5, smooth: float = DICE_SMOOTH) -> Tensor:
    """focal_loss(...) + dice_weight x dice_loss(...), fused (see _FocalDice)."""
    if not (target != IGNORE_INDEX).any():  # nothing to average over: zero, not 0/0
        return logits.sum() * 0.0
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return _FocalDice.apply(logits, target.long(), class_weights.to(logits.device, dtype), gamma, dice_weight, smooth)


class SegLoss(nn.Module):
    """The phase losses: 'ce', 'weighted_ce' (class_weights), 'focal_dice' (the published focal with
    class_weights + dice_weight x Dice) and 'lin_focal_dice' (Lin et al.'s focal instead)."""

    def __init__(self, kind: str, class_weights: Optional[Tensor] = None, gamma: float = 2.0,
                 dice_weight: float = 0.5, fused: bool = True) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
        if kind != "ce" and class_weights is None:
            raise ValueError(f"loss {kind!r} needs class weights")
        self.kind, self.gamma, self.dice_weight = kind, gamma, dice_weight
        self.fused = fused  # focal_dice through _FocalDice; False: the reference functions (benchmarks)
        self.register_buffer("class_weights", class_weights if kind != "ce" else None)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        # Always float32, whatever autocast is active around the call: under fp16 autocast the
        # softmax, the log and the Dice sums over a whole batch would otherwise run in half precision.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._loss(logits.float(), target)

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        target = target.long()
        if not (target != IGNORE_INDEX).any():  # cross_entropy would return 0/0 = NaN
            return logits.sum() * 0.0
        if self.kind in ("ce", "weighted_ce"):
            return _mean_ce(logits.float(), target, self.class_weights if self.kind == "weighted_ce" else None)
        if self.kind == "focal_dice" and self.fused:
            return focal_dice(logits, target, self.class_weights, self.gamma, self.dice_weight)
        focal = focal_loss if self.kind == "focal_dice" else lin_focal_loss
        return focal(logits, target, self.gamma, self.class_weights) + self.dice_weight * dice_loss(logits, target)
