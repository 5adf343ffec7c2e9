"""Stage one: run the frozen backbone once per (image, aug seed) and store tokens in a cache.

`extract` puts the pieces of `seg.extraction` together: the manifest planned up front (`manifest`),
the cache directory it owns and resumes (`cache_dir`), and the loop that fills the shards (`loop`)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional


from seg.backbones import backbone_kwargs, load_backbone
from seg.backbones.features import cast_matmul_weights_
from seg.cache import format as cf
from seg.data.augment import Augmenter, parse_size
from seg.data.copy_paste import build_config, parse_copy_paste
from seg.data.layouts import list_split, resolve_layout
from seg.data.unlabeled import flipped_twin, unlabeled_split
from seg.data.public_tables import decoder_for, table_for
from seg.data.decode import palette_contradiction
from seg.extraction.data_check import check_data
from seg.extraction.cache_dir import check_cache_dir, finalize_manifest, missing_shards, prepare_cache_dir
from seg.extraction.config import DEFAULT_AUG_SEEDS, DEFAULT_SHARD_SIZE, ExtractConfig
from seg.extraction.loop import extract_shards, f16_step
from seg.extraction.manifest import build_manifest, parse_layers, stored_dtype
from seg.extraction.samples import extraction_workers, scan_class_counts
from seg.runtime.device import recorded_dtype, resolve_device
from seg.runtime.output import Output
from seg.runtime.distributed import Dist, barrier, on_main, rank_device
from seg.runtime.errors import SegError
from seg.runtime.progress import progress_bar

__all__ = ["DEFAULT_SHARD_SIZE", "ExtractConfig", "ExtractSummary", "extract"]


@dataclass
class ExtractSummary:
    cache: Path
    samples_total: int
    samples_written: int
    shards_written: int
    shards_total: int
    bytes_on_disk: int
    seconds: float
    images_per_s: float             # whole command, setup and finalisation included
    loop_images_per_s: float = 0.0  # the extraction loop alone (decode, backbone, write)
    lines: list[str] = field(default_factory=list)


def extract(cfg: ExtractConfig, log: Callable[[str], None] = print, dist_ctx: Optional[Dist] = None) -> ExtractSummary:
    """Fill the cache at cfg.out. Under torchrun (dist_ctx with world > 1) rank 0 finds the missing
    shards, rank r extracts the j-th of them with j % world == r, and rank 0 writes the manifest before
    and after; the bytes are the same as a one-process run because batches never cross shards."""
    d = dist_ctx or Dist()
    say = log if d.is_main else (lambda s: None)
    t0 = time.perf_counter()
    size = parse_size(cfg.size, backbone_kwargs(cfg.backbone)["patch_size"])
    cfg = replace(cfg, aug_seeds=cfg.seeds_k())
    if cfg.aug_seeds < 1:
        raise SegError(f"--aug-seeds must be at least 1, got {cfg.aug_seeds}")
    if cfg.aug_policy == "none" and cfg.aug_seeds > 1 and not cfg.copy_paste_enabled:
        raise SegError("--aug-seeds > 1 needs an augmentation policy (--aug-policy phase2 or phase3) or --copy-paste")
    stored_dtype(cfg.token_dtype)  # a wrong --token-dtype is refused before anything is loaded
    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise SegError("--batch-size and --shard-size must be at least 1")
    if not cfg.splits and not cfg.unlabeled:
        raise SegError("--splits names no split; give e.g. train,val")
    twice = sorted({s for s in cfg.splits if cfg.splits.count(s) > 1})
    if twice:
        raise SegError(f"--splits names {twice[0]!r} twice")
    if cfg.augmented and cfg.aug_seeds < DEFAULT_AUG_SEEDS and "train" in cfg.splits:
        say(f"WARNING: --aug-seeds {cfg.aug_seeds} with policy {cfg.aug_policy}: each train image gets only "
            f"{cfg.aug_seeds} augmented view(s), standing in for one fresh draw per epoch (30-40 in the "
            f"published runs); {DEFAULT_AUG_SEEDS} or more is recommended")
    if cfg.every != 1 and not cfg.unlabeled:
        raise SegError("--every applies to --unlabeled splits (every N-th image or video frame): add one")
    if cfg.flip_views and not cfg.unlabeled:
        raise SegError("--flip-views applies to --unlabeled splits (their teacher's flip TTA): add one")
    unlabeled = [unlabeled_split(spec, cfg.every) for spec in cfg.unlabeled]  # names checked before anything else
    unlabeled += [flipped_twin(files) for files in unlabeled] if cfg.flip_views else []
    device = resolve_device(rank_device(d, cfg.device))
    layout = resolve_layout(cfg.data, cfg.layout)
    table = table_for(layout, cfg.classes)
    decoder = decoder_for(layout, table)
    split_files = {s: list_split(cfg.data, s, layout=layout, val_fraction=cfg.val_fraction) for s in cfg.splits}
    for files in unlabeled:  # images without masks: augmented like train, their masks all ignore (255)
        if files.split in split_files:
            raise SegError(f"--unlabeled names the split {files.split!r} twice")
        split_files[files.split] = files
    # every mask decoded once before the backbone is loaded: all problems in one run (on every rank,
    # so that all stop together)
    check_data(split_files, decoder, say, cfg.progress and d.is_main)
    for files in split_files.values():  # once per split: its first mask stands for the rest
        problem = palette_contradiction(files.mask_path(0), table) if files.has_masks and files.names else None
        if problem:
            say(f"WARNING: {problem}")
    model, info = load_backbone(cfg.backbone, cfg.weights, cfg.random_init, cfg.random_init_seed)
    if cfg.random_init:
        say(f"NOTICE: {cfg.backbone} has RANDOM weights (seed {cfg.random_init_seed}); features are not DINOv2's")
    try:
        layers = sorted(model.resolve_layers(parse_layers(cfg.layers)))
    except ValueError as exc:
        raise SegError(f"--layers: {exc}") from None
    if cfg.tap_block is not None:
        depth = len(model.blocks)
        if str(cfg.layers) != "1":
            raise SegError("--tap-block and --layers exclude each other: a tap cache stores the stream entering "
                           "one block, the tuned blocks make the last layer")
        if not 0 <= cfg.tap_block < depth:
            raise SegError(f"--tap-block must be a block of {cfg.backbone}, 0..{depth - 1} (then --tune-blocks "
                           f"{depth} - B), got {cfg.tap_block}")
    paste = None
    choice = parse_copy_paste(cfg.copy_paste, list(table.names))
    if choice is not None:
        if "train" not in split_files:
            raise SegError("--copy-paste pastes into train samples; add train to --splits")
        paste = build_config(choice, scan_class_counts(split_files["train"], decoder, table.num_classes,
                                                     cfg.progress and d.is_main),
                             list(table.names), cfg.copy_paste_scale)
        say(f"copy-paste: {', '.join(table.names[c] for c in paste.classes)} from "
            + ", ".join(f"{len(paste.sources[c])} images" for c in paste.classes))
    manifest = build_manifest(cfg, info, model, layers, size, table, split_files, device, layout, paste)
    out = Path(cfg.out)
    claim: list[Output] = []
    fresh: list[bool] = []

    def prepare() -> None:
        old = check_cache_dir(out, manifest)
        fresh.append(old is None)
        owned = cf.owned_files(manifest) | (cf.owned_files(old) if old else set())
        claim.append(Output(out, "extract", owned.__contains__, cf.LOCK, what="feature cache").claim())
        prepare_cache_dir(out, old, manifest, cfg.overwrite, say)
        if not (out / cf.MANIFEST).exists() or not cf.read_manifest(out).get("complete"):
            cf.write_manifest(out, manifest)

    try:
        on_main(d, prepare)
        cast_matmul_weights_(model, recorded_dtype(manifest["compute_dtype"], device)).to(device)
        augmenter = Augmenter(cfg.aug_policy, size, cfg.border_fill)
        workers = extraction_workers(device) if cfg.workers is None else cfg.workers
        all_plans = [p for s in split_files for p in cf.split_shards(manifest, s)]
        # The missing shards are found first (by rank 0, which also clears broken leftovers) and only
        # then dealt out, so that a resume after a dead rank spreads the remaining work over all ranks.
        missing = on_main(d, lambda: missing_shards(out, manifest, all_plans)) or []
        todo = [p for j, p in enumerate(missing) if j % d.world == d.rank]
        n_todo = sum(p.count for p in todo)
        what = f"layers {layers}" if cfg.tap_block is None else f"the stream entering block {cfg.tap_block}"
        say(f"extract: {layout} dataset, {cfg.backbone} @ {size[0]}x{size[1]}, {what}, policy {cfg.aug_policy}, "
            f"{sum(p.count for p in all_plans)} samples in {len(all_plans)} shards; "
            f"{len(todo)} shards ({n_todo} samples) to do on {device} with {workers} workers"
            + (f" (rank 0 of {d.world}; each rank takes every {d.world}th missing shard)" if d.active else ""))

        written = 0
        t_loop = time.perf_counter()
        with progress_bar(enabled=cfg.progress and d.is_main, total=n_todo, unit="img", desc="extract") as bar:
            for split in split_files:
                plans = [p for p in todo if p.split == split]
                if plans:
                    written += extract_shards(model, device, layers, split_files[split], manifest, plans,
                                              augmenter, decoder, cfg, workers, out, bar, paste, table.num_classes)
        loop_seconds = time.perf_counter() - t_loop
        barrier(d)
        total_bytes = on_main(d, lambda: finalize_manifest(out, manifest)) or 0
        seconds = time.perf_counter() - t0
        summary = ExtractSummary(out, sum(p.count for p in all_plans), written, len(todo), len(all_plans),
                                 total_bytes, seconds, written / seconds if seconds > 0 else 0.0,
                                 written / loop_seconds if written and loop_seconds > 0 else 0.0)
        per = total_bytes / summary.samples_total if summary.samples_total else 0
        if cfg.tap_block is not None and d.is_main:
            largest = max(sh["max_abs"] for s in manifest["splits"].values() for sh in s["shards"])
            summary_tap = (f"tap tokens: largest |value| {largest:.4g} (float16 holds up to 65504; at that size "
                           f"its step is {f16_step(largest):.3g})")
        else:
            summary_tap = None
        rank_note = f" by rank 0 of {d.world}" if d.active else ""
        summary.lines = [
            f"cache: {out}",
            f"samples: {summary.samples_total} ({written} extracted now{rank_note}), "
            f"shards: {len(all_plans)} ({len(todo)} written now{rank_note})",
            f"bytes: {total_bytes / 1e6:.1f} MB ({per / 1e6:.3f} MB/sample)",
            f"time: {seconds:.1f} s, {summary.images_per_s:.2f} images/s overall, "
            f"{summary.loop_images_per_s:.2f} images/s in the extraction loop{rank_note}",
        ] + ([summary_tap] if summary_tap else []) + _quant_line(manifest)
        return summary
    except BaseException:
        # A new cache that stored no shard is no cache: its manifest goes, so that the corrected
        # rerun starts afresh instead of being asked for --overwrite (an earlier cache stays as it was).
        shards = cf.owned_files(manifest) - {cf.MANIFEST, cf.LOCK, cf.CLASS_COUNTS_FILE}
        if claim and fresh[0] and not any((out / n).exists() for n in shards):
            (out / cf.MANIFEST).unlink(missing_ok=True)
        raise
    finally:
        for c in claim:
            c.release(failed=sys.exc_info()[0] is not None)


def _quant_line(manifest: dict) -> list[str]:
    err = manifest.get("token_quant_error")
    if not err:
        return []
    return [f"int8 tokens: relative RMS error {err['relative_rms']:.4f} against the float16 tokens "
            f"(a float16 scale per {manifest['token_quant']['group']} channels)"]
