"""Segmentation heads: cached tokens -> class logits, and the one path from tokens to logits that
training, evaluation and prediction share (`head_logits`)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from seg.heads.convnext import ConvNeXtHead
from seg.heads.linear import LinearHead
from seg.heads.pmt import PMTHead
from seg.heads.pyramid import PyramidUPerNetHead
from seg.heads.resize import resize_bilinear
from seg.heads.tuned import TunedHead
from seg.heads.upernet import PyramidPooling, UPerNetHead, conv_gn

SCORE_FLOOR = 1e-12  # PMT scores below it are one class's "none here": log stays finite
HEADS = ("convnext", "upernet", "linear", "upernet-ms", "pmt")


def build_head(name: str, in_channels: int, num_classes: int, layers: int = 1,
               ms_fusion: Optional[str] = None, pmt: Optional[dict] = None) -> nn.Module:
    """in_channels = layers x embed_dim of the cached tokens; ms_fusion: the upernet-ms fusion
    (reduce | full; None: reduce); pmt: the mask decoder's shape, `PMTHead.for_backbone`'s keywords
    besides the class count (backbone, embed_dim, grid, num_q, num_blocks, masked_attention)."""
    if name == "pmt":
        if pmt is None:
            raise ValueError("the pmt head needs its shape (backbone, grid, queries, blocks)")
        return PMTHead.for_backbone(num_classes=num_classes, num_levels=layers, **pmt)
    if name == "convnext":
        return ConvNeXtHead(in_channels, num_classes)
    if name == "upernet":
        return UPerNetHead(in_channels, num_classes)
    if name == "linear":
        return LinearHead(in_channels, num_classes)
    if name == "upernet-ms":
        return PyramidUPerNetHead(in_channels, num_classes, layers, fusion=ms_fusion or "reduce")
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {name!r}")


def tokens_to_input(tokens: Tensor) -> Tensor:
    """Cached tokens [B, L, C, Hp, Wp] (float16) -> head input [B, L*C, Hp, Wp] (float32)."""
    b, l, c, h, w = tokens.shape
    return tokens.reshape(b, l * c, h, w).float()


def head_logits(head: nn.Module, tokens: Tensor, out_size: tuple[int, int], amp: Union[bool, torch.dtype, None],
                grid: Optional[tuple[int, int]] = None) -> Tensor:
    """Cached-format tokens -> float32 logits bilinearly upsampled to out_size (H, W).
    The one path used by training, validation, evaluation and prediction. amp: the autocast dtype
    (a run's own: training records it, inference reads it back), True for the device's half type,
    False or None for none. Tap tokens [B, T, C] go through the tuned blocks of a TunedHead first,
    on their patch grid (Hp, Wp). Packed levels [B, L, P + N, C] go through a mask decoder (PMT),
    whose logits are the log of its semantic scores (argmax and softmax are PMT's own; DESIGN)."""
    if tokens.dim() == 4:
        return pmt_logits(mask_predictions(head, tokens, amp, grid), out_size)
    with _autocast(tokens.device, amp):
        if tokens.dim() == 3:
            if grid is None:
                raise ValueError("tap tokens need their patch grid")
            logits = head(tokens.float(), grid)  # the residual stream is float32 in the backbone
        else:
            logits = head(tokens_to_input(tokens))
    # Upsampled in float32, once: the loss reads it without another full-resolution copy.
    return resize_bilinear(logits.float(), out_size)


def mask_predictions(head: nn.Module, tokens: Tensor, amp: Union[bool, torch.dtype, None],
                     grid: Optional[tuple[int, int]] = None) -> tuple[list[Tensor], list[Tensor]]:
    """Packed levels [B, L, P + N, C] -> a mask decoder's (mask logits, class logits) per block, under
    the run's autocast."""
    with _autocast(tokens.device, amp):
        return head(tokens, grid)


def _autocast(device: torch.device, amp: Union[bool, torch.dtype, None]):
    """The heads' autocast: amp is a dtype (a run's own), True (the device's half type) or off."""
    from seg.runtime.device import autocast

    return autocast(device, bool(amp), amp if isinstance(amp, torch.dtype) else None)


def pmt_logits(prediction: tuple[list[Tensor], list[Tensor]], out_size: tuple[int, int]) -> Tensor:
    """The log of PMT's semantic scores of the final prediction [B, K, H, W], float32: the masks
    resized and combined outside autocast."""
    masks, classes = prediction
    scores = PMTHead.semantic_scores(masks[-1].float(), classes[-1].float(), out_size)
    return scores.clamp_min(SCORE_FLOOR).log()


__all__ = ["HEADS", "ConvNeXtHead", "LinearHead", "PMTHead", "PyramidPooling", "PyramidUPerNetHead", "TunedHead", "UPerNetHead",
           "build_head", "conv_gn", "head_logits", "mask_predictions", "pmt_logits",
           "tokens_to_input"]
