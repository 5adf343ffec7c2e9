"""The DINOv3 vision transformer, written to load the official checkpoints unchanged.

Constructor keywords, parameter names, token order and numerics follow the reference
(facebookresearch/dinov3, models/vision_transformer.py and layers/): patch 16, axial RoPE on the
patch tokens (coordinates normalised per axis to [-1, 1]; the training-only shift, jitter and
rescale of the coordinates are never applied here), cls + storage tokens before the patches,
LayerNorm eps 1e-5, LayerScale, and a qkv bias whose key third is masked to zero by the
`bias_mask` buffer. Outputs match the reference to ~1e-6 (tests/test_dinov3_golden.py).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.backbones.dinov2 import LayerScale, block_indices


class RopePositionEmbedding(nn.Module):
    """(sin, cos) [h*w, head_dim] of axial rotary embeddings for an h x w patch grid."""

    def __init__(self, embed_dim: int, num_heads: int, base: float = 100.0, normalize_coords: str = "separate",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if normalize_coords not in ("separate", "min", "max"):
            raise ValueError(f"normalize_coords must be separate, min or max, got {normalize_coords!r}")
        head_dim = embed_dim // num_heads
        self.normalize_coords, self.dtype = normalize_coords, dtype
        periods = base ** (2 * torch.arange(head_dim // 4, dtype=dtype) / (head_dim // 2))
        self.register_buffer("periods", periods, persistent=True)

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "separate":
            dh, dw = h, w
        else:
            dh = dw = max(h, w) if self.normalize_coords == "max" else min(h, w)
        coords_h = torch.arange(0.5, h, **dd) / dh
        coords_w = torch.arange(0.5, w, **dd) / dw
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0
        angles = 2 * math.pi * coords[:, :, None] / self.periods.to(self.dtype)[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate the last sin.shape[0] tokens of x [B, heads, N, d]; the prefix (cls, storage) is left alone.
    Computed in the rope's dtype (float32), then cast back."""
    prefix = x.shape[-2] - sin.shape[-2]
    rotated = x[:, :, prefix:].to(sin.dtype)
    rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat([x[:, :, :prefix], rotated.to(x.dtype)], dim=-2)


class MaskedBiasLinear(nn.Linear):
    """qkv projection whose bias is multiplied by `bias_mask` (1 for q and v, 0 for k)."""

    def __init__(self, dim: int, out: int, bias: bool = True) -> None:
        super().__init__(dim, out, bias=bias)
        mask = torch.ones(out)
        mask[dim:2 * dim] = 0
        self.register_buffer("bias_mask", mask, persistent=True)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * self.bias_mask.to(self.bias.dtype)
        return F.linear(x, self.weight, bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool, mask_k_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = MaskedBiasLinear(dim, 3 * dim, qkv_bias) if mask_k_bias else nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the reference's nn.GELU()


class SwiGLU(nn.Module):
    """The "plus" models' feed-forward: w3(silu(w1 x) * w2 x), hidden 2/3 of ffn_ratio x dim, rounded up to 8."""

    def __init__(self, dim: int, hidden: int, bias: bool, align_to: int = 8) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + align_to - 1) // align_to * align_to
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_ratio: float, ffn_layer: str, layerscale_init: float,
                 qkv_bias: bool, proj_bias: bool, ffn_bias: bool, mask_k_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, mask_k_bias)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        hidden = int(dim * ffn_ratio)
        self.mlp = SwiGLU(dim, hidden, ffn_bias) if ffn_layer.startswith("swiglu") else Mlp(dim, hidden, ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init)

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV3VisionTransformer(nn.Module):
    """DINOv3 ViT with the reference constructor keywords (training-only options accepted and unused)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        pos_embed_rope_base: float = 100.0,
        pos_embed_rope_min_period: Optional[float] = None,
        pos_embed_rope_max_period: Optional[float] = None,
        pos_embed_rope_normalize_coords: str = "separate",
        pos_embed_rope_shift_coords: Optional[float] = None,   # training only
        pos_embed_rope_jitter_coords: Optional[float] = None,  # training only
        pos_embed_rope_rescale_coords: Optional[float] = None,  # training only
        pos_embed_rope_dtype: str = "fp32",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,                        # training only
        layerscale_init: Optional[float] = 1e-5,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        ffn_bias: bool = True,
        proj_bias: bool = True,
        n_storage_tokens: int = 4,
        mask_k_bias: bool = True,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        **unused,
    ) -> None:
        super().__init__()
        if pos_embed_rope_min_period is not None or pos_embed_rope_max_period is not None:
            raise ValueError("RoPE min/max periods are not supported (no published DINOv3 backbone uses them)")
        if untie_cls_and_patch_norms or untie_global_and_local_cls_norm:
            raise ValueError("untied cls/patch norms are not supported (no published DINOv3 backbone uses them)")
        if ffn_layer not in ("mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128"):
            raise ValueError(f"ffn_layer must be mlp or swiglu, got {ffn_layer!r}")
        if norm_layer not in ("layernorm", "layernormbf16"):
            raise ValueError(f"norm_layer must be layernorm or layernormbf16, got {norm_layer!r}")
        if pos_embed_rope_dtype not in ("fp32", "bf16"):
            raise ValueError(f"pos_embed_rope_dtype must be fp32 or bf16, got {pos_embed_rope_dtype!r}")
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.n_storage_tokens = n_storage_tokens
        self.num_register_tokens = n_storage_tokens  # the name the rest of seg uses for DINOv2's registers
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim)) if n_storage_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        rope_dtype = torch.float32 if pos_embed_rope_dtype == "fp32" else torch.bfloat16
        self.rope_embed = RopePositionEmbedding(embed_dim, num_heads, pos_embed_rope_base,
                                                pos_embed_rope_normalize_coords, rope_dtype)
        ffn = "swiglu" if ffn_layer.startswith("swiglu") else "mlp"
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, ffn_ratio, ffn, layerscale_init if layerscale_init is not None else 1.0,
                  qkv_bias, proj_bias, ffn_bias, mask_k_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def prepare_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input sides must be multiples of {self.patch_size}, got {w}x{h}")
        patches = self.patch_embed.proj(x)
        hp, wp = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        b = patches.shape[0]
        cls = (self.cls_token + 0 * self.mask_token).expand(b, -1, -1)  # the reference's unmasked cls
        parts = [cls] + ([self.storage_tokens.expand(b, -1, -1)] if self.storage_tokens is not None else [])
        # float32 even under autocast, as the reference's concatenation with its float32 tokens promotes
        return torch.cat([*(p.float() for p in parts), patches.float()], dim=1), (hp, wp)

    def _run(self, x: Tensor, take: Sequence[int]) -> list[Tensor]:
        tokens, (hp, wp) = self.prepare_tokens(x)
        rope = self.rope_embed(hp, wp)
        out = []
        for i, blk in enumerate(self.blocks[: max(take) + 1]):
            tokens = blk(tokens, rope)
            if i in take:
                out.append(tokens)
        return out

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        tokens = self._run(x, [len(self.blocks) - 1])[0]
        normed = self.norm(tokens)
        s = self.n_storage_tokens
        return {"x_norm_clstoken": normed[:, 0], "x_storage_tokens": normed[:, 1:s + 1],
                "x_norm_patchtokens": normed[:, s + 1:], "x_prenorm": tokens, "masks": None}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["x_norm_clstoken"]

    def resolve_layers(self, n: Union[int, Sequence[int]]) -> list[int]:
        return block_indices(len(self.blocks), n)

    def tokens_entering(self, x: Tensor, block: int) -> Tensor:
        """The un-normed residual stream entering `block`: all tokens (cls, storage tokens, patches)."""
        tokens, (hp, wp) = self.prepare_tokens(x)
        rope = self.rope_embed(hp, wp)
        for blk in self.blocks[:block]:
            tokens = blk(tokens, rope)
        return tokens

    def get_intermediate_layers(self, x: Tensor, n: Union[int, Sequence[int]] = 1, reshape: bool = False,
                                return_class_token: bool = False, return_extra_tokens: bool = False,
                                norm: bool = True, return_prefix_tokens: bool = False) -> tuple:
        take = self.resolve_layers(n)
        outputs = self._run(x, take)
        if norm:
            outputs = [self.norm(o) for o in outputs]
        s = self.n_storage_tokens
        cls = [o[:, 0] for o in outputs]
        extra = [o[:, 1:s + 1] for o in outputs]
        patches = [o[:, s + 1:] for o in outputs]
        if reshape:
            b, _, h, w = x.shape
            p = self.patch_size
            patches = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        if return_prefix_tokens:  # cls and storage tokens, [B, 1 + S, C], normed like the patches
            return tuple(zip(patches, [o[:, : s + 1] for o in outputs]))
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, cls, extra))
        if return_class_token:
            return tuple(zip(patches, cls))
        if return_extra_tokens:
            return tuple(zip(patches, extra))
        return tuple(patches)
