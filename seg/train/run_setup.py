"""What a run sets up before its first epoch, apart from the story in train_head.py: the head's input
in words, the rare-class sampler, where the batches come from (preloaded on the device or streamed,
with the GPU memory one step takes measured first), and the TensorBoard log."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from seg.cache import format as cf
from seg.cache.pseudo import open_pseudo
from seg.heads import head_logits
from seg.runtime.errors import SegError
from seg.train.presets import TrainConfig
from seg.train.sampling import RareClassSampler, default_min_pixels
from seg.train.sources import (PreloadedSplit, StreamedSplit, choose_preload, gradient_bytes,
                               optimizer_state_bytes, read_batch)


def describe_input(m: dict, tap: Optional[int], log: Callable[[str], None]) -> None:
    """What the head reads, and what each epoch draws, in two lines."""
    L, C = cf.head_input(m)
    hp, wp = m["patch_grid"]["height"], m["patch_grid"]["width"]
    if tap is None:
        log(f"head input: {L * C} channels = {L} layer(s) x {C} from blocks {m['layers']}, grid {wp}x{hp}")
    else:
        log(f"tuning blocks {tap}..{m['depth'] - 1} and the final norm of {m['backbone']} from the "
            f"cached stream entering block {tap}; head input: {C} channels, grid {wp}x{hp}")
    views = cf.augmented_views(m)
    log(f"cache augmentation: {views} augmented view(s) per train image ({m['augmentation']['policy']}); "
        + ("each epoch draws one of them per image" if views else "every epoch sees the plain resize"))


def rare_class_sampler(cfg: TrainConfig, m: dict, train_counts: np.ndarray, names: list[str],
                       log: Callable[[str], None]) -> Optional[RareClassSampler]:
    if cfg.sampling != "rare-class":
        return None
    min_pixels = cfg.rcs_min_pixels or default_min_pixels(tuple(m["mask_shape"]))
    sampler = RareClassSampler(train_counts, cfg.rcs_temperature, min_pixels)
    log("rare-class sampling (T {:g}, >= {} px): P(class) = ".format(cfg.rcs_temperature, min_pixels)
        + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, sampler.probs)))
    return sampler


def measure_step(train_split, head: nn.Module, epochs, rank_batch: int, device: torch.device,
                 levels: bool = False) -> int:
    """Peak GPU bytes of one forward and backward on a real batch (gradients and activations), in
    eval mode so that no BatchNorm statistic moves; nothing is stepped. A mask decoder is measured in
    training mode (its blocks predict and mask only there), with its BatchNorm statistics put back."""
    tokens, masks = read_batch(train_split, np.arange(min(rank_batch, len(train_split))), device, levels)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    buffers = {k: v.clone() for k, v in head.state_dict().items() if "running" in k or "num_batches" in k}
    head.train(levels)
    try:
        with torch.random.fork_rng(devices=[device]):  # the run's random draws start where they would
            _, loss = epochs.forward_loss(tokens, masks, head)
            loss.backward()
        return int(torch.cuda.max_memory_allocated(device) - base)
    finally:
        head.zero_grad(set_to_none=True)
        head.load_state_dict(buffers, strict=False)
        head.train()


def choose_sources(opts, head: nn.Module, opt: torch.optim.Optimizer, train_split, val_split, device: torch.device,
                   measure: Callable[[], int], log: Callable[[str], None], levels: bool = False, target_split=None):
    """(train, val, target or None) sources: preloaded on the device when data plus training fit, else
    streamed; with `levels`, batches of packed levels (prefix tokens included) for a mask decoder."""
    training, how = optimizer_state_bytes(head, opt), "optimizer state and gradients"
    if opts.preload == "auto" and device.type == "cuda":
        training, how = training + measure(), "optimizer state + one step measured"
    else:
        training += gradient_bytes(head)
    splits = [train_split, val_split] + ([target_split] if target_split is not None else [])
    preload, why = choose_preload(opts.preload, splits, device, training=training, training_how=how, levels=levels)
    log(why)
    if preload:
        t0 = time.perf_counter()
        src = tuple(PreloadedSplit(s, device, levels) for s in splits)
        log(f"preloaded {sum(len(s) for s in splits)} samples in {time.perf_counter() - t0:.1f} s")
    else:
        src = tuple(StreamedSplit(s, device, opts.workers, levels) for s in splits)
    return src if target_split is not None else (*src, None)


def tensorboard_log(out: Path, cache, val_split, head: nn.Module, amp_dtype, grid, device: torch.device,
                    log: Callable[[str], None], levels: bool = False):
    from seg.train.tensorboard import TensorBoardLog

    def logits_of(samples, size):
        return head_logits(head, read_batch(val_split, samples, device, levels)[0], tuple(size), amp_dtype, grid)

    log(f"tensorboard: {out / 'tensorboard'} (tensorboard --logdir {out / 'tensorboard'})")
    return TensorBoardLog(out, list(cache.class_table.names), list(cache.class_table.colors), val_split, logits_of)


def target_setup(cfg: TrainConfig, target: Optional[str], cache, rank_batch: int, log: Callable[[str], None],
                 online=None):
    """(target split or None, its samples per micro-batch, what the run records of it): pseudo-labels
    (`--target DIR`), or with `online` (OnlineSettings) the cache's own split that an EMA teacher labels."""
    if target is None and online is None:
        if cfg.target_ratio is not None or cfg.target_weight is not None:
            raise SegError("--target-ratio and --target-weight apply to pseudo-labelled target samples: add --target DIR")
        return None, 0, None
    if target is not None and online is not None:
        raise SegError("--target (pseudo-labels) and an on-line teacher are two ways to label the target: choose one")
    if cfg.target_ratio is None or cfg.target_weight is None:
        raise SegError("--target needs --target-ratio and --target-weight (the command line gives 0.5 and 1)")
    n = max(1, round(rank_batch * cfg.target_ratio))
    if n >= rank_batch:
        raise SegError(f"--target-ratio {cfg.target_ratio:g} leaves no source sample in a batch of {rank_batch}: "
                       "lower it, or raise --batch-size")
    if online is not None:
        if online.split not in cache.manifest["splits"]:
            raise SegError(f"{cache.path}: no {online.split!r} split for the on-line teacher to label "
                           f"(it has {', '.join(cache.splits)})")
        split = cache.split(online.split)
        cache.check_shards([online.split])  # its tokens are read as they are: checked before use
        log(f"target: {online.split} ({len(split)} cached views) labelled on line by an EMA teacher (momentum "
            f"{online.momentum:g}, confidence {online.threshold:g}, mix {online.mix}): {n} of every {rank_batch} "
            f"samples per batch, loss weight {cfg.target_weight:g}")
        return split, n, {"online": online.to_dict(), "split": online.split, "samples_per_batch": n}
    split = open_pseudo(target, cache)
    record = {"pseudo_labels": str(Path(target).resolve()), "split": split.record["split"],
              "masks_sha256": split.record["masks_sha256"], "teacher": split.record["teacher"],
              "samples_per_batch": n, "coverage": split.record["coverage"]}
    log(f"target: {split.record['split']} pseudo-labels from {target} ({len(split)} views, "
        f"{split.record['coverage']:.1%} of pixels labelled): {n} of every {rank_batch} samples per batch, "
        f"loss weight {cfg.target_weight:g}")
    return split, n, record
