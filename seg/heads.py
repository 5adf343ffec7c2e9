"""The two segmentation heads (DESIGN.md section 2). They map cached tokens to class logits
on the patch grid; the trainer upsamples the logits to the mask size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEADS = ("convnext", "upernet")


class ConvNeXtHead(nn.Module):
    """Phases 1 and 2: Conv3x3(C,256)-BN-GELU-Conv3x3(256,256)-BN-GELU-Conv1x1(256,K)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU(),
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x))


def conv_gn(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv + GroupNorm(32) + GELU. GroupNorm, because BatchNorm fails on the 1x1 pooled map."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.GroupNorm(32, cout), nn.GELU(),
    )


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: pool to each scale, 1x1 conv, upsample back."""

    def __init__(self, channels: int, scales: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.scales = scales
        self.convs = nn.ModuleList(conv_gn(channels, channels) for _ in scales)

    def forward(self, x: Tensor) -> list[Tensor]:
        size = x.shape[-2:]
        return [F.interpolate(conv(F.adaptive_avg_pool2d(x, s)), size=size, mode="bilinear", align_corners=False)
                for s, conv in zip(self.scales, self.convs)]


class UPerNetHead(nn.Module):
    """Phase 3: 1x1 projection, pyramid pooling (1, 2, 3, 6), 3x3 branches with dilation 1, 2, 4,
    concatenation, 1x1 fusion, classifier; GroupNorm(32) throughout."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 256) -> None:
        super().__init__()
        self.proj = conv_gn(in_channels, width)
        self.ppm = PyramidPooling(width)
        self.branches = nn.ModuleList(conv_gn(width, width, 3, d) for d in (1, 2, 4))
        self.fuse = conv_gn(width * (1 + len(self.ppm.scales) + len(self.branches)), width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        feats = [x, *self.ppm(x), *(b(x) for b in self.branches)]
        return self.classifier(self.fuse(torch.cat(feats, dim=1)))


def build_head(name: str, in_channels: int, num_classes: int) -> nn.Module:
    if name == "convnext":
        return ConvNeXtHead(in_channels, num_classes)
    if name == "upernet":
        return UPerNetHead(in_channels, num_classes)
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {name!r}")


def tokens_to_input(tokens: Tensor) -> Tensor:
    """Cached tokens [B, L, C, Hp, Wp] (float16) -> head input [B, L*C, Hp, Wp] (float32)."""
    b, l, c, h, w = tokens.shape
    return tokens.reshape(b, l * c, h, w).float()


def head_logits(head: nn.Module, tokens: Tensor, out_size: tuple[int, int], amp: bool) -> Tensor:
    """Cached-format tokens -> float32 logits bilinearly upsampled to out_size (H, W).
    The one path used by training, validation, evaluation and prediction."""
    from seg.device import autocast

    with autocast(tokens.device, amp):
        logits = head(tokens_to_input(tokens))
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits.float()
