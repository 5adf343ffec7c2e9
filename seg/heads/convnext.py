"""The phase 1-2 head (DESIGN.md section 2)."""

from __future__ import annotations

from torch import Tensor, nn


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
