"""One epoch of training and one pass of validation over cached tokens, identical on every rank."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from seg.cache import CacheSplit
from seg.heads import head_logits, mask_predictions, pmt_logits
from seg.runtime.distributed import Dist, all_reduce_sum
from seg.runtime.errors import SegError
from seg.scoring.metrics import confusion_matrix
from seg.train.presets import TrainConfig
from seg.train.sampling import RareClassSampler
from seg.train.sources import batches_of, epoch_indices
from seg.runtime.progress import progress_bar

SYNC_EVERY = 16  # training steps between host reads of the loss
VAL_BATCH = 8


@dataclass
class EpochRunner:
    cfg: TrainConfig
    model: nn.Module                    # the head, or its DDP wrapper (training steps)
    head: nn.Module                     # the head itself (validation: no collectives inside a forward)
    criterion: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    grid: Optional[tuple[int, int]]     # the patch grid of tap tokens; None for layer caches
    train_split: CacheSplit
    val_split: CacheSplit
    num_classes: int
    d: Dist
    sampler: Optional[RareClassSampler] = None
    progress: bool = True
    last_good: Callable[[], str] = lambda: ""  # names the last good checkpoint in a refusal
    rank_batch: int = 0                 # this rank's micro-batch and accumulation (rank_batching);
    rank_accum: int = 0                 # 0: the config's batch_size and accum (one process)
    on_step: Optional[Callable[[int, int], None]] = None  # (epoch, optimizer steps so far in it), after each step
    target_split: object = None         # a pseudo-labelled split (seg.cache.pseudo) mixed into every batch
    target_batch: int = 0               # its samples per micro-batch (the rest of rank_batch is the source's)
    teacher: object = None              # an EmaTeacher (seg.train.ema_teacher) labelling target_split on line

    def __post_init__(self) -> None:
        self.rank_batch = self.rank_batch or self.cfg.batch_size
        self.rank_accum = self.rank_accum or self.cfg.accum

    def forward_loss(self, tokens: torch.Tensor, masks: torch.Tensor, module: Optional[nn.Module] = None,
                     n_source: Optional[int] = None) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(logits, loss); a mask decoder in training gives no logits (nothing reads them there). With
        n_source, the batch's first n_source samples are labelled source samples and the rest
        pseudo-labelled target ones: loss = source loss + target_weight x target loss."""
        module = module or self.model
        out = self.head_out(tokens, tuple(masks.shape[-2:]), module)
        logits = (None if module.training else pmt_logits(out, tuple(masks.shape[-2:]))) if tokens.dim() == 4 else out
        if n_source is None or n_source == len(masks):
            return logits, self.criterion(out, masks)
        head, tail = _part(out, slice(0, n_source)), _part(out, slice(n_source, None))
        return logits, (self.criterion(head, masks[:n_source])
                        + self.cfg.target_weight * self.criterion(tail, masks[n_source:]))

    def head_out(self, tokens: torch.Tensor, size: tuple[int, int], module: Optional[nn.Module] = None):
        """What the loss reads: logits at `size`, or for packed levels a mask decoder's predictions."""
        module = module or self.model
        if tokens.dim() == 4:  # packed levels: a mask decoder, scored by its own loss
            return mask_predictions(module, tokens, self.amp_dtype, self.grid)
        return head_logits(module, tokens, size, self.amp_dtype, self.grid)

    def epoch_draw(self, epoch: int) -> np.ndarray:
        """The epoch's samples, in order: a pure function of (seed, epoch), the same on every rank."""
        cfg = self.cfg
        if self.sampler is not None:
            return self.sampler.draw(len(self.train_split.images), epoch, cfg.seed)[0]
        return epoch_indices(len(self.train_split.images), len(self.train_split.seeds), epoch, cfg.seed, cfg.all_seeds)

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of the epoch. Under DDP the epoch's draw is the one-process draw,
        padded by wrap-around to whole global micro-batches, and each global micro-batch of
        rank_batch x world is cut into one slice per rank. With a target, the source's share of
        each micro-batch."""
        d, b = self.d, self.rank_batch - self.target_batch
        idx = self.epoch_draw(epoch)
        if not d.active:
            return batches_of(idx, b)
        global_batch = b * d.world
        pad = (-len(idx)) % global_batch
        idx = np.concatenate([idx, np.resize(idx, pad)]) if pad else idx
        return [g[d.rank * b:(d.rank + 1) * b] for g in batches_of(idx, global_batch)]

    def target_batches(self, epoch: int, count: int) -> list[np.ndarray]:
        """This rank's target samples for `count` micro-batches: drawn uniformly with replacement, a
        pure function of (seed, epoch), each rank its own slice of one draw."""
        d, b = self.d, self.target_batch
        rng = np.random.default_rng([self.cfg.seed, epoch, 1])
        draw = rng.integers(0, len(self.target_split), count * b * d.world)
        return [draw[(i * d.world + d.rank) * b:(i * d.world + d.rank + 1) * b] for i in range(count)]

    def train_epoch(self, source, epoch: int, target=None) -> tuple[float, float]:
        """(mean train loss over all ranks, samples per second). `target`: the source of pseudo-labelled
        samples, target_batch of them joining each micro-batch."""
        cfg = self.cfg
        self.model.train()
        batches = self.rank_batches(epoch)
        if target is None:
            parts = ((tokens, masks, None) for tokens, masks in source.batches(batches))
        else:
            parts = (_joined(s, t) for s, t in zip(source.batches(batches),
                                                   target.batches(self.target_batches(epoch, len(batches)))))
        n_samples = sum(len(b) for b in batches) + (len(batches) * self.target_batch if target is not None else 0)
        count, t0 = 0, time.perf_counter()
        # Kept on the device and read every SYNC_EVERY steps: a .item() per step would make the host wait
        # for every GPU step. A non-finite loss is still caught within SYNC_EVERY steps, before anything
        # of the epoch is saved, and reported with the step where it first appeared.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        first_bad = torch.full((2,), float("inf"), dtype=torch.float64, device=self.device)  # (step, loss)
        step_t = torch.zeros((), dtype=torch.float64, device=self.device)  # the step, counted on the device
        self.opt.zero_grad(set_to_none=True)
        bar = progress_bar(enabled=self.progress and self.d.is_main, total=n_samples, unit="sample",
                           desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for step, (tokens, masks, n_source) in enumerate(parts):
            stepping = (step + 1) % self.rank_accum == 0
            # Under DDP gradients are all-reduced only on the micro-batch that steps: the ones before it
            # accumulate locally (no_sync must hold over the forward too, where DDP reads the flag).
            with self.model.no_sync() if self.d.active and not stepping else contextlib.nullcontext():
                if self.teacher is not None:
                    loss = self.teacher.loss(self, tokens, masks, n_source, epoch, step)
                else:
                    _, loss = self.forward_loss(tokens, masks, n_source=n_source)
                fresh = ~torch.isfinite(loss.detach()) & torch.isinf(first_bad[0])
                first_bad = torch.where(fresh, torch.stack([step_t, loss.detach().double()]), first_bad)
                step_t += 1
                self.scaler.scale(loss / self.rank_accum).backward()
            # As published: step on every accum-th batch only. A last group of fewer than accum
            # batches adds its gradients, but zero_grad at the next epoch's start discards them.
            if stepping:
                if cfg.grad_clip is not None:  # on the true gradients: unscaled first
                    self.scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_(self.head.parameters(), cfg.grad_clip)
                self.scaler.step(self.opt)
                self.scaler.update()
                self.opt.zero_grad(set_to_none=True)
                if self.teacher is not None:
                    self.teacher.update(self.head)
                if self.on_step is not None:
                    self.on_step(epoch, (step + 1) // self.rank_accum)
            total += loss.detach().double() * len(tokens)
            count += len(tokens)
            bar.update(len(tokens))
            if (step + 1) % SYNC_EVERY == 0 or step + 1 == len(batches):
                self._stop_if_non_finite(first_bad, epoch, bar)
                bar.set_postfix(loss=f"{total.item() / count:.4f}")
        bar.close()
        seconds = time.perf_counter() - t0
        sums = all_reduce_sum(self.d, torch.stack([total, torch.tensor(float(count), dtype=torch.float64,
                                                                       device=self.device)]))
        total, count = sums.tolist()
        return total / max(count, 1), count / seconds if seconds > 0 else 0.0

    def _stop_if_non_finite(self, first_bad: torch.Tensor, epoch: int, bar) -> None:
        """Every rank learns whether any rank saw a non-finite loss and all stop together (none waits
        forever in a collective); this rank names the first step where it saw one."""
        bad = torch.isfinite(first_bad[:1]).double()
        if all_reduce_sum(self.d, bad).item() > 0:
            bar.close()
            step, value = first_bad.tolist()
            where = f"step {int(step) + 1}" if step != float("inf") else "a step on another rank"
            raise SegError(f"train loss became {value if step != float('inf') else 'non-finite'} at epoch {epoch + 1}, "
                           f"{where}; stopped. {self.last_good()} (lower --lr, or check the cache with `seg cache verify`)")

    @torch.no_grad()
    def validate(self, source) -> tuple[float, torch.Tensor]:
        """(mean val loss, one confusion matrix over the whole split, summed over ranks). The forward runs
        on the unwrapped head: a DDP forward issues collectives (buffer broadcasts), so a rank whose
        slice of the split is empty would wait on the others forever. Every rank issues the same two
        all-reduces below, whatever its slice."""
        self.model.eval()
        k = self.num_classes
        cm = torch.zeros(k, k, dtype=torch.int64, device=self.device)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss x samples, samples): no per-batch sync
        mine = np.array_split(np.arange(len(self.val_split)), self.d.world)[self.d.rank]
        for tokens, masks in source.batches(batches_of(mine, VAL_BATCH)):
            logits, loss = self.forward_loss(tokens, masks, self.head)
            sums[0] += loss.detach().double() * len(tokens)
            sums[1] += len(tokens)
            cm += confusion_matrix(logits.argmax(1), masks, k)
        all_reduce_sum(self.d, cm)  # one confusion matrix over the whole split, never per rank
        all_reduce_sum(self.d, sums)
        return sums[0].item() / max(sums[1].item(), 1), cm


def _joined(source: tuple, target: tuple) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A source batch and a target batch as one: (tokens, masks, how many come first from the source)."""
    return torch.cat((source[0], target[0])), torch.cat((source[1], target[1])), len(source[0])


def _part(out, rows: slice):
    """Rows of a head's output: logits [B, ...], or a mask decoder's (mask logits, class logits) lists."""
    if isinstance(out, tuple):
        return tuple([t[rows] for t in part] for part in out)
    return out[rows]
