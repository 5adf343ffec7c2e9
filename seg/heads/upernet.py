"""The phase-3 head (DESIGN.md section 2) and the pyramid pooling module it shares with the
multi-level head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seg.heads.resize import adaptive_pool, upsample


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
        return [upsample(conv(adaptive_pool(x, s)), size) for s, conv in zip(self.scales, self.convs)]


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
