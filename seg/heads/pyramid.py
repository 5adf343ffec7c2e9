"""A multi-level head over 4 cached ViT layers: a simple-pyramid neck, then UPerNet.

The neck (ViTDet's simple feature pyramid, mmseg's MultiLevelNeck) turns four layers of one
patch grid into maps at 4x, 2x, 1x and 0.5x the grid: two stride-2 transposed convolutions,
one, none, and a 2x2 max-pool. UPerNet then projects each level with a lateral 1x1 conv, puts
pyramid pooling on the coarsest, adds coarse to fine top-down (FPN), smooths each level with a 3x3
conv, and fuses all four at the finest level. GroupNorm(32) throughout: batch 2 is the published
reality, and BatchNorm statistics over two samples are noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from seg.heads.resize import upsample
from seg.heads.upernet import PyramidPooling, conv_gn

SCALES = (4.0, 2.0, 1.0, 0.5)
FUSIONS = ("reduce", "full")


def up2(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)


class SimplePyramidNeck(nn.Module):
    """4 layers [B, C, h, w] -> maps at 4x, 2x, 1x, 0.5x of (h, w), each with C channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.levels = nn.ModuleList([
            nn.Sequential(up2(c, c), nn.GroupNorm(math.gcd(32, c), c), nn.GELU(), up2(c, c)),  # 4x
            up2(c, c),                                                          # 2x
            nn.Identity(),                                                      # 1x
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),              # 0.5x (odd sides round up)
        ])

    def forward(self, layers: list[Tensor]) -> list[Tensor]:
        return [level(x) for level, x in zip(self.levels, layers)]


class PyramidUPerNetHead(nn.Module):
    """'upernet-ms': 4 cached layers (channels stacked as L x C) -> logits at 4x the patch grid."""

    def __init__(self, in_channels: int, num_classes: int, layers: int, width: int = 256,
                 fusion: str = "reduce") -> None:
        super().__init__()
        if layers < 4:
            raise ValueError(f"the upernet-ms head needs a cache with at least 4 stored layers, got {layers}")
        self.layers, self.channels = layers, in_channels // layers
        # the 4 used layers: evenly spread over the stored ones (all 4 when exactly 4 are stored)
        self.take = [round(i * (layers - 1) / 3) for i in range(4)]
        self.neck = SimplePyramidNeck(self.channels)
        self.lateral = nn.ModuleList(conv_gn(self.channels, width) for _ in range(4))
        self.ppm = PyramidPooling(width)
        self.ppm_fuse = conv_gn(width * (1 + len(self.ppm.scales)), width, 3)
        self.smooth = nn.ModuleList(conv_gn(width, width, 3) for _ in range(3))
        if fusion not in FUSIONS:
            raise ValueError(f"upernet-ms fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        # "full": mmseg's 3x3 conv over the 4 concatenated levels at 4x the grid (about 90 GFLOP per
        # 644x364 sample); "reduce": a 1x1 conv to `width` channels first, then the 3x3 (about 3x less)
        self.fuse = (conv_gn(4 * width, width, 3) if fusion == "full"
                     else nn.Sequential(conv_gn(4 * width, width, 1), conv_gn(width, width, 3)))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        stacked = x.reshape(b, self.layers, self.channels, h, w)
        feats = self.neck([stacked[:, i] for i in self.take])
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        lat[3] = self.ppm_fuse(torch.cat([lat[3], *self.ppm(lat[3])], dim=1))
        for i in (2, 1, 0):  # top-down: coarse into fine
            lat[i] = lat[i] + upsample(lat[i + 1], lat[i].shape[-2:])
        outs = [s(l) for s, l in zip(self.smooth, lat[:3])] + [lat[3]]
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0]] + [upsample(o, size) for o in outs[1:]], dim=1)
        return self.classifier(self.fuse(fused))
