"""Building what a training run trains: the head (with tuned backbone blocks in front of it for a
tap cache), its DDP wrapper, the loss with its class weights, the optimizer and the LR schedule."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from seg.backbones.rebuild import rebuild_backbone
from seg.backbones.tail import BackboneTail
from seg.cache import FeatureCache
from seg.cache import format as cf
from seg.heads import TunedHead, build_head
from seg.runtime.distributed import Dist
from seg.train.cache_checks import backbone_record
from seg.train.losses import SegLoss, inverse_frequency_weights
from seg.train.mask_loss import MaskClassificationCriterion
from seg.train.presets import TrainConfig


def build_head_for(cfg: TrainConfig, cache: FeatureCache, num_classes: int, weights: Optional[str],
                   checkpointing: bool) -> nn.Module:
    """The untrained head, seeded: the same initial weights on every rank."""
    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head, cache.in_channels, num_classes, layers=cache.head_layers, ms_fusion=cfg.ms_fusion,
                      pmt=pmt_shape(cfg.to_dict(), backbone_record(cache.manifest)))
    tap = cf.tap_block(cache.manifest)
    if tap is not None:
        # Exactly the weights the cache recorded (sha256 and tensor fingerprint checked).
        backbone = rebuild_backbone(backbone_record(cache.manifest), weights, torch.device("cpu"))
        tail = BackboneTail(backbone, tap)
        tail.requires_grad_(True)
        tail.checkpointing = checkpointing
        head = TunedHead(tail, head)
    return head


def pmt_shape(config: dict, backbone: dict) -> Optional[dict]:
    """The mask decoder's shape for a run's config and backbone record; None for other heads."""
    if config["head"] != "pmt":
        return None
    w, h = backbone["size"]["width"], backbone["size"]["height"]
    patch = backbone["patch_size"]
    return dict(backbone=backbone["backbone"], embed_dim=backbone["token_shape"][1], grid=(h // patch, w // patch),
                num_q=config["queries"], num_blocks=config["decoder_blocks"],
                masked_attention=bool(config["masked_attention"]))


def wrap_distributed(head: nn.Module, device: torch.device, d: Dist) -> tuple[nn.Module, nn.Module]:
    """(head, model): the module whose weights are saved and the one that runs the steps."""
    if not d.active:
        return head, head
    if device.type == "cuda":  # per-rank BatchNorm statistics would differ from one process
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    model = nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
    return head, model


def build_criterion(cfg: TrainConfig, train_counts: np.ndarray, device: torch.device
                    ) -> tuple[nn.Module, Optional[list[float]]]:
    """The loss and the class weights it uses (None for plain CE), from the train split's pixel counts."""
    if cfg.loss == "mask_classification":
        return MaskClassificationCriterion(train_counts.shape[1], cfg.mask_points), None
    weights = None
    if cfg.loss != "ce":
        weights = inverse_frequency_weights(torch.from_numpy(train_counts.sum(0)), cfg.max_class_weight)
    criterion = SegLoss(cfg.loss, weights, cfg.focal_gamma, cfg.dice_weight).to(device)
    return criterion, (weights.tolist() if weights is not None else None)


def param_groups(cfg: TrainConfig, head: nn.Module) -> list[dict]:
    """The head at lr; tuned block i of k at backbone_lr x layer_decay^(k - 1 - i), the final norm
    at backbone_lr. The schedule scales every group by the same factor."""
    if not isinstance(head, TunedHead):
        return [{"params": list(head.parameters()), "lr": cfg.lr}]
    tail = head.tail
    k = len(tail.blocks)
    return ([{"params": list(head.head.parameters()), "lr": cfg.lr}]
            + [{"params": list(blk.parameters()), "lr": cfg.tuned_lr * cfg.layer_decay ** (k - 1 - i)}
               for i, blk in enumerate(tail.blocks)]
            + [{"params": list(tail.norm.parameters()), "lr": cfg.tuned_lr}])


def build_optimizer(cfg: TrainConfig, head: nn.Module, total_steps: int = 0
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and its schedule: stepped once per epoch, or once per optimizer step
    (step_warmup_cosine over total_steps)."""
    params = param_groups(cfg, head)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.per_step:
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cfg.step_lr_factor(step, total_steps))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
