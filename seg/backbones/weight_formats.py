"""DINOv2 weights in the layouts users hold them: the official .pth, Hugging Face transformers
(safetensors or pytorch_model.bin, file or snapshot folder, with or without the `dinov2.` prefix)
and timm. The format is detected from the keys and converted to the official key layout, which
`seg.backbones.dinov2.DinoVisionTransformer` loads strictly. Conversions (DESIGN.md "Weight formats"):

- transformers: q, k, v (`attention.attention.{query,key,value}` or `attention.{q,k,v}_proj`)
  concatenated in that order into `attn.qkv`; `attention.output.dense` / `attention.o_proj` ->
  `attn.proj`; `layer_scale{1,2}.lambda1` -> `ls{1,2}.gamma`; `embeddings.*` -> cls / position /
  register / mask tokens and `patch_embed.proj`; `layernorm` -> `norm`; SwiGLU `mlp.weights_in` /
  `mlp.weights_out` -> `mlp.w12` / `mlp.w3`.
- timm: the official names except `reg_token` -> `register_tokens` and no mask token; its `_reg4`
  models store `cls_token + pos_embed[:, 0]` as the class token and a position embedding without
  the class slot. Only that sum ever reaches the network (the class slot's position embedding is
  added to the class token alone), so setting the class slot to zero inverts it exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from seg.runtime.checkpoint import load_torch_file
from seg.runtime.errors import SegError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_PREFIXES = ("dinov2_with_registers.", "dinov2.", "model.", "backbone.")


def weights_file(path: str | Path) -> Path:
    """The file holding the weights: the path itself, or in a snapshot folder model.safetensors or
    pytorch_model.bin."""
    p = Path(path)
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        raise SegError(f"{p}: a folder without {' or '.join(WEIGHT_FILES)}")
    if not p.is_file():
        raise SegError(f"{p}: weights file not found")
    return p


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from .safetensors (no pickle at all) or a torch file (weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise SegError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        state = load_torch_file(path, what="not a readable PyTorch checkpoint")
        for key in ("model", "state_dict", "teacher"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SegError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def detect_format(state: dict) -> str:
    keys = set(state)
    if any(".layer." in k and "encoder" in k for k in keys):
        return "transformers"
    if "blocks.0.attn.qkv.weight" in keys or any(re.match(r"blocks\.\d+\.\d+\.attn", k) for k in keys):
        return "timm" if ("reg_token" in keys or "mask_token" not in keys) else "official"
    raise SegError("unrecognised weights: neither the official DINOv2 layout, transformers' nor timm's")


def _strip_prefix(state: dict) -> dict:
    for prefix in HF_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def from_transformers(state: dict) -> dict:
    state = _strip_prefix(state)
    out: dict[str, torch.Tensor] = {}
    emb = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k in emb:
            out[emb[k]] = v
            continue
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", k)
        if not m:
            continue  # pooler and heads are not part of the backbone
        i, rest = int(m.group(1)), m.group(2)
        q = re.match(r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$", rest)
        if q:
            part = {"query": "q", "key": "k", "value": "v"}.get(q.group(1) or "", q.group(2))
            qkv.setdefault((i, q.group(3)), {})[part] = v
            continue
        rest = (rest.replace("attention.output.dense", "attn.proj").replace("attention.o_proj", "attn.proj")
                .replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma")
                .replace("mlp.weights_in", "mlp.w12").replace("mlp.weights_out", "mlp.w3"))
        out[f"blocks.{i}.{rest}"] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise SegError(f"transformers weights: block {i} lacks one of query/key/value {kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if "mask_token" in out and out["mask_token"].dim() == 3:
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    return out


def from_timm(state: dict) -> dict:
    out = {("register_tokens" if k == "reg_token" else k): v for k, v in state.items()}
    d = out["cls_token"].shape[-1]
    n_pos = out["pos_embed"].shape[1]
    if round((n_pos - 1) ** 0.5) ** 2 != n_pos - 1:  # no class slot (the reg4 models): add a zero one
        out["pos_embed"] = torch.cat([torch.zeros(1, 1, d, dtype=out["pos_embed"].dtype), out["pos_embed"]], dim=1)
    out.setdefault("mask_token", torch.zeros(1, d, dtype=out["cls_token"].dtype))
    return out


def to_official(state: dict) -> tuple[dict, str]:
    """(state dict in the official key layout, the detected format)."""
    fmt = detect_format(state)
    if fmt == "transformers":
        return from_transformers(state), fmt
    if fmt == "timm":
        return from_timm(state), fmt
    return state, fmt


def architecture_of(state: dict) -> str:
    """'embed dim D, depth N, R registers' from an official-layout state dict."""
    d = state["cls_token"].shape[-1] if "cls_token" in state else "?"
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    return f"embed dim {d}, depth {depth}, {regs} registers"
