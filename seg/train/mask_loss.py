"""The mask-classification loss of PMT and EoMT (Mask2Former's, as transformers implements it in
`Mask2FormerLoss`, with PMT's normalisation), summed over every block's prediction.

Per image and block: Hungarian matching of the queries to the image's target masks (one per class
present) on the cost class x (-p(class)) + mask x sigmoid-BCE + dice x Dice, both mask costs over
`num_points` uniformly drawn points (scipy's linear_sum_assignment); then, for the matched pairs,
sigmoid-BCE and Dice over importance-sampled points (`num_points x oversample_ratio` uniform
candidates, the `importance_sample_ratio` share most uncertain of them (|logit| smallest) and the
rest uniform), each divided by the number of target masks (averaged over ranks, at least 1); and
the class cross-entropy of every query, unmatched ones towards "no object" (weight
`no_object_coef`). The random points are drawn from torch's global generator in transformers'
order, so the same seed gives the same value (DESIGN: why not transformers' class itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def semantic_targets(masks: Tensor, num_classes: int, ignore_index: int = 255) -> list[dict]:
    """Class-id masks [B, H, W] -> per image {"masks": bool [M, H, W], "labels": long [M]}, one
    binary mask per class present, in class order; ignored pixels are in none."""
    out = []
    for m in masks:
        labels = torch.unique(m)
        labels = labels[(labels != ignore_index) & (labels < num_classes)].long()
        out.append({"masks": m[None] == labels[:, None, None], "labels": labels})
    return out


def sample_point(features: Tensor, coords: Tensor) -> Tensor:
    """features [N, C, H, W] at coords [N, P, 2] in [0, 1] (x, y) -> [N, C, P], bilinear."""
    return F.grid_sample(features, 2.0 * coords[:, :, None] - 1.0, align_corners=False)[..., 0]


@torch.no_grad()
def hungarian_match(mask_logits: Tensor, class_logits: Tensor, targets: list[dict], num_points: int,
                    mask_coef: float, dice_coef: float, class_coef: float) -> list[tuple[Tensor, Tensor]]:
    from scipy.optimize import linear_sum_assignment

    indices = []
    for i, target in enumerate(targets):
        cost_class = -class_logits[i].softmax(-1)[:, target["labels"]]
        points = torch.rand(1, num_points, 2, device=mask_logits.device)
        tgt = target["masks"].to(mask_logits.dtype)[:, None]
        tgt = sample_point(tgt, points.repeat(tgt.shape[0], 1, 1))[:, 0]
        pred = sample_point(mask_logits[i][:, None], points.repeat(mask_logits.shape[1], 1, 1))[:, 0]
        # pairwise sigmoid-BCE, averaged over the points
        pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
        neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
        cost_mask = (pos / pred.shape[1]) @ tgt.T + (neg / pred.shape[1]) @ (1 - tgt).T
        probs = pred.sigmoid()
        cost_dice = 1 - (2 * probs @ tgt.T + 1) / (probs.sum(-1)[:, None] + tgt.sum(-1)[None, :] + 1)
        cost = mask_coef * cost_mask + class_coef * cost_class + dice_coef * cost_dice
        top = torch.finfo(cost.dtype).max
        rows, cols = linear_sum_assignment(torch.nan_to_num(cost, nan=top, posinf=top, neginf=top).cpu())
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


@torch.no_grad()
def uncertain_points(logits: Tensor, num_points: int, oversample_ratio: float,
                     importance_sample_ratio: float) -> Tensor:
    """[R, num_points, 2]: the most uncertain of num_points x oversample_ratio uniform candidates,
    then uniform points for the rest."""
    n = logits.shape[0]
    candidates = int(num_points * oversample_ratio)
    coords = torch.rand(n, candidates, 2, device=logits.device)
    uncertainty = -sample_point(logits, coords).abs()
    k = int(importance_sample_ratio * num_points)
    idx = torch.topk(uncertainty[:, 0, :], k=k, dim=1)[1]
    idx = idx + candidates * torch.arange(n, dtype=torch.long, device=logits.device)[:, None]
    coords = coords.view(-1, 2)[idx.view(-1), :].view(n, k, 2)
    if num_points - k > 0:
        coords = torch.cat([coords, torch.rand(n, num_points - k, 2, device=logits.device)], dim=1)
    return coords


def _num_masks(indices: list[tuple[Tensor, Tensor]], device: torch.device, average_over_ranks: bool = True) -> Tensor:
    n = torch.as_tensor(float(sum(len(t) for _, t in indices)), dtype=torch.float, device=device)
    world = 1
    if average_over_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        world = torch.distributed.get_world_size()
    return torch.clamp(n / world, min=1)


def block_losses(mask_logits: Tensor, class_logits: Tensor, targets: list[dict], *, num_classes: int,
                 num_points: int, oversample_ratio: float, importance_sample_ratio: float, mask_coef: float,
                 dice_coef: float, class_coef: float, no_object_coef: float, average_over_ranks: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(sigmoid-BCE, Dice, class cross-entropy) of one block's prediction, unweighted."""
    indices = hungarian_match(mask_logits, class_logits, targets, num_points, mask_coef, dice_coef, class_coef)
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src = torch.cat([s for s, _ in indices])
    pred = mask_logits[batch, src][:, None]
    tgt = torch.cat([t["masks"].to(mask_logits.dtype)[j] for t, (_, j) in zip(targets, indices)])[:, None]
    coords = uncertain_points(pred, num_points, oversample_ratio, importance_sample_ratio)
    with torch.no_grad():
        labels = sample_point(tgt, coords)[:, 0]
    logits = sample_point(pred, coords)[:, 0]
    num_masks = _num_masks(indices, mask_logits.device, average_over_ranks)
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks
    probs = logits.sigmoid()
    dice = (1 - (2 * (probs * labels).sum(-1) + 1) / (probs.sum(-1) + labels.sum(-1) + 1)).sum() / num_masks
    weight = torch.ones(num_classes + 1, device=class_logits.device)
    weight[-1] = no_object_coef
    classes = torch.full(class_logits.shape[:2], num_classes, dtype=torch.int64, device=class_logits.device)
    classes[batch, src] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(classes.device)
    ce = F.cross_entropy(class_logits.transpose(1, 2), classes, weight=weight)
    return bce, dice, ce


def mask_classification_loss(mask_logits_list: list[Tensor], class_logits_list: list[Tensor], targets: list[dict],
                             *, num_classes: int, num_points: int = 12544, oversample_ratio: float = 3.0,
                             importance_sample_ratio: float = 0.75, mask_coef: float = 5.0, dice_coef: float = 5.0,
                             class_coef: float = 2.0, no_object_coef: float = 0.1, average_over_ranks: bool = True) -> Tensor:
    """The weighted sum over every block's prediction of mask x BCE + dice x Dice + class x CE.
    average_over_ranks: under torch.distributed, the number of target masks is averaged over ranks."""
    total = None
    for masks, classes in zip(mask_logits_list, class_logits_list):
        bce, dice, ce = block_losses(masks, classes, targets, num_classes=num_classes, num_points=num_points,
                                     oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio,
                                     mask_coef=mask_coef, dice_coef=dice_coef, class_coef=class_coef,
                                     no_object_coef=no_object_coef, average_over_ranks=average_over_ranks)
        for term in (mask_coef * bce, dice_coef * dice, class_coef * ce):
            total = term if total is None else total + term
    return total


class MaskClassificationCriterion(torch.nn.Module):
    """The trainer's loss for a mask decoder: class-id masks [B, H, W] -> PMT's targets -> the loss
    over every block's prediction, computed in float32 (the predictions may come from autocast)."""

    def __init__(self, num_classes: int, num_points: int) -> None:
        super().__init__()
        self.num_classes, self.num_points = num_classes, num_points

    def forward(self, prediction: tuple[list[Tensor], list[Tensor]], masks: Tensor) -> Tensor:
        mask_logits, class_logits = prediction
        targets = semantic_targets(masks, self.num_classes)
        # Training averages the number of target masks over ranks (an all-reduce); validation runs
        # under no_grad on each rank's own slice, where a collective could wait forever.
        return mask_classification_loss([m.float() for m in mask_logits], [c.float() for c in class_logits], targets,
                                        num_classes=self.num_classes, num_points=self.num_points,
                                        average_over_ranks=torch.is_grad_enabled())
