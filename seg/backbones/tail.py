"""The trainable tail of a backbone: blocks B..N-1 and the final norm, run on the residual stream a
tap cache stored (the tokens entering block B), so fine-tuning the last blocks never pays the
frozen prefix again."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint


def _attention_kernels() -> contextlib.AbstractContextManager:
    """Under torch's deterministic mode, attention through the math kernel (matmuls and a softmax):
    the fused CUDA attention kernels have no deterministic backward."""
    if torch.are_deterministic_algorithms_enabled():
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class BackboneTail(nn.Module):
    """Blocks `start`..N-1 and the final norm of a DINOv2 or DINOv3 ViT (the modules themselves, not
    copies): tokens entering block `start` [B, T, C] -> normed patch tokens of the last block
    [B, C, Hp, Wp], the feature map a frozen layer cache of the last block holds."""

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        depth = len(model.blocks)
        if not 0 <= start < depth:
            raise ValueError(f"the tail must start at a block in 0..{depth - 1}, got {start}")
        self.start = start
        self.blocks = nn.ModuleList(model.blocks[start:])
        self.norm = model.norm
        self.rope_embed: Optional[nn.Module] = getattr(model, "rope_embed", None)  # DINOv3's RoPE
        self.num_prefix = 1 + model.num_register_tokens
        self.checkpointing = False  # recompute block activations in backward: less memory, ~1/3 more compute

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        hp, wp = grid
        b, t, c = tokens.shape
        if t != self.num_prefix + hp * wp:
            raise ValueError(f"{t} tokens do not make a {wp}x{hp} patch grid plus {self.num_prefix} prefix tokens")
        extra = (self.rope_embed(hp, wp),) if self.rope_embed is not None else ()
        with _attention_kernels():
            for blk in self.blocks:
                if self.checkpointing and self.training and torch.is_grad_enabled():
                    # the recomputation in backward runs outside this block: it gets the same kernels
                    tokens = checkpoint(blk, tokens, *extra, use_reentrant=False,
                                        context_fn=lambda: (_attention_kernels(), _attention_kernels()))
                else:
                    tokens = blk(tokens, *extra)
        patches = self.norm(tokens)[:, self.num_prefix:]
        return patches.reshape(b, hp, wp, c).permute(0, 3, 1, 2).contiguous()  # the layout frozen caches give the head
