"""What a cache stores for a batch of images: the one definition shared by extraction and by
evaluation and prediction from images, so that both see the same numbers."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from seg.runtime.device import autocast


def pack_levels(patches: Tensor, prefix: Tensor) -> Tensor:
    """Layer tokens [B, L, C, Hp, Wp] and their prefix tokens [B, L, P, C] -> whole token sequences
    [B, L, P + Hp * Wp, C] (prefix first, patches row-major): the levels a mask decoder (PMT) reads."""
    return torch.cat((prefix.to(patches.dtype), patches.flatten(3).transpose(2, 3)), dim=2)


def backbone_features(model: nn.Module, x: Tensor, layers: Sequence[int], tap_block: Optional[int],
                      device: torch.device, dtype: torch.dtype, prefix: bool = False, levels: bool = False
                      ) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Normalised images [B, 3, H, W] -> unrounded features, computed in `dtype`: the normed patch
    tokens of `layers` [B, L, C, Hp, Wp], or with `tap_block`, the un-normed residual stream entering
    that block, all tokens [B, T, C]. The cache stores them as float16 (`.to(torch.float16)`).
    With `prefix` (layers only): also the layers' prefix tokens (cls, registers), normed like the
    patches, [B, L, P, C]. With `levels`: the two packed into one tensor (`pack_levels`)."""
    with autocast(device, dtype=dtype):
        if tap_block is not None:
            return model.tokens_entering(x, tap_block)
        if prefix or levels:
            pairs = model.get_intermediate_layers(x, n=list(layers), reshape=True, norm=True,
                                                  return_prefix_tokens=True)
            patches, tokens = torch.stack([p for p, _ in pairs], dim=1), torch.stack([t for _, t in pairs], dim=1)
            return pack_levels(patches, tokens) if levels else (patches, tokens)
        return torch.stack(model.get_intermediate_layers(x, n=list(layers), reshape=True, norm=True), dim=1)


def cast_matmul_weights_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the Linear and Conv2d weights of a frozen backbone in the half-precision compute dtype
    once, instead of autocast casting every weight on every forward (in inference mode autocast keeps
    no cast cache). The features are bit-identical: autocast rounds these same tensors the same way,
    and everything it keeps in float32 (norms, layer scales, embeddings) stays float32."""
    if dtype in (torch.bfloat16, torch.float16):
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.to(dtype)
    return model
