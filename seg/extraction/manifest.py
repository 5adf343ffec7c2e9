"""The manifest an extraction plans before it computes anything: settings, sample order, shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

import seg
from seg.cache import format as cf
from seg.cache.quant import TOKEN_DTYPES, QuantSpec
from seg.data.augment import policy_params
from seg.data.classes import IGNORE_INDEX, ClassTable
from seg.data.copy_paste import CopyPasteConfig
from seg.data.layouts import SplitFiles, is_plain_folder
from seg.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from seg.backbones import is_dinov3
from seg.extraction.config import ExtractConfig
from seg.runtime.device import environment, half_dtype
from seg.runtime.errors import SegError


def parse_layers(text: str) -> int | list[int]:
    """'4' -> the last 4 blocks; '8,9,11' -> those block indices (any order, each once)."""
    try:
        parts = [int(p) for p in str(text).split(",") if p.strip() != ""]
    except ValueError:
        raise SegError(f"--layers takes a count (e.g. 4) or block indices (e.g. 8,9,10,11), got {text!r}") from None
    if not parts:
        raise SegError("--layers is empty")
    if "," not in str(text):
        return parts[0]
    twice = sorted({i for i in parts if parts.count(i) > 1})
    if twice:
        raise SegError(f"--layers {text}: block {twice[0]} is named twice")
    return sorted(parts)  # tokens are stored in block order, and recorded so


def train_seeds(augmented: bool, k: int) -> list[int]:
    """With a policy (or copy-paste) every cached train sample is an augmented draw (seeds 1..K);
    seed 0, the plain resize, is what val/test get and what train gets without augmentation."""
    return list(range(1, k + 1)) if augmented else [0]


def stored_dtype(token_dtype: str) -> str:
    """--token-dtype fp16|int8 -> the manifest's token_dtype."""
    if token_dtype not in TOKEN_DTYPES:
        raise SegError(f"--token-dtype must be one of {', '.join(TOKEN_DTYPES)}, got {token_dtype!r}")
    return "float16" if token_dtype == "fp16" else "int8"


def compute_dtype(half: bool, device: torch.device, backbone: str) -> str:
    """bf16 where the hardware has it, else fp16 (DINOv2 only: DINOv3 is documented as unsupported in
    fp16, so it computes in fp32 there), or fp32 with --fp32."""
    if not half:
        return "float32"
    dtype = half_dtype(device)
    if dtype == torch.float16 and is_dinov3(backbone):
        return "float32"
    return str(dtype).removeprefix("torch.")


def build_manifest(cfg: ExtractConfig, info, model, layers: list[int], size: tuple[int, int],
                   table: ClassTable, split_files: dict[str, SplitFiles], device: torch.device,
                   layout: str = "falcon", paste: Optional[CopyPasteConfig] = None) -> dict:
    w, h = size
    grid = (h // model.patch_size, w // model.patch_size)
    tap = cfg.tap_block
    if tap is None:
        token_shape = [len(layers), model.embed_dim, *grid]
    else:
        token_shape = [1 + model.num_register_tokens + grid[0] * grid[1], model.embed_dim]
    augmented = cfg.aug_policy != "none" or paste is not None
    # train gets the augmented views, val and test the plain resize, an unlabeled split both (a student
    # trains on its augmented views; the plain one is what a teacher sees best)
    seeds = {s: (train_seeds(augmented, cfg.aug_seeds) if s == "train" else
                 sorted({0, *train_seeds(augmented, cfg.aug_seeds)}) if not f.has_masks else [0])
             for s, f in split_files.items()}
    splits = {}
    for name, files in split_files.items():
        n = len(files.names) * len(seeds[name])
        data_dir = files.root.resolve()  # absolute: the cache is used from other working directories
        splits[name] = {
            "data_dir": str(data_dir),
            **({} if files.has_masks else {"labels": "none", "layout": files.layout}),
            **({"flip_of": files.flip_of} if files.flip_of else {}),
            "sources": cf.source_record(files.layout if not files.has_masks else layout, data_dir, name,
                                        list(files.names)),
            "images": list(files.names),
            "seeds": seeds[name],
            "num_samples": n,
            "shards": [{"file": p.file, "start": p.start, "samples": p.count, "sha256": None, "bytes": None}
                       for p in cf.plan_shards(name, n, cfg.shard_size)],
        }
    manifest = {
        "format": cf.FORMAT,
        "format_version": cf.format_version(tap, layout, stored_dtype(cfg.token_dtype)),
        **({} if layout == "falcon" else {"layout": layout}),
        # a plain folder: which images are val (a setting: a resume with another fraction is refused)
        **({"val_split": {"val_fraction": cfg.val_fraction, "rule": "val when the first 8 bytes of the sha256 of "
                          "the image name (NFC), as a fraction of 2^64, are below val_fraction"}}
           if layout == "folders" and is_plain_folder(Path(cfg.data)) else {}),
        "seg_version": seg.__version__,
        "torch_version": torch.__version__,
        "complete": False,
        "backbone": info.name,
        "weights_sha256": info.weights_sha256,
        "weights_source": info.weights_source,
        "weights_format": info.weights_format,
        "random_init_seed": info.random_init_seed,
        "weights_fingerprint": info.state_fingerprint,
        "size": {"width": w, "height": h},
        "patch_size": model.patch_size,
        "patch_grid": {"width": grid[1], "height": grid[0]},
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "layers": layers if tap is None else [],
        "layer_norm": tap is None,
        **({} if tap is None else {
            "tap_block": tap,
            "token_layout": f"the un-normed residual stream entering block {tap}: cls, "
                            f"{model.num_register_tokens} register tokens, then the patches row by row"}),
        **({} if tap is not None else {
            "prefix_tokens": 1 + model.num_register_tokens,
            "prefix_layout": f"per stored layer: cls, then {model.num_register_tokens} register tokens, normed like "
                             "the patches, float16 (also in an int8 cache)"}),
        "token_dtype": stored_dtype(cfg.token_dtype),
        **({} if cfg.token_dtype == "fp16" else {"token_quant": QuantSpec.for_tokens(token_shape, tap is not None).record()}),
        "token_shape": token_shape,
        "mask_shape": [h, w],
        "compute_dtype": compute_dtype(cfg.half, device, info.name),
        "device": device.type,
        "environment": environment(device),  # GPU model, CUDA, cuDNN, driver, TF32: a record, not a setting
        "batch_size": cfg.batch_size,  # batch shapes can change low-order bits: part of the settings
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "resize": {"image": "bilinear (cv2.INTER_LINEAR)", "mask": "nearest"},
        "class_table": table.to_json(),
        "ignore_index": IGNORE_INDEX,
        "augmentation": {
            "policy": cfg.aug_policy,
            "transforms": policy_params(cfg.aug_policy, cfg.border_fill),
            "albumentations": _albumentations_version(),
            "copy_paste": paste.record(list(table.names)) if paste is not None else None,
            "seeding": "per sample: sha256(image name, aug seed) -> numpy Generator + random.Random; "
                       "seed 0 = resize only (val, test, and train without a policy); train seeds 1..K "
                       "with a policy, each an augmented draw",
        },
        "shard_size": cfg.shard_size,
        "sample_order": "seed-major: sample k = (image k % n_images, seeds[k // n_images])",
        "splits": splits,
    }
    return json.loads(json.dumps(manifest))  # exactly what a reader of manifest.json sees (no tuples)


def _albumentations_version() -> str:
    import albumentations

    return albumentations.__version__
