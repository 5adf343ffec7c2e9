"""ClassMix on the patch-token grid: DAFormer's cross-domain mix (Hoyer et al., CVPR 2022, after
Olsson et al.'s ClassMix), done on cached tokens instead of pixels.

DAFormer (`get_class_masks`, `generate_class_mask`, `one_mix`): per source image, (n + n % 2) / 2 of
the n values present in the source batch's labels (`torch.unique(labels)` over the whole batch, the
ignore value included: kept as published) are drawn without replacement; the pixels of that image
holding a drawn value come from the source image and its label, every other pixel from the target
image and its pseudo-label. Here the backbone never runs again, so
the mix is made where the cache is: a patch token comes from the source view when at least half of
its pixels hold a drawn value, else from the target view, and the label follows the tokens (each
token's pixels take the label of the view it came from). The tokens keep the context each view's
backbone pass gave them; DESIGN says what that changes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255


def class_masks(labels: Tensor, rng: np.random.Generator) -> Tensor:
    """[B, H, W] labels -> [B, H, W] bool: per sample, the pixels holding one of half the batch's
    values (rounded up), drawn at random for each sample as DAFormer's get_class_masks draws them."""
    masks = []
    values = torch.unique(labels)
    n = len(values)
    for label in labels:
        chosen = values[torch.from_numpy(rng.choice(n, (n + n % 2) // 2, replace=False)).to(values.device)]
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks)


def token_mask(pixel_mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """[B, H, W] bool -> [B, Hp, Wp] bool: a token comes from the source when at least half of the
    pixels it covers are in the mask."""
    return F.adaptive_avg_pool2d(pixel_mask[:, None].float(), grid)[:, 0] >= 0.5


def pixels_of(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, Hp, Wp] bool -> [B, H, W] bool: each pixel takes its token's value (nearest)."""
    return F.interpolate(tokens[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5


def mix_tokens(source: Tensor, target: Tensor, tokens: Tensor) -> Tensor:
    """Source where `tokens` [B, Hp, Wp] is True, else target, in any cached layout: layer tokens
    [B, L, C, Hp, Wp]; packed levels [B, L, P + N, C] or tap tokens [B, P + N, C], patches row-major
    after P prefix tokens (cls, registers), which come from the target view: the image being adapted."""
    b = tokens.shape[0]
    if source.dim() == 5:
        return torch.where(tokens[:, None, None], source, target)
    flat = tokens.reshape(b, -1)
    prefix = source.shape[-2] - flat.shape[1]
    take = torch.cat((flat.new_zeros(b, prefix), flat), dim=1)  # [B, P + N]
    take = take[:, None, :, None] if source.dim() == 4 else take[:, :, None]
    return torch.where(take, source, target)


def mixed_labels(source: Tensor, pseudo: Tensor, from_source: Tensor) -> tuple[Tensor, Tensor]:
    """The mixed image's labels split by origin: (the source's labels on its pixels, ignore elsewhere;
    the pseudo-labels on the target's pixels, ignore elsewhere)."""
    ignore = torch.full_like(source, IGNORE)
    return torch.where(from_source, source, ignore), torch.where(from_source, ignore, pseudo.to(source.dtype))
