"""The extraction loop: batches through the frozen backbone, float16 tokens checked and written
shard by shard."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from seg.backbones.features import backbone_features
from seg.cache import format as cf
from seg.cache.quant import QuantSpec
from seg.data.class_stats import class_counts
from seg.data.copy_paste import CopyPasteConfig
from seg.data.layouts import SplitFiles
from seg.data.normalize import normalize
from seg.extraction.samples import ExtractionSamples, collate
from seg.runtime.device import recorded_dtype
from seg.runtime.errors import SegError


def f16_step(value: float) -> float:
    """The spacing of float16 numbers near value: what storing the stream costs in precision."""
    return float(np.spacing(np.float16(min(value, 65504.0))))


def _refuse_non_finite(feats: torch.Tensor, half: torch.Tensor, ks: torch.Tensor, files: SplitFiles,
                      seeds: list[int], prefix: Optional[torch.Tensor] = None,
                      prefix_half: Optional[torch.Tensor] = None) -> None:
    """Stop at the first sample whose tokens are not finite float16 numbers: a cache of NaNs is not a
    cache. `prefix` / `prefix_half`: the prefix tokens as computed and as stored."""
    bad_rows = (~torch.isfinite(half)).flatten(1).any(1)
    if prefix_half is not None:
        bad_rows |= (~torch.isfinite(prefix_half)).flatten(1).any(1)
    bad = int(bad_rows.nonzero()[0, 0])
    i, seed = cf.sample_of(int(ks[bad]), len(files.names), seeds)
    sample = feats[bad].float()
    if prefix is not None:
        sample = torch.cat([sample.flatten(), prefix[bad].float().flatten()])
    if torch.isfinite(sample).all():
        why = (f"values beyond the float16 range (max |value| {sample.abs().max().item():.4g} > 65504), "
               "which the cache cannot store")
    else:
        why = "NaN or infinite tokens"
    raise SegError(f"{files.image_path(i)} (aug seed {seed}): the backbone produced {why}; check the weights "
                   "(--weights) and the precision (--fp32)")


@torch.inference_mode()
def extract_shards(model, device, layers, files, manifest, plans, augmenter, decoder, cfg, workers, out, bar,
                   paste: Optional[CopyPasteConfig], num_classes: int) -> int:
    seeds = manifest["splits"][files.split]["seeds"]
    # One OpenCV thread per decoding process: the backbone owns the cores. Set here, before the
    # workers fork, because calling it inside a forked child hangs if the parent used OpenCV's pool.
    cv2.setNumThreads(1)
    dataset = ExtractionSamples(files, seeds, augmenter, decoder, paste if files.split == "train" else None)
    # Batches never cross a shard boundary: a resumed shard is computed in exactly the same batches.
    batches = [list(range(s, min(s + cfg.batch_size, p.start + p.count)))
               for p in plans for s in range(p.start, p.start + p.count, cfg.batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    quant = QuantSpec.of(manifest)
    tap = cf.tap_block(manifest)
    dtype = recorded_dtype(manifest["compute_dtype"], device)
    with_prefix = cf.prefix_tokens(manifest) > 0
    shards = _Shards(plans, manifest, files, seeds, out, num_classes)
    # One batch in flight: while the backbone computes a batch, the previous one's rows travel to
    # the host (on a GPU, into pinned memory without waiting) and are checked and buffered there.
    landing: Optional[_Landing] = None
    try:
        for batch in loader:
            if "error" in batch:
                raise SegError(batch["error"])
            x = normalize(batch["image"].to(device, non_blocking=True))
            if with_prefix:
                feats, prefix = backbone_features(model, x, layers, tap, device, dtype, prefix=True)
            else:
                feats, prefix = backbone_features(model, x, layers, tap, device, dtype), None
            current = _Landing(feats, batch, quant, tap is not None, prefix)
            if landing is not None:
                bar.update(shards.add(landing))
            landing = current
        if landing is not None:
            bar.update(shards.add(landing))
        shards.flush()
    finally:
        shards.close()  # an interrupted run still finishes (or cleanly fails) the shard in flight
    return shards.written


class _Landing:
    """A computed batch on its way to the host: its stored rows (float16 tokens, or packed int8 rows)
    and its statistics, copied without waiting for them; `wait` returns once they have landed."""

    def __init__(self, feats: torch.Tensor, batch: dict, quant: Optional[QuantSpec], tap: bool,
                 prefix: Optional[torch.Tensor] = None) -> None:
        self.feats, self.batch = feats, batch
        self.half = half = feats.to(torch.float16)
        # prefix tokens (cls, registers) stay float16 in every cache: a handful of tokens per layer
        self.prefix_computed = prefix
        self.prefix_half = prefix_half = None if prefix is None else prefix.to(torch.float16)
        zero = torch.zeros((), dtype=torch.float64, device=half.device)
        # (all finite, max |token| of a tap cache, int8: squared error and squared norm); read on the
        # host only after the copy, so computing them costs the GPU no wait
        finite = torch.isfinite(half).all()
        if prefix_half is not None:
            finite = finite & torch.isfinite(prefix_half).all()
        stats = [finite.double(), half.abs().max().double() if tap else zero, zero, zero]
        rows = half
        if quant is not None:  # packed on the compute device: 2x fewer bytes cross to the host
            rows = quant.pack(half)
            err = quant.dequantize(rows).float() - half.float()
            stats[2:] = [err.pow(2).sum(dtype=torch.float64), half.float().pow(2).sum(dtype=torch.float64)]
        stats = torch.stack(stats)
        self.event = None
        if half.is_cuda:
            self.rows, self.stats = _to_pinned(rows), _to_pinned(stats)
            self.prefix = None if prefix_half is None else _to_pinned(prefix_half)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.rows, self.stats, self.prefix = rows, stats, prefix_half

    def wait(self) -> tuple[np.ndarray, list[float], Optional[np.ndarray]]:
        if self.event is not None:
            self.event.synchronize()
        return self.rows.numpy(), self.stats.tolist(), None if self.prefix is None else self.prefix.numpy()


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a device tensor, started without waiting for it."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class _Shards:
    """Fills one shard's buffers with landed batches, in order, and writes each full shard from a
    background thread while the backbone computes (the HDF5 image, the write and its fsync would
    leave the compute idle otherwise); each write is still atomic (temporary name, then rename), and
    its error surfaces in the loop."""

    def __init__(self, plans, manifest: dict, files: SplitFiles, seeds: list[int], out, num_classes: int) -> None:
        (self.row_shape, self.row_dtype), self.mask_shape = cf.stored_row(manifest), manifest["mask_shape"]
        self.files, self.seeds, self.out, self.num_classes = files, seeds, out, num_classes
        self.tap, self.quant = cf.tap_block(manifest) is not None, QuantSpec.of(manifest) is not None
        self.prefix_shape = cf.prefix_shape(manifest)
        self.plans = iter(plans)
        self.written = 0
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seg-shard-writer")
        self.pending: Optional[Future] = None
        self._next_plan()

    def _next_plan(self) -> None:
        self.plan = next(self.plans, None)
        if self.plan is not None:
            self.tokens = np.empty((self.plan.count, *self.row_shape), self.row_dtype)
            self.masks = np.empty((self.plan.count, *self.mask_shape), np.uint8)
            self.prefix = (None if self.prefix_shape is None
                           else np.empty((self.plan.count, *self.prefix_shape), np.float16))
        self.filled, self.max_abs, self.sq_err, self.sq = 0, 0.0, 0.0, 0.0

    def add(self, landing: _Landing) -> int:
        """Checks and buffers one landed batch (batches cover the plans exactly, never crossing a
        shard); returns its size."""
        rows, (finite, max_abs, sq_err, sq), prefix = landing.wait()
        if not finite:
            _refuse_non_finite(landing.feats, landing.half, landing.batch["k"], self.files, self.seeds,
                               landing.prefix_computed, landing.prefix_half)
        b = rows.shape[0]
        self.tokens[self.filled:self.filled + b] = rows
        if self.prefix is not None:
            self.prefix[self.filled:self.filled + b] = prefix
        self.masks[self.filled:self.filled + b] = landing.batch["mask"].numpy()
        self.filled += b
        self.max_abs = max(self.max_abs, max_abs)
        self.sq_err += sq_err
        self.sq += sq
        if self.filled == self.plan.count:
            self._submit()
        return b

    def _submit(self) -> None:
        plan = self.plan
        ks = np.arange(plan.start, plan.start + plan.count)
        attrs = {"split": plan.split, "shard": plan.index, "start": plan.start}
        if self.tap:  # the range report of a tap cache; normed layers need none
            attrs["max_abs"] = self.max_abs
        if self.quant:  # the shard's quantisation error, measured against the float16 tokens
            attrs["quant_error"] = np.array([self.sq_err, self.sq], np.float64)
        if self.pending is not None:
            self.pending.result()  # at most one shard in flight: memory holds two shard buffers, not more
        n = len(self.files.names)
        self.pending = self.writer.submit(_write, self.out / plan.file, self.tokens, self.masks, ks % n,
                                          np.asarray(self.seeds)[ks // n], attrs, self.num_classes, self.prefix)
        self.written += plan.count
        self._next_plan()

    def flush(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        self.writer.shutdown(wait=True)


def _write(path, tokens, masks, image_index, aug_seed, attrs, num_classes: int, prefix) -> None:
    cf.write_shard(path, tokens, masks, image_index, aug_seed, attrs=attrs, class_counts=class_counts(masks, num_classes),
                   prefix=prefix)
