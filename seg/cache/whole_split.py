"""Reading a whole split shard by shard: every row into memory (preloading), or the pixel count of
every class in every mask (the class statistics a run weighs and samples by)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from seg.data.class_stats import class_counts
from seg.runtime.errors import SegError

_TORCH = {"<f2": torch.float16, "|u1": torch.uint8}


def load_split(split, device: torch.device | str = "cpu", progress: Optional[Callable[[int], None]] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A CacheSplit as (stored token rows [N, ...], masks uint8 [N, H, W]) on device: float16 tokens
    [N, L, C, Hp, Wp], or an int8 cache's packed bytes, which stay 8-bit in memory."""
    mask_shape = split.manifest["mask_shape"]
    tokens = torch.empty((len(split), *split.row_shape), dtype=_TORCH[split.row_dtype.str], device=device)
    masks = torch.empty((len(split), *mask_shape), dtype=torch.uint8, device=device)
    for j, plan in enumerate(split.shards):
        f = split._file(j)
        try:
            t, m = f["tokens"][()], f["masks"][()]
        except Exception as exc:  # damaged HDF5 fails in many ways
            raise SegError(f"{split.path / plan.file}: corrupt shard ({exc}); run `seg cache verify`") from None
        split._check(t, m, range(plan.start, plan.start + plan.count))
        tokens[plan.start:plan.start + plan.count] = torch.from_numpy(t)
        masks[plan.start:plan.start + plan.count] = torch.from_numpy(m)
        if progress:
            progress(plan.count)
    return tokens, masks


def count_split_classes(split, num_classes: int) -> np.ndarray:
    """int64 [N, K] pixels per class id of every mask of a CacheSplit (ignore excluded), shard by shard."""
    parts = []
    for j in range(len(split.shards)):
        try:
            masks = split._tokens_masks(j)[1][()]
        except Exception as exc:  # damaged HDF5 fails in many ways
            raise SegError(f"{split.path / split.shards[j].file}: corrupt shard ({exc}); run `seg cache verify`") from None
        parts.append(class_counts(masks, num_classes))
    return np.concatenate(parts)
