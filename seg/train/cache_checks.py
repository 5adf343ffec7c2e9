"""What a training run checks of its cache before it starts, and what of the cache it records."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from seg.cache import FeatureCache
from seg.cache import format as cf
from seg.cache.format import settings_of
from seg.runtime.distributed import Dist, on_main
from seg.runtime.errors import SegError
from seg.train.presets import PRESETS, TrainConfig


def cache_fingerprint(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(settings_of(manifest), sort_keys=True).encode()).hexdigest()


def backbone_record(manifest: dict) -> dict:
    """What evaluation on images needs to rebuild exactly the features the head was trained on."""
    keys = ("backbone", "weights_sha256", "weights_source", "random_init_seed", "weights_fingerprint",
            "size", "patch_size", "layers", "layer_norm", "normalize", "resize", "token_shape", "mask_shape",
            "compute_dtype")
    return {**{k: manifest[k] for k in keys}, "tap_block": cf.tap_block(manifest)}


def recommended_layers(depth: int) -> str:
    """Four blocks spread over the depth, ending with the last (ViT-B: 2,5,8,11; ViT-L: 5,11,17,23)."""
    return ",".join(str(depth // 4 * (i + 1) - 1) for i in range(4))


def check_splits(manifest: dict, cache: Path) -> None:
    for split in ("train", "val"):
        if split not in manifest["splits"]:
            raise SegError(f"{cache}: training needs a {split!r} split in the cache (it has "
                           f"{', '.join(manifest['splits'])}); extract with --splits train,val")


def check_cache_matches(cfg: TrainConfig, manifest: dict, cache: Path, strict: bool,
                        log: Callable[[str], None]) -> None:
    """A preset's backbone, size and layers describe the published experiment. On another cache the run
    trains with the preset's other settings and says it is not the published configuration; `strict`
    (--strict-preset) refuses instead."""
    size = f"{manifest['size']['width']}x{manifest['size']['height']}"
    last_block = [manifest["depth"] - 1]
    mismatches = []
    if (manifest["backbone"], size) != (cfg.backbone, cfg.size):
        mismatches.append(f"cache is {manifest['backbone']} @ {size}, but phase {cfg.phase} is {cfg.backbone} @ {cfg.size}")
    if cf.tap_block(manifest) is None and manifest["layers"] != last_block and cfg.phase in PRESETS \
            and cfg.head == PRESETS[cfg.phase].head:
        mismatches.append(f"cache stores blocks {manifest['layers']}, but phase {cfg.phase} was published on the "
                          f"normed last block {last_block} only")
    if mismatches and strict:
        raise SegError(f"{cache}: {'; '.join(mismatches)}; extract a matching cache or drop --strict-preset")
    if mismatches:
        log(f"note: not the published phase {cfg.phase} configuration ({'; '.join(mismatches)}); training with "
            "the preset's other settings (--strict-preset refuses such a cache)")
    if manifest["augmentation"]["policy"] != cfg.aug_policy:
        log(f"note: cache augmentation is {manifest['augmentation']['policy']!r}; "
            f"phase {cfg.phase} was published with {cfg.aug_policy!r}")


def check_tuning(cfg: TrainConfig, manifest: dict, cache: Path) -> None:
    """--tune-blocks k needs a tap cache at block N - k; a tap cache needs --tune-blocks."""
    k, tap, depth = cfg.tune_blocks, cf.tap_block(manifest), manifest["depth"]
    if tap is None and k:
        if k > depth:
            raise SegError(f"--tune-blocks {k}: {manifest['backbone']} has {depth} blocks")
        raise SegError(f"{cache}: --tune-blocks {k} needs a tap cache of the stream entering block "
                       f"{depth - k}: extract with `seg extract --tap-block {depth - k}`")
    if tap is not None and k != depth - tap:
        raise SegError(f"{cache}: holds the stream entering block {tap} of {depth}, so it trains "
                       f"blocks {tap}..{depth - 1}: pass --tune-blocks {depth - tap}"
                       + (f" (not {k})" if k else ""))


def check_head_fits(cfg: TrainConfig, manifest: dict, cache: Path) -> None:
    """Heads that cannot train on this cache's grid or layers, refused before anything is built."""
    layers, _ = cf.head_input(manifest)
    grid = manifest["patch_grid"]
    if cfg.head in ("convnext", "linear") and grid["height"] * grid["width"] == 1:
        raise SegError(f"{cache}: the patch grid is 1x1; the {cfg.head} head's BatchNorm needs more than one "
                       "value per channel: extract a larger --size or use --head upernet")
    if cfg.head == "upernet-ms" and cf.tap_block(manifest) is not None:
        raise SegError(f"{cache}: the upernet-ms head needs 4 layers; a tuned run's head sees the last block only")
    if cfg.head == "pmt":
        check_pmt_cache(manifest, cache)
    if cfg.head == "upernet-ms" and layers < 4:
        raise SegError(f"{cache}: the upernet-ms head needs at least 4 stored layers, the cache has {layers} "
                       f"(blocks {manifest['layers']}); extract with e.g. --layers {recommended_layers(manifest['depth'])}")


def check_pmt_cache(manifest: dict, cache: Path) -> None:
    """PMT reads the encoder at its interaction indices (ViT-S/B 2,5,8,11; ViT-L 5,11,17,23; the
    matching quarters deeper), whole sequences with their prefix tokens (format version 7)."""
    wanted = recommended_layers(manifest["depth"])
    if cf.tap_block(manifest) is not None:
        raise SegError(f"{cache}: the pmt head reads 4 frozen encoder layers, not a tap cache's stream; "
                       f"extract with --layers {wanted}")
    if ",".join(map(str, manifest["layers"])) != wanted:
        raise SegError(f"{cache}: the pmt head reads blocks {wanted} of {manifest['backbone']} (PMT's interaction "
                       f"indices), the cache stores {manifest['layers']}; extract with --layers {wanted}")
    if cf.prefix_shape(manifest) is None:
        raise SegError(f"{cache}: a format version {manifest.get('format_version')} cache holds no prefix tokens "
                       f"(cls, registers), which the pmt head reads; re-extract it with this seg (version "
                       f"{cf.PREFIX_FORMAT_VERSION} stores them)")


def check_integrity(cache: FeatureCache, d: Dist, verify: bool, log: Callable[[str], None]) -> None:
    """Every train and val shard against the manifest's sha256 before training reads it: hashed once,
    by rank 0 under torchrun; the other ranks adopt the check for the files they see unchanged."""
    if not verify:
        log("integrity: shard checksums NOT checked (--no-verify)")
        return
    t0 = time.perf_counter()

    def check() -> tuple[int, int, dict]:
        n, size = cache.check_shards(["train", "val"])
        return n, size, dict(cache.verified)

    n, size, checked = on_main(d, check)
    cache.adopt_verified(checked)
    log(f"integrity: {n} shards ({size / 1e9:.2f} GB) match the manifest's sha256 "
        f"({time.perf_counter() - t0:.1f} s; --no-verify skips this)")

