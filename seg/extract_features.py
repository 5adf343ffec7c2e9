"""Stage one: run the frozen backbone once per (image, aug seed) and store tokens in a cache."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import cv2
import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import seg
from seg import cache_format as cf
from seg.augment import Augmenter, parse_size, policy_params
from seg.atomic import tmp_name
from seg.backbones import backbone_kwargs, file_sha256, is_dinov3, load_backbone
from seg.classes import IGNORE_INDEX, ClassTable, load_class_table
from seg.data import SplitFiles, list_split, map_mask, read_raw_mask, read_split_pair, worker_count
from seg.device import half_dtype, recorded_dtype, resolve_device
from seg.features import backbone_features, cast_matmul_weights_
from seg.class_stats import class_counts
from seg.copy_paste import CopyPasteConfig, build_config, copy_paste, copy_paste_requested, parse_copy_paste
from seg.dirlock import DirLock
from seg.distributed import Dist, barrier, on_main, rank_device
from seg.errors import SegError
from seg.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize

DEFAULT_SHARD_SIZE = 64


@dataclass
class ExtractConfig:
    data: str
    out: str
    backbone: str = "vitb14_reg"
    size: str = "644x364"
    weights: Optional[str] = None
    random_init: bool = False
    random_init_seed: int = 0
    aug_policy: str = "none"
    aug_seeds: int = 1
    splits: tuple[str, ...] = ("train", "val")
    layers: str = "1"
    tap_block: Optional[int] = None         # store the un-normed stream entering this block instead
    batch_size: int = 8
    device: str = "auto"
    workers: Optional[int] = None
    shard_size: int = DEFAULT_SHARD_SIZE
    classes: Optional[str] = None
    overwrite: bool = False
    half: bool = True
    progress: bool = True
    copy_paste: Optional[str] = None        # none | auto | class names/ids (train seeds only)
    copy_paste_scale: tuple[float, float] = (0.5, 1.5)

    @property
    def copy_paste_enabled(self) -> bool:
        return copy_paste_requested(self.copy_paste)


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


class ExtractionSamples(Dataset):
    """Sample k of a split -> resized, augmented uint8 image and class-id mask (or an error text).
    Copy-paste (train, seeds >= 1) happens at the original size, before the resize and the policy."""

    def __init__(self, files: SplitFiles, seeds: list[int], augmenter: Augmenter, lut: np.ndarray,
                 paste: Optional[CopyPasteConfig] = None) -> None:
        self.files, self.seeds, self.augmenter, self.lut, self.paste = files, seeds, augmenter, lut, paste

    def __len__(self) -> int:
        return len(self.files.names) * len(self.seeds)

    def __getitem__(self, k: int) -> dict:
        i, seed = cf.sample_of(k, len(self.files.names), self.seeds)
        try:
            image, mask = read_split_pair(self.files, i, self.lut)
            if self.paste is not None and seed != 0:
                image, mask, _ = copy_paste(image, mask, i, self.files.names[i], seed, self.paste,
                                            lambda j: read_split_pair(self.files, j, self.lut))
            image, mask = self.augmenter(image, mask, self.files.names[i], seed)
        except SegError as exc:
            # Raised in a worker, an exception comes back wrapped in a traceback; pass the text instead.
            return {"error": str(exc), "k": k}
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask), "k": k}


def _collate(batch: list[dict]) -> dict:
    errors = [b["error"] for b in batch if "error" in b]
    if errors:
        return {"error": errors[0]}
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "k": torch.tensor([b["k"] for b in batch]),
    }


def extraction_workers(device: torch.device) -> int:
    """Decode/augment processes. On a CPU with 2 cores a decoder steals one of the backbone's two
    threads: decoding in the main process between batches measured as fast or faster (ViT-S 476x266:
    49-52 % of the bf16 matmul rate with 0 workers against 42-49 % with 1; ViT-B: equal), so none there.
    With more cores, or a GPU doing the compute, decoders overlap with it."""
    cores = os.cpu_count() or 2
    return 0 if device.type == "cpu" and cores <= 2 else worker_count()


def compute_dtype(half: bool, device: torch.device, backbone: str) -> str:
    """bf16 where the hardware has it, else fp16 (DINOv2 only: DINOv3 is documented as unsupported in
    fp16, so it computes in fp32 there), or fp32 with --fp32."""
    if not half:
        return "float32"
    dtype = half_dtype(device)
    if dtype == torch.float16 and is_dinov3(backbone):
        return "float32"
    return str(dtype).removeprefix("torch.")


def scan_class_counts(files: SplitFiles, table: ClassTable, progress: bool) -> np.ndarray:
    """int64 [n_images, K] class pixels of every train mask at its original size (for copy-paste)."""
    lut = table.lut()
    counts = np.zeros((len(files.names), table.num_classes), np.int64)
    for i in tqdm(range(len(files.names)), desc="scan train masks", unit="mask", disable=not progress,
                  dynamic_ncols=True, leave=False):
        path = files.mask_path(i)
        counts[i] = class_counts(map_mask(read_raw_mask(path), lut, path)[None], table.num_classes)[0]
    return counts


def build_manifest(cfg: ExtractConfig, info, model, layers: list[int], size: tuple[int, int],
                   table: ClassTable, split_files: dict[str, SplitFiles], device: torch.device,
                   paste: Optional[CopyPasteConfig] = None) -> dict:
    w, h = size
    grid = (h // model.patch_size, w // model.patch_size)
    tap = cfg.tap_block
    if tap is None:
        token_shape = [len(layers), model.embed_dim, *grid]
    else:
        token_shape = [1 + model.num_register_tokens + grid[0] * grid[1], model.embed_dim]
    augmented = cfg.aug_policy != "none" or paste is not None
    seeds = {s: (train_seeds(augmented, cfg.aug_seeds) if s == "train" else [0]) for s in split_files}
    splits = {}
    for name, files in split_files.items():
        n = len(files.names) * len(seeds[name])
        data_dir = files.root.resolve()  # absolute: the cache is used from other working directories
        splits[name] = {
            "data_dir": str(data_dir),
            "sources": cf.source_record(data_dir, list(files.names)),
            "images": list(files.names),
            "seeds": seeds[name],
            "num_samples": n,
            "shards": [{"file": p.file, "start": p.start, "samples": p.count, "sha256": None, "bytes": None}
                       for p in cf.plan_shards(name, n, cfg.shard_size)],
        }
    manifest = {
        "format": cf.FORMAT,
        "format_version": cf.format_version(tap),
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
        "token_dtype": "float16",
        "token_shape": token_shape,
        "mask_shape": [h, w],
        "compute_dtype": compute_dtype(cfg.half, device, info.name),
        "device": device.type,
        "batch_size": cfg.batch_size,  # batch shapes can change low-order bits: part of the settings
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "resize": {"image": "bilinear (cv2.INTER_LINEAR)", "mask": "nearest"},
        "class_table": table.to_json(),
        "ignore_index": IGNORE_INDEX,
        "augmentation": {
            "policy": cfg.aug_policy,
            "transforms": policy_params(cfg.aug_policy),
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


def _seg_manifest(out: Path) -> Optional[dict]:
    """The manifest in out when it is a seg cache's (any format version); None when there is none."""
    path = out / cf.MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SegError(f"{path}: unreadable, so not a seg cache seg may touch ({exc}); choose another --out") from None
    if not isinstance(data, dict) or data.get("format") != cf.FORMAT:
        raise SegError(f"{path}: not a seg feature cache manifest; seg will not touch {out}: choose another --out")
    return data


def check_cache_dir(out: Path, manifest: dict) -> Optional[dict]:
    """Refuse an --out that holds anything seg did not write; returns the old manifest, if any."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise SegError(f"{out}: exists and is not a directory")
    old = _seg_manifest(out)
    foreign = cf.foreign_files(out, *([old, manifest] if old else []))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        what = "is not part of the cache there" if old else "is there, and the directory is not a feature cache"
        raise SegError(f"{out / foreign[0]}: {what}{more}; seg writes only into a new or empty directory "
                       "or its own cache: choose another --out")
    return old


def prepare_cache_dir(out: Path, old: Optional[dict], manifest: dict, overwrite: bool,
                      log: Callable[[str], None]) -> None:
    """Refuse to mix settings in one cache; a rerun with the same settings keeps finished shards.
    `old` is the manifest check_cache_dir found; --overwrite deletes only the files it lists."""
    if old is None:
        return
    if overwrite:
        doomed = sorted(n for n in cf.owned_files(old) - {cf.LOCK} if (out / n).exists())
        log(f"--overwrite: deleting the old cache's {len(doomed)} file(s) in {out}: "
            + ", ".join(doomed[:4]) + (" ..." if len(doomed) > 4 else ""))
        for n in doomed:
            (out / n).unlink()
        return
    if old.get("format_version") != cf.FORMAT_VERSION:
        raise SegError(f"{out}: holds a cache in format version {old.get('format_version')} (this seg writes "
                       f"{cf.FORMAT_VERSION}); pass --overwrite to replace it or choose another --out")
    diffs = cf.differing_fields(cf.settings_of(old), cf.settings_of(manifest))
    if diffs:
        raise SegError(f"{out}: holds a cache with other settings (differs in {', '.join(diffs[:6])}"
                       + (" ..." if len(diffs) > 6 else "") + "); a resume computes with exactly the recorded "
                       "settings: use another --out, or pass --overwrite to replace it")
    for name, split in manifest["splits"].items():  # the record of what the finished shards were made from
        split["sources"] = old["splits"][name].get("sources", split["sources"])
    changed = cf.source_changes(old)
    if changed:
        log(f"WARNING: {len(changed)} source file(s) differ from what this cache was extracted from "
            f"(first: {changed[0]}); finished shards keep the old content. `seg cache verify --sources` "
            "lists them; --overwrite re-extracts")


def missing_shards(out: Path, manifest: dict, shards: list[cf.ShardPlan]) -> list[cf.ShardPlan]:
    missing = []
    for plan in shards:
        path = out / plan.file
        tmp_name(path).unlink(missing_ok=True)  # an interrupted write; it is redone
        if not cf.shard_ok(path, plan, manifest["token_shape"], manifest["mask_shape"]):
            path.unlink(missing_ok=True)
            missing.append(plan)
    return missing


def finalize_manifest(out: Path, manifest: dict) -> int:
    """Record every shard's sha256 and size and every sample's class counts (from the shards, which
    other ranks may have written), mark the cache complete; returns total bytes."""
    total = 0
    for split in manifest["splits"].values():
        counts = []
        for sh in split["shards"]:
            path = out / sh["file"]
            if not path.is_file():
                raise SegError(f"{path}: shard missing at the end of extraction")
            sh["sha256"] = file_sha256(path)
            sh["bytes"] = path.stat().st_size
            total += sh["bytes"]
            with h5py.File(path, "r") as f:
                counts += f["class_counts"][()].tolist()
                if cf.tap_block(manifest) is not None:
                    sh["max_abs"] = float(f.attrs["max_abs"])
        split["class_counts"] = counts
    manifest["complete"] = True
    cf.write_manifest(out, manifest)
    return total


def extract(cfg: ExtractConfig, log: Callable[[str], None] = print, dist_ctx: Optional[Dist] = None) -> ExtractSummary:
    """Fill the cache at cfg.out. Under torchrun (dist_ctx with world > 1) rank r extracts the shards
    j with j % world == r, and rank 0 writes the manifest before and after; the bytes are the same
    as a one-process run because batches never cross shards."""
    d = dist_ctx or Dist()
    say = log if d.is_main else (lambda s: None)
    t0 = time.perf_counter()
    size = parse_size(cfg.size, backbone_kwargs(cfg.backbone)["patch_size"])
    if cfg.aug_seeds < 1:
        raise SegError(f"--aug-seeds must be at least 1, got {cfg.aug_seeds}")
    if cfg.aug_policy == "none" and cfg.aug_seeds > 1 and not cfg.copy_paste_enabled:
        raise SegError("--aug-seeds > 1 needs an augmentation policy (--aug-policy phase2 or phase3) or --copy-paste")
    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise SegError("--batch-size and --shard-size must be at least 1")
    if not cfg.splits:
        raise SegError("--splits names no split; give e.g. train,val")
    twice = sorted({s for s in cfg.splits if cfg.splits.count(s) > 1})
    if twice:
        raise SegError(f"--splits names {twice[0]!r} twice")
    if (cfg.aug_policy != "none" or cfg.copy_paste_enabled) and cfg.aug_seeds < 4 and "train" in cfg.splits:
        say(f"WARNING: --aug-seeds {cfg.aug_seeds} with policy {cfg.aug_policy}: each train image gets only "
            f"{cfg.aug_seeds} augmented view(s), standing in for one fresh draw per epoch (30-40 in the "
            "published runs); 4 or more is recommended")
    device = resolve_device(rank_device(d, cfg.device))
    table = load_class_table(cfg.classes)
    split_files = {s: list_split(cfg.data, s) for s in cfg.splits}
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
        paste = build_config(choice, scan_class_counts(split_files["train"], table, cfg.progress and d.is_main),
                             list(table.names), cfg.copy_paste_scale)
        say(f"copy-paste: {', '.join(table.names[c] for c in paste.classes)} from "
            + ", ".join(f"{len(paste.sources[c])} images" for c in paste.classes))
    manifest = build_manifest(cfg, info, model, layers, size, table, split_files, device, paste)
    out = Path(cfg.out)
    lock = DirLock(out, cf.LOCK, "extraction")

    def prepare() -> None:
        old = check_cache_dir(out, manifest)
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        prepare_cache_dir(out, old, manifest, cfg.overwrite, say)
        if not (out / cf.MANIFEST).exists() or not cf.read_manifest(out).get("complete"):
            cf.write_manifest(out, manifest)

    try:
        on_main(d, prepare)
        cast_matmul_weights_(model, recorded_dtype(manifest["compute_dtype"], device)).to(device)
        augmenter = Augmenter(cfg.aug_policy, size)
        lut = table.lut()
        workers = extraction_workers(device) if cfg.workers is None else cfg.workers
        all_plans = [p for s in split_files for p in cf.split_shards(manifest, s)]
        mine = [p for j, p in enumerate(all_plans) if j % d.world == d.rank]
        todo = missing_shards(out, manifest, mine)
        n_todo = sum(p.count for p in todo)
        what = f"layers {layers}" if cfg.tap_block is None else f"the stream entering block {cfg.tap_block}"
        say(f"extract: {cfg.backbone} @ {size[0]}x{size[1]}, {what}, policy {cfg.aug_policy}, "
            f"{sum(p.count for p in all_plans)} samples in {len(all_plans)} shards; "
            f"{len(todo)} shards ({n_todo} samples) to do on {device} with {workers} workers"
            + (f" (rank 0 of {d.world}; each rank takes every {d.world}th shard)" if d.active else ""))

        written = 0
        t_loop = time.perf_counter()
        with tqdm(total=n_todo, unit="img", desc="extract", disable=not (cfg.progress and d.is_main),
                  dynamic_ncols=True) as bar:
            for split in split_files:
                plans = [p for p in todo if p.split == split]
                if plans:
                    written += _extract_split(model, device, layers, split_files[split], manifest, plans,
                                              augmenter, lut, cfg, workers, out, bar, paste, table.num_classes)
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
                           f"its step is {_f16_step(largest):.3g})")
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
        ] + ([summary_tap] if summary_tap else [])
        return summary
    finally:
        lock.release()


def _f16_step(value: float) -> float:
    """The spacing of float16 numbers near value: what storing the stream costs in precision."""
    return float(np.spacing(np.float16(min(value, 65504.0))))


def _refuse_non_finite(feats: torch.Tensor, half: torch.Tensor, ks: torch.Tensor, files: SplitFiles,
                      seeds: list[int]) -> None:
    """Stop at the first sample whose tokens are not finite float16 numbers: a cache of NaNs is not a cache."""
    bad = int((~torch.isfinite(half)).flatten(1).any(1).nonzero()[0, 0])
    i, seed = cf.sample_of(int(ks[bad]), len(files.names), seeds)
    sample = feats[bad].float()
    if torch.isfinite(sample).all():
        why = (f"values beyond the float16 range (max |value| {sample.abs().max().item():.4g} > 65504), "
               "which the cache cannot store")
    else:
        why = "NaN or infinite tokens"
    raise SegError(f"{files.image_path(i)} (aug seed {seed}): the backbone produced {why}; check the weights "
                   "(--weights) and the precision (--fp32)")


@torch.inference_mode()
def _extract_split(model, device, layers, files, manifest, plans, augmenter, lut, cfg, workers, out, bar,
                   paste: Optional[CopyPasteConfig], num_classes: int) -> int:
    seeds = manifest["splits"][files.split]["seeds"]
    # One OpenCV thread per decoding process: the backbone owns the cores. Set here, before the
    # workers fork, because calling it inside a forked child hangs if the parent used OpenCV's pool.
    cv2.setNumThreads(1)
    dataset = ExtractionSamples(files, seeds, augmenter, lut, paste if files.split == "train" else None)
    # Batches never cross a shard boundary: a resumed shard is computed in exactly the same batches.
    batches = [list(range(s, min(s + cfg.batch_size, p.start + p.count)))
               for p in plans for s in range(p.start, p.start + p.count, cfg.batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None)
    token_shape, mask_shape = manifest["token_shape"], manifest["mask_shape"]
    plan_iter = iter(plans)
    plan = next(plan_iter)
    buf_tokens = np.empty((plan.count, *token_shape), np.float16)
    buf_masks = np.empty((plan.count, *mask_shape), np.uint8)
    filled, written, max_abs = 0, 0, 0.0
    tap = cf.tap_block(manifest)
    dtype = recorded_dtype(manifest["compute_dtype"], device)
    for batch in loader:
        if "error" in batch:
            raise SegError(batch["error"])
        x = normalize(batch["image"].to(device, non_blocking=True))
        feats = backbone_features(model, x, layers, tap, device, dtype)
        half = feats.to(torch.float16)
        if not torch.isfinite(half).all():
            _refuse_non_finite(feats, half, batch["k"], files, seeds)
        if tap is not None:  # the range report of a tap cache; normed layers need none
            max_abs = max(max_abs, half.abs().max().item())
        tokens = half.cpu().numpy()
        b = tokens.shape[0]
        buf_tokens[filled:filled + b] = tokens
        buf_masks[filled:filled + b] = batch["mask"].numpy()
        filled += b
        bar.update(b)
        if filled == plan.count:
            ks = np.arange(plan.start, plan.start + plan.count)
            attrs = {"split": plan.split, "shard": plan.index, "start": plan.start}
            if tap is not None:
                attrs["max_abs"] = max_abs
            cf.write_shard(out / plan.file, buf_tokens, buf_masks, ks % len(files.names),
                           np.asarray(seeds)[ks // len(files.names)], attrs=attrs,
                           class_counts=class_counts(buf_masks, num_classes))
            written += plan.count
            plan = next(plan_iter, None)
            if plan is None:
                break
            buf_tokens = np.empty((plan.count, *token_shape), np.float16)
            buf_masks = np.empty((plan.count, *mask_shape), np.uint8)
            filled, max_abs = 0, 0.0
    return written
