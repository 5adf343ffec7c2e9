"""Losses for the three phases, as published. Pixels with the ignore index count nowhere."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.classes import IGNORE_INDEX

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


class SegLoss(nn.Module):
    """The phase losses: 'ce', 'weighted_ce' (class_weights), 'focal_dice' (the published focal with
    class_weights + dice_weight x Dice) and 'lin_focal_dice' (Lin et al.'s focal instead)."""

    def __init__(self, kind: str, class_weights: Optional[Tensor] = None, gamma: float = 2.0,
                 dice_weight: float = 0.5) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
        if kind != "ce" and class_weights is None:
            raise ValueError(f"loss {kind!r} needs class weights")
        self.kind, self.gamma, self.dice_weight = kind, gamma, dice_weight
        self.register_buffer("class_weights", class_weights if kind != "ce" else None)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = target.long()
        if not (target != IGNORE_INDEX).any():  # cross_entropy would return 0/0 = NaN
            return logits.sum() * 0.0
        if self.kind == "ce":
            return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        if self.kind == "weighted_ce":
            return F.cross_entropy(logits.float(), target, weight=self.class_weights, ignore_index=IGNORE_INDEX)
        focal = focal_loss if self.kind == "focal_dice" else lin_focal_loss
        return focal(logits, target, self.gamma, self.class_weights) + self.dice_weight * dice_loss(logits, target)
