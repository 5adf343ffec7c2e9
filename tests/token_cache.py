"""Build small feature caches directly from arrays, for training tests that need no backbone."""

from pathlib import Path

import numpy as np

from seg.cache import format as cf
from seg.backbones import file_sha256
from seg.data.classes import default_class_table
from seg.data.normalize import IMAGENET_MEAN, IMAGENET_STD


def learnable_split(n: int, rng: np.random.Generator, channels: int = 16, grid=(6, 10), num_classes: int = 10):
    """Each patch's class is written into its token (one-hot x 2 plus noise); masks are the patch
    classes upsampled by 14 with a few ignore pixels. A head can learn this exactly."""
    hp, wp = grid
    # regions of 2x2 patches: bilinear upsampling of logits blurs every class boundary
    coarse = rng.integers(0, num_classes, (n, (hp + 1) // 2, (wp + 1) // 2))
    classes = np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)[:, :hp, :wp]
    tokens = rng.normal(0, 0.3, (n, 1, channels, hp, wp)).astype(np.float32)
    for c in range(num_classes):
        tokens[:, 0, c] += 2.0 * (classes == c)
    masks = np.repeat(np.repeat(classes, 14, axis=1), 14, axis=2).astype(np.uint8)
    masks[:, :3, :3] = 255
    return tokens.astype(np.float16), masks


def write_token_cache(path: Path, splits: dict, backbone: str = "vits14", size=(140, 84), shard_size: int = 4,
                      seeds: dict | None = None, policy: str = "none", int8: bool = False) -> Path:
    """splits: name -> (tokens [n, L, C, Hp, Wp] float16, masks [n, H, W] uint8), seed-major order.
    With `int8`, the tokens are stored packed as an int8 cache (format version 6) does."""
    import torch
    from seg.cache.quant import QuantSpec

    path = Path(path)
    quant = QuantSpec.for_tokens(list(next(iter(splits.values()))[0].shape[1:]), False) if int8 else None
    if quant is not None:
        splits = {k: (quant.pack(torch.from_numpy(t)).numpy(), m) for k, (t, m) in splits.items()}
    path.mkdir(parents=True, exist_ok=True)
    first_tokens, first_masks = next(iter(splits.values()))
    manifest_splits = {}
    for name, (tokens, masks) in splits.items():
        split_seeds = (seeds or {}).get(name, [0])
        n_img = len(tokens) // len(split_seeds)
        plans = cf.plan_shards(name, len(tokens), shard_size)
        for p in plans:
            ks = np.arange(p.start, p.start + p.count)
            cf.write_shard(path / p.file, tokens[ks], masks[ks], ks % n_img, np.asarray(split_seeds)[ks // n_img])
        manifest_splits[name] = {
            "data_dir": "synthetic", "images": [f"{name}_{i:04d}.png" for i in range(n_img)], "seeds": split_seeds,
            "num_samples": len(tokens),
            "shards": [{"file": p.file, "start": p.start, "samples": p.count,
                        "sha256": file_sha256(path / p.file), "bytes": (path / p.file).stat().st_size}
                       for p in plans],
        }
    w, h = size
    manifest = {
        "format": cf.FORMAT, "format_version": cf.QUANT_FORMAT_VERSION if quant else cf.FORMAT_VERSION, "seg_version": "test", "complete": True,
        "backbone": backbone, "weights_sha256": "random-init", "weights_source": "synthetic tokens",
        "random_init_seed": 0, "weights_fingerprint": "synthetic",
        "size": {"width": w, "height": h}, "patch_size": 14, "patch_grid": {"width": w // 14, "height": h // 14},
        "embed_dim": int(quant.token_shape[1] if quant else first_tokens.shape[2]), "depth": 12, "layers": [11], "batch_size": 8, "layer_norm": True,
        "token_dtype": "int8" if quant else "float16", **({"token_quant": quant.record()} if quant else {}),
        "token_shape": list(quant.token_shape) if quant else list(first_tokens.shape[1:]), "mask_shape": list(first_masks.shape[1:]),
        "compute_dtype": "float32", "device": "cpu",
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "resize": {"image": "bilinear (cv2.INTER_LINEAR)", "mask": "nearest"},
        "class_table": default_class_table().to_json(), "ignore_index": 255,
        "augmentation": {"policy": policy, "transforms": [], "albumentations": "2.0.8", "seeding": "test"},
        "shard_size": shard_size, "sample_order": "seed-major", "splits": manifest_splits,
    }
    cf.write_manifest(path, manifest)
    return path
