"""Sliding-window inference: logits of an image of any size from windows of the training size.

Windows start every `stride` pixels and the last one is flush with the far edge (mmseg's grid), so
every pixel is covered; overlapping logits are averaged. An image smaller than the window is
padded with zeros (the mean colour after normalisation) and the padding cropped away. Memory is
bounded by `batch` windows, not by the image.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one side."""
    if size <= window:
        return [0]
    n = (size - window + stride - 1) // stride + 1
    return [min(i * stride, size - window) for i in range(n)]


def default_stride(window: tuple[int, int]) -> tuple[int, int]:
    """2/3 of the window, as mmseg's DINOv2 configs (512 -> 341)."""
    return max(1, round(window[0] * 2 / 3)), max(1, round(window[1] * 2 / 3))


def slide_logits(x: Tensor, window: tuple[int, int], stride: tuple[int, int],
                 logits_fn: Callable[[Tensor], Tensor], batch: int = 4) -> Tensor:
    """x [1, 3, H, W] -> mean logits [1, K, H, W]; logits_fn maps windows [n, 3, h, w] to [n, K, h, w]."""
    h, w = window
    H, W = x.shape[-2:]
    x = F.pad(x, (0, max(0, w - W), 0, max(0, h - H)))
    Hp, Wp = x.shape[-2:]
    boxes = [(y, x0) for y in window_starts(Hp, h, stride[0]) for x0 in window_starts(Wp, w, stride[1])]
    total = counts = None
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        out = logits_fn(torch.cat([x[..., y:y + h, x0:x0 + w] for y, x0 in chunk]))
        if total is None:
            total = torch.zeros(1, out.shape[1], Hp, Wp, dtype=out.dtype, device=out.device)
            counts = torch.zeros(1, 1, Hp, Wp, dtype=out.dtype, device=out.device)
        for (y, x0), o in zip(chunk, out):
            total[0, :, y:y + h, x0:x0 + w] += o
            counts[0, :, y:y + h, x0:x0 + w] += 1
    return (total / counts)[..., :H, :W]
