"""The frozen backbones: DINOv2 (`dinov2`) and DINOv3 (`dinov3`) ViTs written to load the official
checkpoints unchanged, the checkpoint layouts they accept (`weight_formats`), the named variants and
how their weights are found (`named`), and the trainable tail of the last blocks (`tail`)."""

from seg.backbones.dinov2 import DinoVisionTransformer
from seg.backbones.dinov3 import DinoV3VisionTransformer
from seg.backbones.named import (ARCHS, BACKBONES, DINOV3_ARCHS, DINOV3_WEIGHTS_HELP, PATCH_SIZE, WEIGHTS_URL,
                                 BackboneInfo, backbone_kwargs, build_backbone, file_sha256, hub_checkpoint_path,
                                 is_dinov3, load_backbone, random_init_, split_name, state_fingerprint, weights_url)

__all__ = ["ARCHS", "BACKBONES", "DINOV3_ARCHS", "DINOV3_WEIGHTS_HELP", "PATCH_SIZE", "WEIGHTS_URL", "BackboneInfo",
           "DinoV3VisionTransformer", "DinoVisionTransformer", "backbone_kwargs", "build_backbone", "file_sha256",
           "hub_checkpoint_path", "is_dinov3", "load_backbone", "random_init_", "split_name", "state_fingerprint",
           "weights_url"]
