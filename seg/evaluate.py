"""`seg eval`: score a run on a split, from cached tokens (fast) or end to end from images."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from seg.scoring import plots
from seg.runtime.atomic import write_json, write_text
from seg.cache import FeatureCache
from seg.data.layouts import DEFAULT_VAL_FRACTION, list_split
from seg.data.public_tables import decoder_for
from seg.runtime.device import worker_count
from seg.runtime.device import resolve_device
from seg.runtime.errors import SegError
from seg.heads import head_logits
from seg.infer.segmenter import ImageFolderSamples, Segmenter, collate_samples
from seg.scoring.metrics import confusion_matrix, format_table, jsonable, summarize
from seg.cache import format as cf
from seg.runtime.output import Output, vouched_by
from seg.runtime.run_dir import EVAL_FILES, EVAL_LOCK
from seg.infer.runs import check_cache_compatible, load_run
from seg.runtime.progress import progress_bar
from seg.train.sources import read_batch


@dataclass
class EvalOptions:
    run: str
    split: str = "val"
    cache: Optional[str] = None
    data: Optional[str] = None
    layout: str = "auto"        # of --data: auto | falcon | folders | cityscapes | ade20k | voc
    weights: Optional[str] = None
    tta: str = "none"
    full_res: bool = False
    mode: str = "resize"        # resize (the whole image to the training size) | slide (windows over the original)
    stride: Optional[tuple[int, int]] = None  # slide: (h, w) step, default 2/3 of the window
    tta_scales: Optional[tuple[float, ...]] = None  # flip+scales: the scales (default 0.75, 1, 1.25)
    out: Optional[str] = None
    device: str = "auto"
    batch_size: int = 4
    workers: Optional[int] = None
    progress: bool = True
    verify: bool = True         # sha256 of the split's shards before reading them (--cache)
    val_fraction: float = DEFAULT_VAL_FRACTION  # --data a plain folder: the val share extraction used


def evaluate(opts: EvalOptions, log: Callable[[str], None] = print) -> dict:
    if (opts.cache is None) == (opts.data is None):
        raise SegError("give exactly one of --cache CACHE (cached tokens) or --data ROOT (images)")
    if opts.cache is not None and opts.tta != "none":
        raise SegError("--tta needs images (--data): cached tokens hold one view per image")
    if opts.cache is not None and opts.mode != "resize":
        raise SegError("--mode slide needs images (--data): cached tokens hold one resized view per image")
    device = resolve_device(opts.device)
    run = load_run(opts.run, device)
    out = Path(opts.out) if opts.out else run.path / f"eval-{opts.split}{variant_suffix(opts)}"
    owns = vouched_by(out, "eval.json", {"run", "split", "mode", "confusion_matrix"}, EVAL_FILES)
    with Output(out, "eval", owns, EVAL_LOCK, what="eval report"):
        return _evaluate(run, opts, device, out, log)


def variant_suffix(opts: EvalOptions) -> str:
    """What tells one way of scoring a split from another, as a folder-name suffix: the default
    folder of each way is its own, so scoring a split twice never replaces the other report."""
    parts = []
    if opts.data is not None:
        parts.append("images")
    if opts.mode == "slide":
        parts.append("slide")
    elif opts.full_res:
        parts.append("fullres")
    if opts.tta != "none":
        parts.append("tta-" + opts.tta.replace("+", "-"))
    return "".join("-" + p for p in parts)


def _replaced(out: Path, result: dict) -> Optional[str]:
    """A description of the earlier report in `out` when it scored another way, else None."""
    try:
        old = json.loads((out / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    keys = ("split", "mode", "source", "tta", "scored_at")
    if not isinstance(old, dict) or all(old.get(k) == result[k] for k in keys):
        return None
    return ", ".join(f"{k} {old.get(k)}" for k in keys)


def _evaluate(run, opts: EvalOptions, device, out: Path, log: Callable[[str], None]) -> dict:
    k, names = run.class_table.num_classes, list(run.class_table.names)
    cm = torch.zeros(k, k, dtype=torch.int64, device=device)
    t0 = time.perf_counter()
    if opts.cache is not None:
        n, scored_at = _eval_cache(run, opts, device, cm)
    else:
        n, scored_at = _eval_images(run, opts, device, cm)
    seconds = time.perf_counter() - t0
    summary = summarize(cm, names)
    result = {
        "run": str(run.path), "split": opts.split, "mode": "cache" if opts.cache else "images",
        "source": opts.cache or opts.data, "tta": opts.tta, "scored_at": scored_at, "images": n,
        "seconds": seconds, "images_per_s": n / seconds if seconds else None,
        **summary, "confusion_matrix": cm.cpu().tolist(),
    }
    earlier = _replaced(out, result)
    if earlier:
        log(f"NOTE: replacing the earlier report in {out} ({earlier})")
    write_json(out / "eval.json", jsonable(result))
    table = format_table(summary)
    write_text(out / "eval.txt", f"{opts.split}: {n} images scored at {scored_at} ({result['mode']}, tta {opts.tta})\n"
               + table + "\n")
    plots.confusion(cm.cpu().numpy(), names, out / "confusion.png")
    plots.per_class_iou(summary["iou"], names, out / "per_class_iou.png", title=f"{opts.split} per-class IoU")
    log(f"{opts.split}: {n} images scored at {scored_at} from {result['mode']} in {seconds:.1f} s")
    log(table)
    log(f"wrote {out}/eval.json, eval.txt, confusion.png, per_class_iou.png")
    result["out"] = str(out)
    return result


def _eval_cache(run, opts: EvalOptions, device, cm) -> tuple[int, str]:
    cache = FeatureCache(opts.cache)
    check_cache_compatible(run, cache.manifest, opts.cache)
    split = cache.split(opts.split)
    if cf.split_labels(cache.manifest, opts.split) == "none":
        raise SegError(f"{opts.cache}: the {opts.split} split is unlabeled (images without masks): there is nothing to "
                       "score it against; evaluate a labelled split, or extract the target's masks as a labelled cache")
    if opts.verify:
        cache.check_shards([opts.split])
    if 0 not in split.seeds:
        raise SegError(f"{opts.cache}: the {opts.split} split has no seed-0 (unaugmented) samples to score")
    n = len(split.images)
    start = split.seeds.index(0) * n  # seed-major: the seed-0 samples are one contiguous run
    data_dir = None
    if opts.full_res:
        data_dir = split.manifest["splits"][opts.split]["data_dir"]
        layout = cf.layout_of(split.manifest)
        mask_dir = cf.source_files(layout, data_dir, opts.split, split.images[0])[1].parent
        if not mask_dir.is_dir():
            raise SegError(f"--full-res reads the original masks from {mask_dir}, which is not there")
    decoder = decoder_for(cf.layout_of(split.manifest), run.class_table)
    h, w = split.manifest["mask_shape"]
    amp = run.amp_dtype(device)
    bar = progress_bar(enabled=opts.progress, total=n, unit="img", desc=f"eval {opts.split}")
    for b0 in range(start, start + n, opts.batch_size):
        rows = np.arange(b0, min(b0 + opts.batch_size, start + n))
        tokens, masks = read_batch(split, rows, device, run.levels)
        if data_dir is None:
            logits = head_logits(run.head, tokens, (h, w), amp, run.grid)
            cm += confusion_matrix(logits.argmax(1), masks, cm.shape[0])
        else:
            for i, row in enumerate(rows):
                path = cf.source_files(layout, data_dir, opts.split, split.images[int(row) % n])[1]
                full = torch.from_numpy(decoder.read(path)).to(device)
                logits = head_logits(run.head, tokens[i:i + 1], tuple(full.shape), amp, run.grid)
                cm += confusion_matrix(logits.argmax(1)[0], full, cm.shape[0])
        bar.update(len(rows))
    bar.close()
    return n, ("original size" if opts.full_res else f"{w}x{h}")


def _eval_images(run, opts: EvalOptions, device, cm) -> tuple[int, str]:
    files = list_split(opts.data, opts.split, layout=opts.layout, val_fraction=opts.val_fraction)
    segmenter = Segmenter(run, opts.weights, device, opts.tta_scales)
    dataset = ImageFolderSamples([files.image_path(i) for i in range(len(files.names))],
                                 [files.mask_path(i) for i in range(len(files.names))],
                                 run.size, decoder_for(files.layout, run.class_table),
                                 full_res_masks=opts.full_res or opts.mode == "slide")
    workers = worker_count(4) if opts.workers is None else opts.workers
    cv2.setNumThreads(1)  # before the workers fork (see extract_features)
    loader = DataLoader(dataset, batch_size=opts.batch_size, num_workers=workers, collate_fn=collate_samples)
    w, h = run.size
    bar = progress_bar(enabled=opts.progress, total=len(dataset), unit="img", desc=f"eval {opts.split}")
    for batch in loader:
        if batch["errors"]:
            raise SegError(batch["errors"][0][1])
        labels = segmenter.batch_labels(batch, [m.shape for m in batch["mask"]], opts.tta, opts.mode, opts.stride,
                                        opts.batch_size)
        for pred, m in zip(labels, batch["mask"]):
            cm += confusion_matrix(pred, torch.from_numpy(m).to(device), cm.shape[0])
        bar.update(len(batch["index"]))
    bar.close()
    if opts.mode == "slide":
        return len(dataset), f"original size (slide, window {w}x{h})"
    return len(dataset), ("original size" if opts.full_res else f"{w}x{h}")
