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
                      seeds: list[int]) -> None:
    """Stop at the first sample whose tokens are not finite float16 numbers: a cache of NaNs is not a cache."""
    bad = int((~torch.isfinite(half)).flatten(1).any(1).nonzero()[0, 0])
    i, seed = cf.sample_of(int(ks[bad]), len(files.names), seeds)
    sample = feats[bad].float()
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
    (row_shape, row_dtype), mask_shape = cf.stored_row(manifest), manifest["mask_shape"]
    quant = QuantSpec.of(manifest)
    plan_iter = iter(plans)
    plan = next(plan_iter)
    buf_tokens = np.empty((plan.count, *row_shape), row_dtype)
    buf_masks = np.empty((plan.count, *mask_shape), np.uint8)
    filled, written, max_abs = 0, 0, 0.0
    sq_err = sq = 0.0  # int8: the shard's quantisation error, measured against the float16 tokens
    tap = cf.tap_block(manifest)
    dtype = recorded_dtype(manifest["compute_dtype"], device)
    # Shards are written by one background thread while the backbone computes the next batches (the
    # HDF5 image, the write and its fsync would leave the compute idle otherwise); each write is still
    # atomic (temporary name, then rename), and its error surfaces here.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seg-shard-writer")
    pending: Optional[Future] = None
    try:
        for batch in loader:
            if "error" in batch:
                raise SegError(batch["error"])
            x = normalize(batch["image"].to(device, non_blocking=True))
            feats = backbone_features(model, x, layers, tap, device, dtype)
            half = feats.to(torch.float16)
            if not torch.isfinite(half).all():
                _refuse_non_finite(feats, half, batch["k"], files, seeds)
            if tap is not None:  # the range report of a tap cache; normed layers need none
                max_abs = max(max_abs, half.abs().max().item())
            if quant is not None:  # packed on the compute device: 2x fewer bytes cross to the host
                rows = quant.pack(half)
                err = quant.dequantize(rows).float() - half.float()
                sq_err += float(err.pow(2).sum(dtype=torch.float64))
                sq += float(half.float().pow(2).sum(dtype=torch.float64))
                tokens = rows.cpu().numpy()
            else:
                tokens = half.cpu().numpy()
            b = tokens.shape[0]
            buf_tokens[filled:filled + b] = tokens
            buf_masks[filled:filled + b] = batch["mask"].numpy()
            filled += b
            bar.update(b)
            if filled == plan.count:
                ks = np.arange(plan.start, plan.start + plan.count)
                attrs = {"split": plan.split, "shard": plan.index, "start": plan.start}
                if tap is not None:
                    attrs["max_abs"] = max_abs
                if quant is not None:
                    attrs["quant_error"] = np.array([sq_err, sq], np.float64)
                if pending is not None:
                    pending.result()  # at most one shard in flight: memory holds two shard buffers, not more
                pending = writer.submit(_write, out / plan.file, buf_tokens, buf_masks, ks % len(files.names),
                                        np.asarray(seeds)[ks // len(files.names)], attrs, num_classes)
                written += plan.count
                plan = next(plan_iter, None)
                if plan is None:
                    break
                buf_tokens = np.empty((plan.count, *row_shape), row_dtype)
                buf_masks = np.empty((plan.count, *mask_shape), np.uint8)
                filled, max_abs, sq_err, sq = 0, 0.0, 0.0, 0.0
        if pending is not None:
            pending.result()
    finally:
        writer.shutdown(wait=True)  # an interrupted run still finishes (or cleanly fails) the shard in flight
    return written


def _write(path, tokens, masks, image_index, aug_seed, attrs, num_classes: int) -> None:
    cf.write_shard(path, tokens, masks, image_index, aug_seed, attrs=attrs, class_counts=class_counts(masks, num_classes))
