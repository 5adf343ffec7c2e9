"""Segmenting a video: every frame through the run, written back as an annotated video (the overlay),
with the colour mask of each frame as PNGs on request."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import cv2

from seg.data.video_frames import frames_of, open_video
from seg.infer.api import Predictor
from seg.runtime.atomic import write_atomic
from seg.runtime.errors import SegError
from seg.runtime.output import temp_path
from seg.runtime.progress import progress_bar


def predict_video(path: Path, out_dir: Path, stem: str, predictor: Predictor, alpha: float, frame_masks: bool, progress: bool,
                  colorize: Callable, overlay: Callable) -> tuple[int, list[str]]:
    """(frames, files written, relative to out_dir): `<stem>.mp4` holds every input frame with its
    overlay, at the input's frame rate; with frame_masks, `<stem>/NNNNNN.png` the colour masks. `stem`
    is the output name predict gave this video (unique among its inputs). The video is written
    under a temporary name and renamed when complete."""
    cap = open_video(path)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    cap.release()
    table = predictor.classes
    final = out_dir / f"{stem}.mp4"
    partial = temp_path(final, keep_suffix=True)
    writer, written, n = None, [], 0
    try:
        with progress_bar(enabled=progress, total=total, unit="frame", desc=path.name) as bar:
            for chunk in frames_of(path, predictor.batch_size):
                for frame, ids in zip(chunk, predictor.predict(chunk)):  # the API's path, frames as arrays
                    color = colorize(ids, table)
                    if writer is None:
                        h, w = frame.shape[:2]
                        writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            raise SegError(f"{partial}: cannot write an mp4 video here")
                    writer.write(cv2.cvtColor(overlay(frame, color, alpha), cv2.COLOR_RGB2BGR))
                    n += 1
                    if frame_masks:
                        name = f"{stem}/{n:06d}.png"
                        (out_dir / stem).mkdir(exist_ok=True)
                        ok, buf = cv2.imencode(".png", cv2.cvtColor(color, cv2.COLOR_RGB2BGR))
                        if not ok:
                            raise SegError(f"{out_dir / name}: could not encode PNG")
                        write_atomic(out_dir / name, lambda tmp: tmp.write_bytes(buf.tobytes()))
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
