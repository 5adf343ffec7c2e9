"""The very backbone a cache was built with, rebuilt from the record a cache or run keeps of it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from seg.backbones.dinov2 import DinoVisionTransformer
from seg.backbones.named import file_sha256, hub_checkpoint_path, load_backbone
from seg.backbones.weight_formats import weights_file
from seg.runtime.errors import SegError


def rebuild_backbone(record: dict, weights: Optional[str], device: torch.device) -> DinoVisionTransformer:
    """The very backbone the run's cache was built with, or a clear refusal."""
    name = record["backbone"]
    if record["weights_sha256"] == "random-init":
        if weights:
            raise SegError(f"the run was trained on random-init {name} features; --weights does not apply")
        model, info = load_backbone(name, random_init=True, seed=record["random_init_seed"])
    else:
        source = record["weights_source"]  # a local file the cache was built from, or the official URL
        path = Path(weights) if weights else (hub_checkpoint_path(name) if "://" in source else Path(source))
        if path.is_dir():
            path = weights_file(path)
        if not path.is_file():
            raise SegError(f"the {name} weights the features were computed with are not at {path}; put them there "
                           f"or pass --weights FILE (sha256 {record['weights_sha256'][:16]}..., from "
                           f"{record['weights_source']})")
        if file_sha256(path) != record["weights_sha256"]:
            raise SegError(f"{path}: sha256 differs from the weights the run's cache was built with "
                           f"({record['weights_sha256'][:16]}...); refusing to mix features")
        model, info = load_backbone(name, weights=str(path))
    if info.state_fingerprint != record["weights_fingerprint"]:
        raise SegError(f"rebuilt {name} weights differ from the run's (fingerprint {info.state_fingerprint[:12]} vs "
                       f"{record['weights_fingerprint'][:12]}); refusing to mix features")
    return model.to(device)
