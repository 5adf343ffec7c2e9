"""OpenCV's bilinear uint8 resize (`cv2.resize(..., INTER_LINEAR)`, what `seg predict` and extraction
apply through albumentations) in integer torch ops an ONNX graph can hold, for inputs of any size.

OpenCV resizes uint8 images in fixed point: per output column, the source column
sx = floor((dx + 0.5) * W / w - 0.5) (in float32 from a double product) and the weights
round((1 - fx) * 2048), round(fx * 2048), clamped at the borders; a horizontal pass in int32; then a
vertical pass as its vectorised kernel computes it, ((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16),
rounded by (t + 2) >> 2. The shifts are float64 divisions by powers of two, floored: exact for these
integers (< 2^27), where torch's integer division is exported through float32, which rounds past 2^24.
Checked value for value against cv2 for downscaling and exact 2x (tests); upscaling matches cv2 on
all but 0.07-0.16 % of values (by 1): OpenCV's upscaling path rounds differently there, not pinned down.
"""

from __future__ import annotations

import torch
from torch import Tensor

COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE


def source_taps(n_in, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(first source index, second source index, first weight, second weight), int64 [n_out] each."""
    d = torch.arange(n_out, dtype=torch.float64, device=device)
    # n_in as a float64 tensor: an exporter turns `n_in / n_out` of a dynamic size into float32 division,
    # which moves some taps; counting in float64 keeps OpenCV's double-precision scale
    scale = torch.ones(n_in, dtype=torch.float64, device=device).sum() / n_out
    f = ((d + 0.5) * scale - 0.5).to(torch.float32)
    s = torch.floor(f)
    f = f - s
    s = s.to(torch.int64)
    below = s < 0
    above = s >= n_in - 1
    f = torch.where(below | above, torch.zeros_like(f), f)
    s = torch.where(below, torch.zeros_like(s), s)
    s = torch.where(above, torch.full_like(s, 0) + (n_in - 1), s)
    s1 = torch.minimum(s + 1, torch.full_like(s, 0) + (n_in - 1))
    a0 = torch.round((1 - f) * COEF_SCALE).to(torch.int64)
    a1 = torch.round(f * COEF_SCALE).to(torch.int64)
    return s, s1, a0, a1


def _shift(x: Tensor, bits: int) -> Tensor:
    """x >> bits for non-negative int64 x below 2^53, in ops every exporter keeps exact."""
    return torch.floor(x.to(torch.float64) / float(1 << bits)).to(torch.int64)


def resize_uint8(images: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, h, w, 3] as cv2.resize(image, (w, h), INTER_LINEAR)."""
    h, w = size
    x0, x1, a0, a1 = source_taps(images.shape[2], w, images.device)
    y0, y1, b0, b1 = source_taps(images.shape[1], h, images.device)
    px = images.to(torch.int64)
    rows = px.index_select(2, x0) * a0[None, None, :, None] + px.index_select(2, x1) * a1[None, None, :, None]
    top, bottom = _shift(rows.index_select(1, y0), 4), _shift(rows.index_select(1, y1), 4)
    t = _shift(b0[None, :, None, None] * top, 16) + _shift(b1[None, :, None, None] * bottom, 16)
    return _shift(t + 2, 2).clamp(0, 255).to(torch.uint8)
