"""`seg pseudo-label`: a trained run's predictions over a split's cached tokens become masks, kept
where their confidence passes CBST's class-balanced thresholds (seg.adapt.thresholds).

Every cached view (seed) is labelled from its own tokens, so each mask lines up with the view it was
predicted on; with flip TTA (`--tta`, on by default when `extract --flip-views` cached the split's
mirrored twin) its probabilities are the mean of the view's and of its mirror's flipped back, as
`seg eval --tta flip` computes them from images. Two passes over the split through the run's head
(the backbone never runs): the first
collects the confidences the thresholds come from, the second writes the labels. The record says
what the labels were made from and what they hold: coverage, per-class pixels and shares, the
teacher's mean confidence per class, and, for a split that has masks, how often a kept label is right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from seg.adapt.thresholds import IGNORE, class_thresholds, sampled_confidences, select_labels
from seg.backbones import file_sha256
from seg.cache import FeatureCache
from seg.cache import format as cf
from seg.cache.pseudo import (MASKS, PSEUDO_FORMAT, PSEUDO_VERSION, RECORD, read_pseudo, settings_fingerprint,
                              split_fingerprint)
from seg.heads import head_logits
from seg.infer.runs import check_cache_compatible, load_run
from seg.runtime.atomic import publish, write_json
from seg.runtime.device import resolve_device
from seg.runtime.errors import SegError
from seg.runtime.output import Output, temp_path, vouched_by
from seg.runtime.progress import progress_bar
from seg.train.sources import read_batch

LOCK = ".seg-pseudo-label.lock"


@dataclass
class PseudoOptions:
    run: str
    cache: str
    split: str
    out: str
    portion: float = 0.5        # CBST's target portion: the share of each class's predicted pixels kept
    stride: int = 4             # CRST's ds_rate: confidences for the thresholds from every 4th pixel
    batch_size: int = 8
    device: str = "auto"
    progress: bool = True
    tta: str = "auto"           # auto (flip when the split's mirrored twin is cached) | none | flip


TTA = ("auto", "none", "flip")


def tta_twin(cache: FeatureCache, split: str, tta: str, where: str) -> Optional[str]:
    """The mirrored twin split a teacher's flip TTA reads, or None (no TTA)."""
    if tta not in TTA:
        raise SegError(f"--tta must be one of {', '.join(TTA)}, got {tta!r}")
    twin = cf.flip_twin(cache.manifest, split)
    if tta == "flip" and twin is None:
        raise SegError(f"{where}: --tta flip needs the mirrored views of {split!r}, which are not cached: extract "
                       f"the split with --flip-views (or use --tta none)")
    return twin if tta != "none" else None


def pseudo_output(out: Path) -> Output:
    owns = vouched_by(out, RECORD, {"format", "masks_sha256", "thresholds"}, (RECORD, MASKS))
    return Output(out, "pseudo-label", owns, LOCK, what="pseudo-labels")


def pseudo_label(opts: PseudoOptions, log: Callable[[str], None] = print) -> dict:
    if not 0 < opts.portion <= 1:
        raise SegError(f"--portion must be in (0, 1], got {opts.portion}")
    if opts.stride < 1 or opts.batch_size < 1:
        raise SegError("--stride and --batch-size must be at least 1")
    device = resolve_device(opts.device)
    run = load_run(opts.run, device)
    cache = FeatureCache(opts.cache)
    check_cache_compatible(run, cache.manifest, opts.cache)
    split = cache.split(opts.split)
    twin = tta_twin(cache, opts.split, opts.tta, opts.cache)
    cache.check_shards([opts.split] + ([twin] if twin else []))
    out = Path(opts.out)
    if out.resolve() == Path(opts.cache).resolve():
        raise SegError(f"{out}: pseudo-labels go beside the cache, never into it: choose another --out")
    with pseudo_output(out):
        return _label(opts, run, cache, split, out, device, log, cache.split(twin) if twin else None)


def split_predictions(run, split, device, batch_size: int, progress: bool = False, desc: str = "",
                      samples: Optional[range] = None, twin=None):
    """(rows, logits [B, K, H, W] float32, cached masks [B, H, W]) batch by batch over the split's
    samples (all, or the given range), through the run's head (`head_predictions`)."""
    return head_predictions(run.head, run.amp_dtype(device), run.grid, run.levels, split, device, batch_size, progress,
                            desc, samples, twin)


def head_predictions(head, amp, grid, levels: bool, split, device, batch_size: int, progress: bool = False,
                     desc: str = "", samples: Optional[range] = None, twin=None):
    """split_predictions for a head as a run or a trainer holds it (its autocast dtype, tap grid, and
    whether it reads packed levels). With `twin` (the split's mirrored views), flip TTA: the logits
    are the log of the mean of the view's softmax and its mirror's, flipped back (their softmax is
    that mean)."""
    h, w = split.manifest["mask_shape"]
    samples = samples if samples is not None else range(len(split))
    bar = progress_bar(enabled=progress, total=len(samples), unit="sample", desc=desc)
    with torch.inference_mode():
        for b0 in range(samples.start, samples.stop, batch_size):
            rows = np.arange(b0, min(b0 + batch_size, samples.stop))
            tokens, masks = read_batch(split, rows, device, levels)
            logits = head_logits(head, tokens, (h, w), amp, grid)
            if twin is not None:
                mirrored = head_logits(head, read_batch(twin, rows, device, levels)[0], (h, w), amp, grid)
                logits = ((logits.softmax(1) + mirrored.softmax(1).flip(-1)) / 2).clamp_min(1e-30).log()
            yield rows, logits, masks
            bar.update(len(rows))
    bar.close()


def _label(opts: PseudoOptions, run, cache, split, out: Path, device, log, twin) -> dict:
    k = run.class_table.num_classes
    names = list(run.class_table.names)
    labelled = cf.split_labels(cache.manifest, opts.split) != "none"
    sampled: list[list[np.ndarray]] = [[] for _ in range(k)]
    conf_sum, conf_n = np.zeros(k), np.zeros(k, np.int64)
    for _, logits, _ in split_predictions(run, split, device, opts.batch_size, opts.progress, "pseudo-label 1/2",
                                          twin=twin):
        probs = logits.softmax(1)
        pred, conf = sampled_confidences(probs, opts.stride)
        pred, conf = pred.cpu().numpy(), conf.cpu().numpy()
        for c in np.unique(pred):
            sampled[c].append(conf[pred == c])
        full_conf, full_pred = probs.max(1)
        conf_sum += torch.bincount(full_pred.flatten(), full_conf.flatten().double(), k).cpu().numpy()
        conf_n += torch.bincount(full_pred.flatten(), minlength=k).cpu().numpy()
    thresholds = class_thresholds([np.concatenate(s) if s else None for s in sampled], opts.portion)
    t = torch.from_numpy(thresholds).to(device)
    h, w = split.manifest["mask_shape"]
    tmp = temp_path(out / MASKS, keep_suffix=True)
    counts, right, kept_scored = np.zeros(k, np.int64), 0, 0
    try:
        masks = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split), h, w))
        for rows, logits, truth in split_predictions(run, split, device, opts.batch_size, opts.progress,
                                                     "pseudo-label 2/2", twin=twin):
            labels = select_labels(logits.softmax(1), t)
            masks[rows[0]:rows[-1] + 1] = labels.cpu().numpy()
            kept = labels != IGNORE
            counts += torch.bincount(labels[kept].long(), minlength=k).cpu().numpy()
            if labelled:
                scored = kept & (truth != IGNORE)
                right += int((labels[scored] == truth[scored]).sum())
                kept_scored += int(scored.sum())
        masks.flush()
        del masks
        publish(tmp, out / MASKS)
    finally:
        tmp.unlink(missing_ok=True)
    pixels = len(split) * h * w
    record = {
        "format": PSEUDO_FORMAT, "format_version": PSEUDO_VERSION,
        "cache": str(cache.path.resolve()), "split": opts.split,
        "settings_fingerprint": settings_fingerprint(cache.manifest),
        "split_fingerprint": split_fingerprint(cache.manifest, opts.split),
        "teacher": {"run": str(run.path.resolve()), "best_pt_sha256": file_sha256(run.path / "best.pt")},
        "method": {"thresholds": "CBST class-balanced (CRST kc_parameters, label_selection)", "portion": opts.portion,
                   "stride": opts.stride,
                   "tta": f"flip (mean softmax with the mirrored views of {twin.name!r})" if twin else "none"},
        **({"tta_split_fingerprint": split_fingerprint(cache.manifest, twin.name)} if twin else {}),
        "samples": len(split), "mask_shape": [h, w], "masks_sha256": file_sha256(out / MASKS),
        "classes": names, "thresholds": thresholds.tolist(),
        "pixels": counts.tolist(), "coverage": float(counts.sum() / pixels),
        "shares": (counts / max(counts.sum(), 1)).tolist(),
        "source_prior": source_prior(cache),
        "teacher_confidence": [float(s / n) if n else None for s, n in zip(conf_sum, conf_n)],
        "teacher_pixels": conf_n.tolist(),
        "kept_label_accuracy": (right / kept_scored if kept_scored else None) if labelled else None,
    }
    write_json(out / RECORD, record)
    log(f"pseudo-labels of {opts.split} ({len(split)} cached views) by {run.path}"
        + (f" with flip TTA ({twin.name})" if twin else "") + f": {record['coverage']:.1%} of pixels "
        f"labelled at portion {opts.portion:g}" + (f"; kept labels right {record['kept_label_accuracy']:.1%} "
                                                    "(the split has masks)" if labelled and kept_scored else ""))
    for line in pseudo_table(record):
        log(line)
    log(f"wrote {out / RECORD} and {out / MASKS}")
    return record


def pseudo_table(record: dict) -> list[str]:
    """Per class: threshold, pseudo-label share, source prior, teacher confidence."""
    prior = record.get("source_prior") or [None] * len(record["classes"])
    rows = [f"{'class':16s} {'threshold':>9s} {'share':>7s} {'prior':>7s} {'teacher conf':>12s}"]
    for name, t, share, p, conf in zip(record["classes"], record["thresholds"], record["shares"], prior,
                                       record["teacher_confidence"]):
        rows.append(f"{name[:16]:16s} {t:9.3f} {share:7.1%} " + (f"{p:7.1%}" if p is not None else f"{'-':>7s}")
                    + (f" {conf:12.3f}" if conf is not None else f" {'-':>12s}"))
    return rows


def source_prior(cache) -> Optional[list[float]]:
    """The share of each class among the train split's pixels (after augmentation); None without one."""
    if "train" not in cache.manifest["splits"]:
        return None
    prior = cache.class_counts("train").sum(0)
    return (prior / max(prior.sum(), 1)).tolist()


def describe_pseudo(folder: str | Path) -> list[str]:
    """`seg cache info` of a pseudo-label folder: what labelled what, how, and what the labels hold
    (the record read and its masks' sha256 checked first)."""
    r = read_pseudo(folder)
    h, w = r["mask_shape"]
    acc = r.get("kept_label_accuracy")
    return [f"pseudo-labels {folder}: split {r['split']!r} of {r['cache']} ({r['samples']} views, {w}x{h})",
            f"teacher      {r['teacher']['run']} (best.pt sha256 {r['teacher']['best_pt_sha256'][:16]}...)",
            f"method       {r['method']['thresholds']}, portion {r['method']['portion']:g}, stride "
            f"{r['method']['stride']}, TTA {r['method']['tta']}",
            f"coverage     {r['coverage']:.1%} of pixels labelled" + (f"; kept labels right {acc:.1%}" if acc else ""),
            *pseudo_table(r), f"masks        {Path(folder) / MASKS} (sha256 checked)"]
