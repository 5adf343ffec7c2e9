"""Named DINOv2 and DINOv3 backbones: their architectures, official weights and deterministic random init."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from seg.backbones.weight_formats import architecture_of, read_state, to_official, weights_file
from seg.runtime.errors import SegError
from seg.backbones.dinov3 import DinoV3VisionTransformer
from seg.backbones.dinov2 import DinoVisionTransformer

WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"

# (embed_dim, depth, num_heads, ffn_layer), as in the reference hub entry points.
ARCHS = {
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglufused"),
}
# DINOv3 (facebookresearch/dinov3 hub constructors): (embed_dim, depth, num_heads, ffn_ratio, ffn_layer).
# Patch 16; weights are gated by Meta's license, so --weights only (no download URL).
DINOV3_ARCHS = {
    "dinov3_vits16": (384, 12, 6, 4.0, "mlp"),
    "dinov3_vits16plus": (384, 12, 6, 6.0, "swiglu"),
    "dinov3_vitb16": (768, 12, 12, 4.0, "mlp"),
    "dinov3_vitl16": (1024, 24, 16, 4.0, "mlp"),
    "dinov3_vith16plus": (1280, 32, 20, 6.0, "swiglu"),
}
DINOV3_WEIGHTS_HELP = ("DINOv3 weights are gated by Meta's license: request them at "
                       "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ and pass --weights FILE")
BACKBONES = tuple(sorted(list(ARCHS) + [a + "_reg" for a in ARCHS])) + tuple(DINOV3_ARCHS)
PATCH_SIZE = 14  # DINOv2's; DINOv3's is 16 (every model has .patch_size)


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    weights_sha256: str          # sha256 of the checkpoint file, or "random-init"
    weights_source: str          # URL, local path, or "random-init (seed S)"
    random_init_seed: Optional[int]
    state_fingerprint: str       # sha256 over the loaded tensors: same for the same weights anywhere
    weights_format: str = "random-init"  # official | transformers | timm | random-init


def is_dinov3(name: str) -> bool:
    return name in DINOV3_ARCHS


def backbone_kwargs(name: str) -> dict:
    """The reference constructor keywords of a named backbone."""
    if is_dinov3(name):
        dim, depth, heads, ratio, ffn = DINOV3_ARCHS[name]
        return dict(img_size=224, patch_size=16, in_chans=3, pos_embed_rope_base=100.0,
                    pos_embed_rope_normalize_coords="separate", pos_embed_rope_rescale_coords=2,
                    pos_embed_rope_dtype="fp32", embed_dim=dim, depth=depth, num_heads=heads, ffn_ratio=ratio,
                    qkv_bias=True, layerscale_init=1e-5, norm_layer="layernormbf16", ffn_layer=ffn, ffn_bias=True,
                    proj_bias=True, n_storage_tokens=4, mask_k_bias=True)
    arch, reg = split_name(name)
    dim, depth, heads, ffn = ARCHS[arch]
    kwargs = dict(img_size=518, patch_size=PATCH_SIZE, embed_dim=dim, depth=depth, num_heads=heads,
                  mlp_ratio=4, init_values=1.0, ffn_layer=ffn)
    if reg:
        kwargs.update(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    else:
        kwargs.update(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
    return kwargs


def prefix_count(name: str) -> int:
    """Tokens before the patches in every layer of a named backbone: cls and registers."""
    kwargs = backbone_kwargs(name)
    return 1 + kwargs.get("num_register_tokens", kwargs.get("n_storage_tokens", 0))


def split_name(name: str) -> tuple[str, bool]:
    if name not in BACKBONES or is_dinov3(name):
        raise SegError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return name.removesuffix("_reg"), name.endswith("_reg")


def weights_url(name: str) -> str:
    arch, reg = split_name(name)
    return WEIGHTS_URL.format(arch=f"dinov2_{arch}", reg="_reg4" if reg else "")


def build_backbone(name: str) -> nn.Module:
    if is_dinov3(name):
        return DinoV3VisionTransformer(**backbone_kwargs(name))
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
            elif pname in ("cls_token", "register_tokens", "storage_tokens", "mask_token"):
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
    if is_dinov3(name):
        raise SegError(f"{name}: {DINOV3_WEIGHTS_HELP}")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_url(name))


def _fetch_official(name: str) -> Path:
    if is_dinov3(name):
        raise SegError(f"{name}: {DINOV3_WEIGHTS_HELP} (or --random-init to try the pipeline)")
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
        path = weights_file(weights) if weights else _fetch_official(name)
        state = read_state(path)
        try:
            state, fmt = (state, "official") if is_dinov3(name) else to_official(state)
        except SegError as exc:
            raise SegError(f"{path}: {exc}") from None
        expected = model.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            have = architecture_of(state) if "cls_token" in state else f"{len(state)} tensors"
            raise SegError(f"{path}: not a {name} checkpoint ({fmt} layout, {have}; {name} has "
                           f"{architecture_of(expected)})")
        model.load_state_dict(state, strict=True)
        info = BackboneInfo(name, file_sha256(path), str(path if weights else weights_url(name)), None,
                            state_fingerprint(model), fmt)
    model.eval().requires_grad_(False)
    return model, info
