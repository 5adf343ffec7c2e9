"""PMT's plain mask decoder (Cavagnero et al., tue-mps/pmt `image/models/pmd.py`), term by term.

Levels (already BatchNorm-ed) -> per level a residual MLP lateral projection (C -> C/2 -> C) and a
per-channel scaler, summed; Q learned queries prepended; `num_blocks` transformer blocks with 2-D
RoPE on the patch tokens. Before each block (with masked attention) and after the last, the
LayerNorm-ed tokens give class logits (K + 1, the last "no object") from the queries and mask
logits = MLP(queries) . upscaled patch grid. Masked attention lets query q see patch p only where
q's previous mask logit, bilinearly resized to the grid, is > 0; each block's mask is dropped per
query with probability 1 - attn_mask_probs[block] (annealed from 1 to 0 during training).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.heads.pmt.blocks import DecoderBlock, ScaleBlock


class PlainMaskDecoder(nn.Module):
    def __init__(self, embed_dim: int, hidden_dim: Optional[int], num_prefix_tokens: int, grid: tuple[int, int],
                 patch_size: int, num_classes: int, num_q: int, num_blocks: int, num_levels: int,
                 num_heads: int, masked_attention: bool = True) -> None:
        super().__init__()
        self.num_prefix_tokens, self.grid, self.num_q = num_prefix_tokens, tuple(grid), num_q
        self.num_blocks, self.masked_attention = num_blocks, masked_attention
        self.register_buffer("attn_mask_probs", torch.ones(num_blocks))
        self.lateral_projections = nn.ModuleList(
            nn.Sequential(nn.Linear(embed_dim, embed_dim // 2), nn.GELU(), nn.Linear(embed_dim // 2, embed_dim))
            for _ in range(num_levels))
        self.scalers = nn.ParameterList(nn.Parameter(torch.ones(embed_dim)) for _ in range(num_levels))
        self.q = nn.Embedding(num_q, embed_dim)
        self.blocks = nn.ModuleList(DecoderBlock(embed_dim, hidden_dim, num_heads) for _ in range(num_blocks))
        self.decoder_norm = nn.LayerNorm(embed_dim)
        self.upscale = nn.Sequential(*[ScaleBlock(embed_dim) for _ in range(upscale_steps(patch_size))])
        self.mask_head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim),
                                       nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.class_head = nn.Linear(embed_dim, num_classes + 1)

    def predict(self, x: Tensor, grid: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
        """LayerNorm-ed tokens [B, Q + P + N, C] -> (mask logits [B, Q, h, w], class logits [B, Q, K + 1])."""
        q = x[:, : self.num_q]
        patches = x[:, self.num_q + self.num_prefix_tokens:]
        feats = patches.transpose(1, 2).reshape(x.shape[0], -1, *(grid or self.grid))
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_head(q), self.upscale(feats))
        return masks, self.class_head(q)

    def attention_mask(self, tokens: int, mask_logits: Tensor, block: int,
                       grid: Optional[tuple[int, int]] = None) -> Tensor:
        """[B, T, T] bool, True = may attend."""
        b = mask_logits.shape[0]
        allowed = torch.ones(b, tokens, tokens, dtype=torch.bool, device=mask_logits.device)
        on_grid = F.interpolate(mask_logits, grid or self.grid, mode="bilinear").flatten(2)
        first_patch = self.num_q + self.num_prefix_tokens
        allowed[:, : self.num_q, first_patch:] = on_grid > 0
        prob = self.attn_mask_probs[block]
        if prob < 1:  # drop the mask of each query with probability 1 - prob
            dropped = torch.rand(b, self.num_q, device=allowed.device) > prob
            allowed[:, : self.num_q, first_patch:][dropped] = True
        return allowed

    def forward(self, levels: list[Tensor], rope: Optional[tuple[Tensor, Tensor]],
                masked: Optional[bool] = None, grid: Optional[tuple[int, int]] = None
                ) -> tuple[list[Tensor], list[Tensor]]:
        """levels: BatchNorm-ed [B, P + N, C] each, on `grid` (None: the decoder's own). masked: None
        follows the decoder's setting, False runs without masks and predicts once (evaluation after
        annealing)."""
        masked = self.masked_attention if masked is None else masked
        x = torch.stack([(f + proj(f)) * scale for f, proj, scale in
                         zip(levels, self.lateral_projections, self.scalers)]).sum(0)
        x = torch.cat((self.q.weight[None].expand(x.shape[0], -1, -1), x), dim=1)
        masks_out, classes_out = [], []
        mask = None
        for i, block in enumerate(self.blocks):
            if masked:
                mask_logits, class_logits = self.predict(self.decoder_norm(x), grid)
                masks_out.append(mask_logits)
                classes_out.append(class_logits)
                mask = self.attention_mask(x.shape[1], mask_logits, i, grid)
            x = block(x, mask, rope)
        mask_logits, class_logits = self.predict(self.decoder_norm(x), grid)
        return masks_out + [mask_logits], classes_out + [class_logits]


def upscale_steps(patch_size: int) -> int:
    """ScaleBlocks that bring the patch grid to a quarter of the image: log2(patch) - 2, at least 1
    (patch 14: 1, i.e. 2x; patch 16: 2, i.e. 4x)."""
    return max(1, int(math.log2(patch_size)) - 2)
