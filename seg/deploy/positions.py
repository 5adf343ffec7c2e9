"""Position information fixed for one input size, so an exported graph holds it as constants instead
of the bicubic (antialiased) interpolation or RoPE arithmetic that exporters translate badly."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FixedPositionEmbedding(nn.Module):
    """Stands in for DINOv2's `interpolate_pos_encoding`: the embedding it gave for one input size."""

    def __init__(self, embedding: Tensor, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("embedding", embedding.detach().clone(), persistent=False)

    def forward(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        if (height, width) != self.size:
            raise ValueError(f"positions were fixed for {self.size[1]}x{self.size[0]}, got {width}x{height}")
        return self.embedding.to(dtype)


class FixedRope(nn.Module):
    """Stands in for DINOv3's `rope_embed`: the (sin, cos) it gave for one patch grid."""

    def __init__(self, sin: Tensor, cos: Tensor, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("sin", sin.detach().clone(), persistent=False)
        self.register_buffer("cos", cos.detach().clone(), persistent=False)

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        if (h, w) != self.grid:
            raise ValueError(f"RoPE was fixed for a {self.grid[1]}x{self.grid[0]} grid, got {w}x{h}")
        return self.sin, self.cos


@torch.no_grad()
def fix_positions_(module: nn.Module, size: tuple[int, int], patch: int) -> int:
    """Replace, in place, every position source under `module` (backbones and tuned tails) by its
    values for input size (H, W). Returns how many were fixed."""
    h, w = size
    fixed = 0
    for sub in list(module.modules()):
        if hasattr(sub, "pos_embed") and hasattr(sub, "interpolate_pos_encoding") \
                and not isinstance(sub.interpolate_pos_encoding, FixedPositionEmbedding):
            sub.fixed_positions = FixedPositionEmbedding(sub.interpolate_pos_encoding(h, w, torch.float32), (h, w))
            # A submodule assigned under a method's name would stay hidden behind the class's method
            # (nn.Module looks in _modules only when normal lookup fails); the instance dict wins.
            sub.__dict__["interpolate_pos_encoding"] = sub.fixed_positions
            fixed += 1
        rope = getattr(sub, "rope_embed", None)
        if rope is not None and not isinstance(rope, FixedRope):
            sin, cos = rope(h // patch, w // patch)
            sub.rope_embed = FixedRope(sin, cos, (h // patch, w // patch))
            fixed += 1
    return fixed
