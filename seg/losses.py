"""Losses for the three phases. Pixels with the ignore index count nowhere; a class absent from
a batch adds neither NaN nor a free reward."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.classes import IGNORE_INDEX

LOSSES = ("ce", "weighted_ce", "focal_dice")


def inverse_frequency_weights(pixel_counts: Tensor, max_weight: float = 5.0) -> Tensor:
    """1 / pixel frequency, scaled so the largest weight is max_weight. A class with no pixels
    cannot be weighed by its frequency; it gets max_weight (it never appears as a target)."""
    counts = pixel_counts.double()
    freq = counts / counts.sum()
    inv = torch.where(counts > 0, 1.0 / freq.clamp_min(1e-12), torch.zeros_like(freq))
    weights = inv / inv.max() * max_weight
    return torch.where(counts > 0, weights, torch.full_like(weights, max_weight)).float()


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: Optional[Tensor] = None,
               ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean over valid pixels of -alpha_t (1 - p_t)^gamma log p_t."""
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


def dice_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1.0) -> Tensor:
    """1 - soft Dice (softmax), averaged over the classes present in the batch's ground truth.

    Averaging over absent classes would hand out Dice = eps/eps = 1 for predicting nothing:
    a reward for a class the batch cannot judge.
    """
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = F.softmax(logits.float(), dim=1) * valid
    t = target.clone().long()
    t[~valid.squeeze(1)] = 0
    onehot = F.one_hot(t, num_classes).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0
    if not present.any():
        return logits.sum() * 0.0
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[present].mean()


class SegLoss(nn.Module):
    """The phase losses: 'ce', 'weighted_ce' (class_weights), 'focal_dice' (alpha = class_weights)."""

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
        return (focal_loss(logits, target, self.gamma, self.class_weights)
                + self.dice_weight * dice_loss(logits, target))
