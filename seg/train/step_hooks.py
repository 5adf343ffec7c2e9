"""What moves with every optimizer step rather than every epoch: a per-step LR schedule (PMT's
warmup-cosine) and a mask decoder's masked-attention annealing."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from seg.heads import PMTHead
from seg.heads.pmt.annealing import mask_probabilities
from seg.train.presets import TrainConfig


def steps_per_epoch(samples: int, rank_batch: int, world: int, accum: int) -> int:
    """Optimizer steps in an epoch of `samples` draws: whole global micro-batches (the last one padded
    under DDP), stepping on every accum-th (a last shorter group never steps)."""
    return math.ceil(samples / (rank_batch * world)) // accum


def step_hook(cfg: TrainConfig, head: nn.Module, sched: torch.optim.lr_scheduler.LRScheduler,
              per_epoch: int) -> Optional[Callable[[int, int], None]]:
    """The function the epoch runner calls after each optimizer step with (epoch, steps so far in the
    epoch); None when nothing moves per step. The annealing is a function of the global step, so a
    resumed run continues it exactly (the probabilities also live in the head's saved buffer)."""
    decoder = head.decoder if isinstance(head, PMTHead) and head.decoder.masked_attention else None
    if not cfg.per_step and decoder is None:
        return None
    total = cfg.epochs * per_epoch

    def after_step(epoch: int, step: int) -> None:
        if cfg.per_step:
            sched.step()
        if decoder is not None:
            probs = mask_probabilities(decoder.num_blocks, epoch * per_epoch + step, total)
            decoder.attn_mask_probs.copy_(torch.tensor(probs, dtype=decoder.attn_mask_probs.dtype))

    return after_step
