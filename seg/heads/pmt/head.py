"""`PMTHead`: PMT's plain mask decoder on frozen encoder levels, as seg trains it from a cache.

The head owns what PMT puts between the frozen encoder and its decoder: a BatchNorm over channels
per level (`bn.<level>`; SyncBatchNorm under torchrun, by the trainer's conversion) and the RoPE
tables of the patch grid. `decode` is PMT's forward from the levels on; `semantic_scores` turns a
prediction into per-class scores (sum over queries of sigmoid(mask) x softmax(class) without
no-object).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seg.backbones.named import backbone_kwargs, prefix_count
from seg.heads.pmt.decoder import PlainMaskDecoder
from seg.heads.pmt.rope import rope_tables

ROPE_THETA = 100.0
ROPE_RESCALE = 2.0        # training: coordinates x a log-uniform factor in [1/2, 2]
SCORE_CHUNK = 16          # queries resized to full resolution at a time (memory: DESIGN section 8)


def official_head_weights(state_dict: dict) -> dict:
    """The head's own tensors of a PMT state dict: keys `decoder.*` and `bn.<level>.*`, with the
    checkpoint's `network.` prefix and torch.compile's `._orig_mod` removed as PMT's own loader
    removes them; the encoder's and the criterion's keys are left out."""
    own = {}
    for key, value in state_dict.items():
        key = key.replace("._orig_mod", "")
        key = key[len("network."):] if key.startswith("network.") else key
        if key.startswith(("decoder.", "bn.")):
            own[key] = value
    return own


class PMTHead(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, *, num_heads: int, num_prefix_tokens: int, patch_size: int,
                 grid: tuple[int, int], num_levels: int = 4, num_q: int = 100, num_blocks: int = 4,
                 hidden_dim: Optional[int] = None, masked_attention: bool = True, level_bn: bool = True) -> None:
        super().__init__()
        self.num_heads, self.num_prefix_tokens = num_heads, num_prefix_tokens
        self.bn = nn.ModuleList(nn.BatchNorm1d(embed_dim) for _ in range(num_levels)) if level_bn else None
        self.decoder = PlainMaskDecoder(embed_dim, hidden_dim, num_prefix_tokens, grid, patch_size, num_classes,
                                        num_q, num_blocks, num_levels, num_heads, masked_attention)

    @classmethod
    def for_backbone(cls, backbone: str, embed_dim: int, grid: tuple[int, int], num_classes: int, *,
                     num_levels: int = 4, num_q: int = 100, num_blocks: int = 6, masked_attention: bool = True
                     ) -> "PMTHead":
        """The head PMT's configs build for a named encoder: its heads, patch and prefix tokens, an
        MLP as wide as the encoder (hidden_dim: ViT-S 384, ViT-B 768, ViT-L 1024)."""
        kw = backbone_kwargs(backbone)
        return cls(embed_dim, num_classes, num_heads=kw["num_heads"], num_prefix_tokens=prefix_count(backbone),
                   patch_size=kw["patch_size"], grid=grid, num_levels=num_levels, num_q=num_q,
                   num_blocks=num_blocks, hidden_dim=embed_dim, masked_attention=masked_attention)

    @classmethod
    def from_official(cls, state_dict: dict, *, num_heads: int, num_prefix_tokens: int, patch_size: int,
                      grid: tuple[int, int], masked_attention: bool) -> "PMTHead":
        """The head of a PMT checkpoint (`official_head_weights`), every size read from its tensors,
        loaded strictly."""
        own = official_head_weights(state_dict)
        if "decoder.q.weight" not in own:
            raise ValueError("not a PMT checkpoint: no decoder.q.weight")
        num_q, embed_dim = own["decoder.q.weight"].shape
        count = lambda pattern: len({m.group(1) for k in own if (m := re.match(pattern, k))})  # noqa: E731
        head = cls(embed_dim, own["decoder.class_head.weight"].shape[0] - 1, num_heads=num_heads,
                   num_prefix_tokens=num_prefix_tokens, patch_size=patch_size, grid=grid,
                   num_levels=count(r"decoder\.scalers\.(\d+)$"), num_q=num_q,
                   num_blocks=count(r"decoder\.blocks\.(\d+)\."),
                   hidden_dim=own["decoder.blocks.0.mlp.up_proj.weight"].shape[0],
                   masked_attention=masked_attention, level_bn=any(k.startswith("bn.") for k in own))
        head.load_state_dict(own, strict=True)
        return head

    @property
    def grid(self) -> tuple[int, int]:
        return self.decoder.grid

    def rope(self, grid: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
        head_dim = self.decoder.q.weight.shape[1] // self.num_heads
        device = self.decoder.q.weight.device
        return rope_tables(grid or self.grid, head_dim, ROPE_THETA, ROPE_RESCALE if self.training else None, device)

    def decode(self, levels: Sequence[Tensor], masked: Optional[bool] = None,
               grid: Optional[tuple[int, int]] = None) -> tuple[list[Tensor], list[Tensor]]:
        """levels: the encoder levels [B, prefix + patches, C] (before the BatchNorm) on `grid` (None:
        the head's own) -> (mask logits [B, Q, h, w], class logits [B, Q, K + 1]) per masked block and
        after the last."""
        if self.bn is not None:
            levels = [bn(f.transpose(1, 2)).transpose(1, 2) for f, bn in zip(levels, self.bn)]
        return self.decoder(list(levels), self.rope(grid), masked, grid)

    def forward(self, tokens: Tensor, grid: Optional[tuple[int, int]] = None) -> tuple[list[Tensor], list[Tensor]]:
        """Packed levels [B, L, prefix + patches, C] (`seg.backbones.features.pack_levels`) -> `decode`:
        in training every block's prediction with the annealed masks; in evaluation the blocks without
        masks and the final prediction only (what PMT computes once annealing has dropped every mask)."""
        return self.decode(list(tokens.float().unbind(1)), None if self.training else False, grid)

    @staticmethod
    def semantic_scores(mask_logits: Union[Tensor, list[Tensor]], class_logits: Union[Tensor, list[Tensor]],
                        size: tuple[int, int]) -> Tensor:
        """[B, K, H, W]: sum over queries of sigmoid(mask resized bilinearly to size) x softmax(class)
        without no-object; a prediction list stands for its last (final) entry. Queries are resized
        SCORE_CHUNK at a time, so a large image never holds all Q masks at full resolution."""
        masks = mask_logits[-1] if isinstance(mask_logits, (list, tuple)) else mask_logits
        classes = class_logits[-1] if isinstance(class_logits, (list, tuple)) else class_logits
        probs = classes.softmax(-1)[..., :-1]
        scores = None
        for q0 in range(0, masks.shape[1], SCORE_CHUNK):
            part = F.interpolate(masks[:, q0:q0 + SCORE_CHUNK], size, mode="bilinear").sigmoid()
            term = torch.einsum("bqhw,bqc->bchw", part, probs[:, q0:q0 + SCORE_CHUNK])
            scores = term if scores is None else scores + term
        return scores
