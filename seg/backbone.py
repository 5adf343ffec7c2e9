"""Named DINOv2 backbones: their architectures, official weights and deterministic random init."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from seg.checkpoint import load_torch_file
from seg.errors import SegError
from seg.dinov3 import DinoV3VisionTransformer
from seg.vit import DinoVisionTransformer

WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"

# (embed_dim, depth, num_heads, ffn_layer), as in the reference hub entry points.
ARCHS = {
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglufused"),
}
BACKBONES = tuple(sorted(list(ARCHS) + [a + "_reg" for a in ARCHS]))
PATCH_SIZE = 14


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    weights_sha256: str          # sha256 of the checkpoint file, or "random-init"
    weights_source: str          # URL, local path, or "random-init (seed S)"
    random_init_seed: Optional[int]
    state_fingerprint: str       # sha256 over the loaded tensors: same for the same weights anywhere


def backbone_kwargs(name: str) -> dict:
    arch, reg = split_name(name)
    dim, depth, heads, ffn = ARCHS[arch]
    kwargs = dict(img_size=518, patch_size=PATCH_SIZE, embed_dim=dim, depth=depth, num_heads=heads,
                  mlp_ratio=4, init_values=1.0, ffn_layer=ffn)
    if reg:
        kwargs.update(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    else:
        kwargs.update(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
    return kwargs


def split_name(name: str) -> tuple[str, bool]:
    if name not in BACKBONES:
        raise SegError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return name.removesuffix("_reg"), name.endswith("_reg")


def weights_url(name: str) -> str:
    arch, reg = split_name(name)
    return WEIGHTS_URL.format(arch=f"dinov2_{arch}", reg="_reg4" if reg else "")


def build_backbone(name: str) -> DinoVisionTransformer:
    return DinoVisionTransformer(**backbone_kwargs(name))


def random_init_(model: nn.Module, seed: int) -> None:
    """Reproducible weights from a seed on any machine: drawn on CPU from a private generator."""
    g = torch.Generator().manual_seed(seed)
    for pname, p in sorted(model.named_parameters()):
        with torch.no_grad():
            if pname.endswith("gamma"):
                p.fill_(1.0)
            elif any(part.startswith("norm") for part in pname.split(".")[:-1]):
                p.fill_(1.0 if pname.endswith("weight") else 0.0)
            elif pname.endswith("bias"):
                p.zero_()
            elif pname in ("cls_token", "register_tokens", "mask_token"):
                p.copy_(torch.randn(p.shape, generator=g) * 1e-6)
            else:
                p.copy_(torch.nn.init.trunc_normal_(torch.empty(p.shape), std=0.02, generator=g))


def state_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def hub_checkpoint_path(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_url(name))


def _fetch_official(name: str) -> Path:
    path = hub_checkpoint_path(name)
    if path.exists():
        return path
    url = weights_url(name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a half-open network must fail, not hang forever
    try:
        torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=False)
    except Exception as exc:  # network errors come in many types; all mean the same thing to the user
        raise SegError(
            f"could not download {url} ({type(exc).__name__}); offline, place that file at {path} "
            f"or pass --weights /path/to/{path.name}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def load_backbone(
    name: str, weights: Optional[str] = None, random_init: bool = False, seed: int = 0
) -> tuple[DinoVisionTransformer, BackboneInfo]:
    """Frozen, eval-mode backbone with official weights (hub cache or URL), a local file, or seeded random init."""
    model = build_backbone(name)
    if random_init:
        if weights:
            raise SegError("--weights and --random-init exclude each other")
        random_init_(model, seed)
        info = BackboneInfo(name, "random-init", f"random-init (seed {seed})", seed, state_fingerprint(model))
    else:
        path = Path(weights) if weights else _fetch_official(name)
        if not path.is_file():
            raise SegError(f"{path}: weights file not found")
        state = load_torch_file(path, what="not a readable PyTorch checkpoint")
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SegError(f"{path}: not a {name} checkpoint (expected a state dict of tensors, got "
                           f"{type(state).__name__})")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise SegError(f"{path}: not a {name} checkpoint ({first[:200]})") from None
        info = BackboneInfo(name, file_sha256(path), str(path if weights else weights_url(name)), None,
                            state_fingerprint(model))
    model.eval().requires_grad_(False)
    return model, info
