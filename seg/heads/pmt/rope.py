"""2-D rotary position embedding of the patch tokens, as PMT's decoder (and DINOv3) computes it.

Patch centres on a (h, w) grid are placed in [-1, 1] per axis; each head's channels are split into
a y half and an x half of `head_dim / 4` frequencies, `theta ** -(4 i / head_dim)`; the angles are
2 pi x coordinate x frequency, tiled twice. Prefix tokens (queries, cls, registers) are not rotated.
During training PMT multiplies the coordinates by one log-uniform factor in [1/rescale, rescale].
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def patch_centres(h: int, w: int, device: Optional[torch.device] = None) -> Tensor:
    """[h * w, 2] (y, x) centres of the patches of an h x w grid, in [-1, 1], row-major."""
    ys = (torch.arange(0.5, h, dtype=torch.float32, device=device) / h)
    xs = (torch.arange(0.5, w, dtype=torch.float32, device=device) / w)
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coords - 1.0


def random_rescale(coords: Tensor, rescale: float) -> Tensor:
    """Coordinates times one factor drawn log-uniformly in [1/rescale, rescale] (one draw of the
    global torch generator, as PMT's training draws it)."""
    span = math.log(rescale)
    factor = torch.empty(1, device=coords.device, dtype=coords.dtype).uniform_(-span, span).exp()
    return coords * factor


def rope_tables(grid: tuple[int, int], head_dim: int, theta: float = 100.0, rescale: Optional[float] = None,
                device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """(cos, sin), each [h * w, head_dim], float32."""
    coords = patch_centres(*grid, device=device)
    if rescale is not None:
        coords = random_rescale(coords, rescale)
    inv_freq = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=device)
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)
    return torch.cos(angles), torch.sin(angles)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_patches(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q, k [B, heads, T, head_dim] with the patch tokens last: rotate those, keep the rest."""
    patches = cos.shape[-2]
    prefix = q.shape[-2] - patches
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)

    def rotate(t: Tensor) -> Tensor:
        head, tail = t.split((prefix, patches), dim=-2)
        return torch.cat((head, tail * cos + _rotate_half(tail) * sin), dim=-2)

    return rotate(q), rotate(k)
