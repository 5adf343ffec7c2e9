"""Segmenting a video: every frame through the run, written back as an annotated video (the overlay),
with the colour mask of each frame as PNGs on request."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import cv2
import torch

from seg.data.augment import Augmenter
from seg.data.classes import ClassTable
from seg.data.file_names import check_utf8_name
from seg.infer.segmenter import Segmenter
from seg.runtime.errors import SegError
from seg.runtime.progress import progress_bar

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")


def frames_of(path: Path, batch: int):
    """Batches of RGB frames, in order, until the video ends."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SegError(f"{path}: cannot open video (missing, corrupt, or a codec OpenCV lacks)")
    try:
        chunk = []
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            chunk.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            if len(chunk) == batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    finally:
        cap.release()


def predict_video(path: Path, out_dir: Path, segmenter: Segmenter, table: ClassTable, tta: str, mode: str,
                  stride: Optional[tuple[int, int]], batch: int, alpha: float, frame_masks: bool, progress: bool,
                  colorize: Callable, overlay: Callable) -> tuple[int, list[str]]:
    """(frames, files written, relative to out_dir): `<stem>.mp4` holds every input frame with its
    overlay, at the input's frame rate; with frame_masks, `<stem>/NNNNNN.png` the colour masks. The
    video is written under a temporary name and renamed when complete."""
    check_utf8_name(path)
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    cap.release()
    resize = Augmenter("none", segmenter.run.size)
    final, partial = out_dir / f"{path.stem}.mp4", out_dir / f"{path.stem}.partial.mp4"
    writer, written, n = None, [], 0
    try:
        with progress_bar(enabled=progress, total=total, unit="frame", desc=path.name) as bar:
            for chunk in frames_of(path, batch):
                small = torch.stack([torch.from_numpy(resize(f, None, "", 0)[0]) for f in chunk])
                labels = segmenter.batch_labels({"image": small, "original": chunk}, [f.shape[:2] for f in chunk],
                                                tta, mode, stride, batch)
                for frame, ids in zip(chunk, labels):
                    color = colorize(ids.to(torch.uint8).cpu().numpy(), table)
                    if writer is None:
                        h, w = frame.shape[:2]
                        writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            raise SegError(f"{partial}: cannot write an mp4 video here")
                    writer.write(cv2.cvtColor(overlay(frame, color, alpha), cv2.COLOR_RGB2BGR))
                    n += 1
                    if frame_masks:
                        name = f"{path.stem}/{n:06d}.png"
                        (out_dir / path.stem).mkdir(exist_ok=True)
                        ok, buf = cv2.imencode(".png", cv2.cvtColor(color, cv2.COLOR_RGB2BGR))
                        (out_dir / name).write_bytes(buf.tobytes())
                        written.append(name)
                bar.update(len(chunk))
        if writer is None:
            raise SegError(f"{path}: no frames could be read")
        writer.release()
        writer = None
        os.replace(partial, final)
    finally:
        if writer is not None:
            writer.release()
        partial.unlink(missing_ok=True)
    return n, written + [final.name]


def frame_count(path: Path) -> int:
    """Frames a video file holds, counted by decoding them (container metadata can be wrong)."""
    return sum(len(c) for c in frames_of(path, 64))

