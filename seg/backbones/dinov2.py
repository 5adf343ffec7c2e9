"""The DINOv2 vision transformer, written to load the official checkpoints unchanged.

Parameter names, token order and position-embedding interpolation follow the reference
implementation (facebookresearch/dinov2) so that `load_state_dict(strict=True)` works on the
official `.pth` files and outputs match the reference numerically (see tests/test_vit_golden.py).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def block_indices(depth: int, n: Union[int, Sequence[int]]) -> list[int]:
    """Block indices for 'the last n blocks' (int) or an explicit index list."""
    if isinstance(n, int):
        if not 1 <= n <= depth:
            raise ValueError(f"n must be between 1 and {depth}, got {n}")
        return list(range(depth - n, depth))
    idx = [int(i) for i in n]
    bad = [i for i in idx if not 0 <= i < depth]
    if bad:
        raise ValueError(f"layer indices must be in 0..{depth - 1}, got {bad}")
    return idx


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, D


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # SDPA picks the fused (flash / memory-efficient) kernel where one exists for the device.
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """ViT-g's feed-forward: the reference 'swiglufused' layer, hidden size rounded to 8."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float, ffn_layer: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLUFFN(dim, hidden) if ffn_layer == "swiglufused" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with the reference constructor keywords (drop-path and chunking omitted: frozen use)."""

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        init_values: float = 1.0,
        ffn_layer: str = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        super().__init__()
        if ffn_layer not in ("mlp", "swiglufused", "swiglu"):
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglufused', got {ffn_layer!r}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused when frozen; kept for strict loading
        ffn = "swiglufused" if ffn_layer.startswith("swiglu") else "mlp"
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, init_values, ffn) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        hp, wp = height // self.patch_size, width // self.patch_size
        n = self.pos_embed.shape[1] - 1
        if hp * wp == n and hp == wp:
            return self.pos_embed.to(dtype)
        m = int(math.sqrt(n))
        pos = self.pos_embed.float()
        patch_pos = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            # The reference's quirk: a scale factor with a small offset, not a target size.
            kwargs = {"scale_factor": ((hp + self.interpolate_offset) / m, (wp + self.interpolate_offset) / m)}
        else:
            kwargs = {"size": (hp, wp)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **kwargs)
        if patch_pos.shape[-2:] != (hp, wp):
            raise RuntimeError(f"position embedding interpolated to {tuple(patch_pos.shape[-2:])}, expected {(hp, wp)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, hp * wp, -1)
        return torch.cat((pos[:, :1], patch_pos), dim=1).to(dtype)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input sides must be multiples of {self.patch_size}, got {w}x{h}")
        # As in the reference, the embeddings are added in float32 even under autocast: concatenating
        # the float32 cls token promotes the (bf16) patch embedding, and the residual stream stays float32.
        tokens = self.patch_embed(x).float()
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1).float(), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h, w, torch.float32)
        if self.register_tokens is not None:
            # Registers are inserted after the position embedding is added: they get none.
            regs = self.register_tokens.expand(tokens.shape[0], -1, -1).float()
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        tokens = self.prepare_tokens(x)
        for blk in self.blocks:
            tokens = blk(tokens)
        normed = self.norm(tokens)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : r + 1],
            "x_norm_patchtokens": normed[:, r + 1 :],
            "x_prenorm": tokens,
            "masks": None,
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["x_norm_clstoken"]

    def resolve_layers(self, n: Union[int, Sequence[int]]) -> list[int]:
        return block_indices(len(self.blocks), n)

    def tokens_entering(self, x: Tensor, block: int) -> Tensor:
        """The un-normed residual stream entering `block`: all tokens (cls, registers, patches)."""
        tokens = self.prepare_tokens(x)
        for blk in self.blocks[:block]:
            tokens = blk(tokens)
        return tokens

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
        return_prefix_tokens: bool = False,
    ) -> tuple:
        take = self.resolve_layers(n)
        last = max(take)
        tokens = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks[: last + 1]):  # later blocks cannot change what we return
            tokens = blk(tokens)
            if i in take:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(o) for o in outputs]
        cls_tokens = [o[:, 0] for o in outputs]
        prefix = [o[:, : 1 + self.num_register_tokens] for o in outputs]
        outputs = [o[:, 1 + self.num_register_tokens :] for o in outputs]
        if reshape:
            b, _, h, w = x.shape
            p = self.patch_size
            outputs = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in outputs]
        if return_prefix_tokens:  # cls and registers, [B, 1 + R, C], normed like the patches
            return tuple(zip(outputs, prefix))
        if return_class_token:
            return tuple(zip(outputs, cls_tokens))
        return tuple(outputs)
