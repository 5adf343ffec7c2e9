"""Bilinear resizing of logits as two small matrix products: the same numbers as
F.interpolate(mode="bilinear", align_corners=False), but running (forward and backward) at matmul
speed instead of through the scalar upsample kernel, which on a CPU cost more than the head's loss."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=32)
def _weights(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[n_out, n_in]: row i holds the two linear-interpolation weights of output i, with PyTorch's
    half-pixel rule (src = (i + 0.5) n_in / n_out - 0.5, clamped at 0; the far neighbour clamped).
    Built outside inference mode even when first asked for inside it: the cached tensor then serves
    evaluation and training alike (an inference tensor cannot be saved for backward)."""
    with torch.inference_mode(False):
        return _build(n_in, n_out).to(device=device, dtype=dtype)


def _build(n_in: int, n_out: int) -> Tensor:
    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0.0)
    lo = src.floor().long().clamp_max(n_in - 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, C, h, w] -> [B, C, H, W], bilinear, align_corners=False, no antialias."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    rows = _weights(h, size[0], x.device, x.dtype)
    cols = _weights(w, size[1], x.device, x.dtype)
    return rows @ x @ cols.T
