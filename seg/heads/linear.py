"""DINOv2's linear protocol: BatchNorm over the concatenated cached layers, then a 1x1 conv.

As the reference BNHead (dinov2/eval/segmentation/models/decode_heads/linear_head.py): the chosen
layers are concatenated along channels (the cache stores every layer on one patch grid, so the
reference's resize to the first layer's grid is the identity here), normalised by one BatchNorm
(SyncBatchNorm under DDP on GPUs, by the trainer's conversion), optional dropout, then a 1x1
convolution to the classes. The reference also accepts the class token; the cache stores patch
tokens only.
"""

from __future__ import annotations

from torch import Tensor, nn


class LinearHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.bn(x)))
