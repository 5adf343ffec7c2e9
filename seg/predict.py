"""`seg predict`: colour masks, overlays, side-by-sides and raw-value masks for new images."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from seg.runtime.atomic import write_atomic, write_json
from seg.scoring import plots
from seg.data.classes import ClassTable
from seg.data.decode import MaskDecoder
from seg.data.file_names import is_hidden
from seg.data.layouts import CITYSCAPES_IMAGE, CITYSCAPES_MASK, IMAGE_SUFFIXES, mask_name
from seg.runtime.device import worker_count
from seg.runtime.device import resolve_device
from seg.runtime.errors import SegError
from seg.runtime.output import Output
from seg.infer.panels import compare_panel, legend_strip, present
from seg.infer.segmenter import ImageFolderSamples, Segmenter, collate_samples
from seg.infer.api import Predictor
from seg.infer.runs import load_run
from seg.data.video_frames import VIDEO_SUFFIXES
from seg.infer.video import predict_video
from seg.runtime.progress import progress_bar


@dataclass
class PredictOptions:
    run: str
    images: Sequence[str]
    out: str
    weights: Optional[str] = None
    overlay_alpha: float = 0.5
    save_raw: bool = False
    save_ids: bool = False      # class-id maps: uint8 PNGs (uint16 past 255 classes) in ids/
    overlay_legend: bool = False  # a legend strip of the classes shown under each overlay (the demo's)
    tta: str = "none"
    mode: str = "resize"        # resize | slide (windows of the training size over the original image)
    stride: Optional[tuple[int, int]] = None
    tta_scales: Optional[tuple[float, ...]] = None  # flip+scales: the scales (default 0.75, 1, 1.25)
    precision: str = "auto"     # auto (the run's own) | fp32 (the float32 ONNX graph's) | bf16 | fp16
    device: str = "auto"
    batch_size: int = 4
    workers: Optional[int] = None
    progress: bool = True
    strict: bool = False        # stop at the first unreadable image instead of skipping it
    video_masks: bool = False   # videos: also each frame's colour mask as PNG


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(images, videos) named by the inputs: files, and the images and videos in folders."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir()
                           if not is_hidden(q.name) and q.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
            if not found:
                raise SegError(f"{p}: no images or videos ({', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise SegError(f"{p}: no such image, video or folder")
    if not paths:
        raise SegError("no images given")
    videos = [p for p in paths if p.suffix.lower() in VIDEO_SUFFIXES]
    return [p for p in paths if p not in videos], videos


def mask_beside(image: Path) -> Optional[Path]:
    """The ground truth of an image that lies in a dataset tree, where its layout puts it (README: Your
    own dataset), for the image | truth | prediction panel; None when there is none."""
    parent, name = image.parent, image.name
    candidates = {
        "Color_Images": parent.parent / "Segmentation" / mask_name(name),           # falcon
        "images": parent.parent / "masks" / mask_name(name),                          # folders
        "JPEGImages": parent.parent / "SegmentationClass" / mask_name(name),          # voc
    }
    if parent.name in candidates:
        found = candidates[parent.name]
    elif parent.parent.name == "images":                                              # ade20k
        found = parent.parent.parent / "annotations" / parent.name / mask_name(name)
    elif parent.parent.parent.name == "leftImg8bit" and name.endswith(CITYSCAPES_IMAGE):  # cityscapes
        found = (parent.parents[2] / "gtFine" / parent.parent.name / parent.name
                 / (name[: -len(CITYSCAPES_IMAGE)] + CITYSCAPES_MASK))
    else:
        return None
    return found if found.is_file() else None


def output_names(images: list[Path]) -> list[str]:
    """One distinct output file name per input: `<stem>.png`; inputs sharing a stem (frame.png and
    frame.jpg) get `<stem>_<ext>.png`; still equal names (same file name in two folders) get `-2`, `-3`."""
    stems = [p.stem for p in images]
    names = [f"{p.stem}_{p.suffix.lstrip('.').lower()}.png" if stems.count(p.stem) > 1 else f"{p.stem}.png"
             for p in images]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n[:-4]}-{seen[n]}.png")
    return out


PREDICT_RECORD = "predict.json"
LEGEND = "legend.png"  # which colour is which class
PREDICT_LOCK = ".seg-predict.lock"


def predict_output(out: Path) -> tuple[Output, set[str]]:
    """The claim on --out: new, empty, or an earlier seg predict output, whose predict.json lists the
    files it wrote (only those may be replaced); returns it with that list."""
    written: set[str] = set()
    record_ok = False
    try:  # a missing, unreadable or foreign record vouches for nothing
        listed = set(json.loads((out / PREDICT_RECORD).read_text())["written"])
        record_ok = all(isinstance(w, str) for w in listed)
        written = listed if record_ok else set()
    except (OSError, ValueError, KeyError, TypeError):
        pass

    def owns(rel: str) -> bool:
        return rel in written or (record_ok and rel == PREDICT_RECORD)

    return Output(out, "predict", owns, PREDICT_LOCK, what="predict output"), written


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
    images, videos = collect_inputs(opts.images)
    names = output_names(images)
    # videos get collision-free names the same way: drive.mp4 and drive.avi, or two drive.mp4
    video_names = [n[: -len(".png")] for n in output_names(videos)]
    out = Path(opts.out)
    claim, previous = predict_output(out)
    with claim:
        return _predict(opts, run, device, images, names, videos, video_names, out, previous, log)


def _predict(opts: PredictOptions, run, device, images, names, videos, video_names, out: Path, previous: set[str],
             log: Callable[[str], None]) -> dict:
    segmenter = Segmenter(run, opts.weights, device, opts.tta_scales, opts.precision)
    table = run.class_table
    masks = [mask_beside(p) for p in images]
    dataset = ImageFolderSamples(images, masks, run.size, MaskDecoder.of(table), full_res_masks=True,
                                 optional_masks=True)
    folders = ((["color", "overlay"] + (["compare"] if any(masks) else []) + (["raw"] if opts.save_raw else [])
                + (["ids"] if opts.save_ids else []))
               if images else []) + (["video"] if videos else [])
    for sub in folders:
        (out / sub).mkdir(parents=True, exist_ok=True)
    workers = worker_count(4) if opts.workers is None else opts.workers
    cv2.setNumThreads(1)
    loader = DataLoader(dataset, batch_size=opts.batch_size, num_workers=workers, collate_fn=collate_samples)
    written: list[str] = []
    skipped: list[str] = []
    outputs: dict[str, str] = {}
    frames: dict[str, int] = {}
    t0 = time.perf_counter()

    def write(sub: str, name: str, pixels: np.ndarray) -> None:
        _write_png(out / sub / name, pixels)
        written.append(f"{sub}/{name}")

    try:
        with progress_bar(enabled=opts.progress, total=len(images), unit="img", desc="predict") as bar:
            for batch in loader:
                for _, error in batch["errors"]:
                    if opts.strict:
                        raise SegError(f"{error} (--strict)")
                    log(f"WARNING: skipped: {error}")
                    skipped.append(error)
                    bar.update(1)
                if batch["image"] is None:
                    continue
                labels = segmenter.batch_labels(batch, [o.shape[:2] for o in batch["original"]], opts.tta,
                                                opts.mode, opts.stride, opts.batch_size)
                for j, i in enumerate(batch["index"]):
                    original, name = batch["original"][j], names[i]
                    ids = labels[j].to(torch.uint8).cpu().numpy()
                    color = colorize(ids, table)
                    write("color", name, color)
                    shown = overlay(original, color, opts.overlay_alpha)
                    if opts.overlay_legend:  # below the image: the overlay keeps its pixels aligned above
                        shown = np.concatenate([shown, legend_strip(shown.shape[1], shown.shape[0],
                                                                    present(table, ids), table)])
                    write("overlay", name, shown)
                    gt = batch["mask"][j]
                    if batch["mask_error"][j]:
                        log(f"WARNING: no compare panel for {images[i]}: {batch['mask_error'][j]}")
                    elif gt is not None:
                        write("compare", name, compare_panel(original, colorize(gt, table), color, gt, ids, table))
                    if opts.save_raw:
                        write("raw", name, raw_values(ids, table))
                    if opts.save_ids:  # class ids as they are: 8-bit below 256 classes
                        write("ids", name, labels[j].cpu().numpy().astype(np.uint8 if table.num_classes < 256
                                                                          else np.uint16))
                    outputs[str(images[i])] = name
                    bar.update(1)
        videos_by = Predictor(segmenter, opts.tta, opts.mode, opts.stride, opts.batch_size)
        for video, stem in zip(videos, video_names):  # every frame kept: the output has the input's frame count
            n, files = predict_video(video, out / "video", stem, videos_by, opts.overlay_alpha, opts.video_masks,
                                     opts.progress, colorize, overlay)
            written.extend(f"video/{f}" for f in files)
            frames[str(video)] = n
            outputs[str(video)] = f"{stem}.mp4"
    finally:  # what was written is recorded even when a later image stops the run
        plots.legend(table.names, table.colors, out / LEGEND, title=f"classes of {run.path.name}")
        written.append(LEGEND)
        record = {"run": str(run.path), "written": sorted(set(written) | previous),
                  "classes": [{"id": i, "name": n, "color": list(c)} for i, (n, c) in
                              enumerate(zip(table.names, table.colors))],
                  "outputs": outputs, "skipped": skipped, "video_frames": frames, "tta": opts.tta,
                  "mode": opts.mode, "precision": opts.precision}
        write_json(out / PREDICT_RECORD, record)
    seconds = time.perf_counter() - t0
    done = len(outputs) - len(frames)  # images; videos are counted by their frames
    rate = (done + sum(frames.values())) / seconds if seconds else float("nan")
    unit = "images/s" if not frames else ("frames/s" if not done else "images and frames/s")
    log(f"predicted {done} images" + (f" and {sum(frames.values())} frames of {len(frames)} video(s)" if frames else "")
        + f" in {seconds:.1f} s ({rate:.2f} {unit}) -> {out}/{{{','.join(folders)}}}"
        + (f"; skipped {len(skipped)} unreadable image(s) (see warnings above)" if skipped else ""))
    if not done and not frames:
        raise SegError(f"predicted nothing: all {len(images)} input image(s) were skipped as unreadable "
                       "(see the warnings above)")
    return {"images": done, "skipped": len(skipped), "seconds": seconds, "images_per_s": rate, "out": str(out),
            "folders": folders}

