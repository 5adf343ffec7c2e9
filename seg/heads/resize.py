"""Bilinear resizing of logits as two small matrix products: the same numbers as
F.interpolate(mode="bilinear", align_corners=False), but running (forward and backward) at matmul
speed instead of through the scalar upsample kernel, which on a CPU cost more than the head's loss.

Matrix products are also deterministic on a GPU, where the backward of the bilinear upsample kernel
and of adaptive average pooling are not (they accumulate with atomics): under torch's deterministic
mode (`seg train-head --deterministic`) the heads' own upsampling and pooling go through matrices
too (`upsample`, `adaptive_pool`)."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=64)
def _matrix(build, n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """build(n_in, n_out) -> float64 [n_out, n_in], cached on the device in dtype. Built outside
    inference mode even when first asked for inside it: the cached tensor then serves evaluation
    and training alike (an inference tensor cannot be saved for backward)."""
    with torch.inference_mode(False):
        return build(n_in, n_out).to(device=device, dtype=dtype)


def _pool(n_in: int, n_out: int) -> Tensor:
    """Row i averages adaptive pooling's bin i, inputs floor(i n_in / n_out) up to
    ceil((i + 1) n_in / n_out), as F.adaptive_avg_pool2d bins them."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _bilinear(n_in: int, n_out: int) -> Tensor:
    """Row i holds the two linear-interpolation weights of output i, with PyTorch's half-pixel rule
    (src = (i + 0.5) n_in / n_out - 0.5, clamped at 0; the far neighbour clamped)."""
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
    rows = _matrix(_bilinear, h, size[0], x.device, x.dtype)
    cols = _matrix(_bilinear, w, size[1], x.device, x.dtype)
    return rows @ x @ cols.T


def upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """The heads' bilinear upsampling: F.interpolate, or the matrix products under torch's deterministic
    mode (the same numbers up to rounding)."""
    if torch.are_deterministic_algorithms_enabled():
        return resize_bilinear(x, tuple(size))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def adaptive_pool(x: Tensor, size: int) -> Tensor:
    """F.adaptive_avg_pool2d(x, size), or under torch's deterministic mode the same bins averaged by
    two matrix products."""
    if not torch.are_deterministic_algorithms_enabled():
        return F.adaptive_avg_pool2d(x, size)
    h, w = x.shape[-2:]
    return _matrix(_pool, h, size, x.device, x.dtype) @ x @ _matrix(_pool, w, size, x.device, x.dtype).T
