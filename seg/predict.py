"""`seg predict`: colour masks, overlays, side-by-sides and raw-value masks for new images."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from seg.atomic import write_atomic
from seg.classes import ClassTable
from seg.data import IMAGE_SUFFIXES, MASK_DIR, worker_count
from seg.device import resolve_device
from seg.errors import SegError
from seg.inference import ImageFolderSamples, Segmenter, collate_samples
from seg.runs import load_run


@dataclass
class PredictOptions:
    run: str
    images: Sequence[str]
    out: str
    weights: Optional[str] = None
    overlay_alpha: float = 0.5
    save_raw: bool = False
    tta: str = "none"
    device: str = "auto"
    batch_size: int = 4
    workers: Optional[int] = None
    progress: bool = True


def collect_images(inputs: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SegError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise SegError(f"{p}: no such image or folder")
    if not paths:
        raise SegError("no images given")
    return paths


def mask_beside(image: Path) -> Optional[Path]:
    """The ground truth of a Falcon-layout image: ../Segmentation/<same name>."""
    if image.parent.name == "Color_Images":
        candidate = image.parent.parent / MASK_DIR / image.name
        if candidate.is_file():
            return candidate
    return None


def colorize(ids: np.ndarray, table: ClassTable) -> np.ndarray:
    """Class ids -> RGB with the table's palette (ignore = white)."""
    return table.palette()[ids]


def overlay(image: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    return cv2.addWeighted(image, 1.0 - alpha, color, alpha, 0.0)


def raw_values(ids: np.ndarray, table: ClassTable) -> np.ndarray:
    """Class ids -> the dataset's raw uint16 values (each class's first value), for submissions."""
    inverse = np.zeros(256, np.uint16)
    inverse[: table.num_classes] = [values[0] for values in table.raw_values]
    return inverse[ids]


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    img = cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR) if rgb_or_gray.ndim == 3 else rgb_or_gray
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise SegError(f"{path}: could not encode PNG")
    write_atomic(path, lambda tmp: tmp.write_bytes(buf.tobytes()))


def predict(opts: PredictOptions, log: Callable[[str], None] = print) -> dict:
    if not 0.0 <= opts.overlay_alpha <= 1.0:
        raise SegError(f"--overlay-alpha must be in [0, 1], got {opts.overlay_alpha}")
    device = resolve_device(opts.device)
    run = load_run(opts.run, device)
    images = collect_images(opts.images)
    names = [p.name for p in images]
    if len(set(names)) != len(names):
        raise SegError("two input images share a file name; outputs would overwrite each other")
    segmenter = Segmenter(run, opts.weights, device)
    table = run.class_table
    masks = [mask_beside(p) for p in images]
    dataset = ImageFolderSamples(images, masks, run.size, table.lut(), full_res_masks=True)
    out = Path(opts.out)
    folders = ["color", "overlay"] + (["compare"] if any(masks) else []) + (["raw"] if opts.save_raw else [])
    for sub in folders:
        (out / sub).mkdir(parents=True, exist_ok=True)
    workers = worker_count(4) if opts.workers is None else opts.workers
    cv2.setNumThreads(1)
    loader = DataLoader(dataset, batch_size=opts.batch_size, num_workers=workers, collate_fn=collate_samples)
    t0 = time.perf_counter()
    with tqdm(total=len(images), unit="img", desc="predict", disable=not opts.progress, dynamic_ncols=True) as bar:
        for batch in loader:
            if "error" in batch:
                raise SegError(batch["error"])
            labels = segmenter.label_maps(batch["image"], [o.shape[:2] for o in batch["original"]], opts.tta)
            for j, i in enumerate(batch["index"]):
                original = batch["original"][j]
                ids = labels[j].to(torch.uint8).cpu().numpy()
                color = colorize(ids, table)
                stem = images[i].stem
                _write_png(out / "color" / f"{stem}.png", color)
                _write_png(out / "overlay" / f"{stem}.png", overlay(original, color, opts.overlay_alpha))
                gt = batch["mask"][j]
                if gt is not None:
                    _write_png(out / "compare" / f"{stem}.png",
                               np.concatenate([original, colorize(gt, table), color], axis=1))
                if opts.save_raw:
                    _write_png(out / "raw" / f"{stem}.png", raw_values(ids, table))
                bar.update(1)
    seconds = time.perf_counter() - t0
    rate = len(images) / seconds if seconds else float("nan")
    log(f"predicted {len(images)} images in {seconds:.1f} s ({rate:.2f} images/s) -> {out}/{{{','.join(folders)}}}")
    return {"images": len(images), "seconds": seconds, "images_per_s": rate, "out": str(out), "folders": folders}
