"""The deployed model as one module: uint8 RGB pixels in, class ids and logits out, through the same
normalisation, backbone features, float16 token rounding and head path (`head_logits`) as training,
evaluation and `seg predict`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from seg.backbones.features import backbone_features
from seg.data.normalize import normalize
from seg.deploy.pixel_resize import resize_uint8
from seg.deploy.positions import fix_positions_
from seg.heads import head_logits


class PixelsToClasses(nn.Module):
    """uint8 RGB [N, H, W, 3] at the export size -> (labels uint8 [N, H, W], logits float32 [N, K, H, W]).
    With `dynamic`, images of any H and W: resized to the export size inside the graph exactly as
    `seg predict` resizes them (OpenCV's bilinear uint8 resize, `pixel_resize`), labels and logits
    at the input's own size.

    Computed in float32 (portable: every runtime has it). The tokens are rounded to float16 between
    backbone and head because the head was trained on the cache's float16 tokens."""

    def __init__(self, backbone: nn.Module, head: nn.Module, layers: Sequence[int], tap_block: Optional[int],
                 size: tuple[int, int], patch: int, levels: bool = False, dynamic: bool = False) -> None:
        super().__init__()
        h, w = size
        if h % patch or w % patch:
            raise ValueError(f"the export size must be a multiple of the patch size {patch}, got {w}x{h}")
        self.backbone, self.head = backbone.float().eval(), head.float().eval()
        self.layers, self.tap_block, self.size, self.levels = list(layers), tap_block, (h, w), levels
        self.dynamic = dynamic
        self.grid = (h // patch, w // patch)
        fix_positions_(self, self.size, patch)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        out_size = (image.shape[1], image.shape[2]) if self.dynamic else self.size
        if self.dynamic:
            image = resize_uint8(image, self.size)
        x = normalize(image)
        tokens = backbone_features(self.backbone, x, self.layers, self.tap_block, x.device, torch.float32,
                                   levels=self.levels)
        logits = head_logits(self.head, tokens.to(torch.float16), out_size, False, self.grid)
        return logits.argmax(1).to(torch.uint8), logits
