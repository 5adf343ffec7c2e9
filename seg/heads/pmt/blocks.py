"""The building blocks of PMT's plain mask decoder: a DINOv3-style transformer block (LayerNorm,
attention with separate q/k/v/o projections and no key bias, layer scale, GELU MLP) and the
ScaleBlock that doubles the patch grid for the mask features. Attribute names follow the
official modules so that a PMT checkpoint loads by name."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.heads.pmt.rope import rotate_patches


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Optional[Tensor], rope: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        b, t, _ = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if rope is not None:
            q, k = rotate_patches(q, k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LayerScale(nn.Module):
    def __init__(self, dim: int, value: float = 1.0) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.lambda1


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act_fn = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, hidden: Optional[int], num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, num_heads)
        self.layer_scale1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim if hidden is None else hidden)
        self.layer_scale2 = LayerScale(dim)

    def forward(self, x: Tensor, mask: Optional[Tensor], rope: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        if mask is not None:  # [B, T, T] -> one mask for every head
            mask = mask[:, None].expand(-1, self.attention.num_heads, -1, -1)
        x = x + self.layer_scale1(self.attention(self.norm1(x), mask, rope))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] (timm's, eps 1e-6)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ScaleBlock(nn.Module):
    """2x2 transposed conv (stride 2), GELU, depthwise 3x3 without bias, LayerNorm2d."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))
