"""Reading a video's frames: in order (predicting a clip), or one frame by its index (an unlabeled
split cached from every N-th frame of a clip, read by whichever process decodes that sample)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from seg.data.file_names import check_utf8_name
from seg.runtime.errors import SegError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")
FRAME = re.compile(r"^(?P<file>.+)@(?P<index>[0-9]{7})$")  # an unlabeled split's sample: clip.mp4@0000120


def open_video(path: Path) -> cv2.VideoCapture:
    check_utf8_name(path)
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SegError(f"{path}: cannot open video (missing, corrupt, or a codec OpenCV lacks)")
    return cap


def frames_of(path: Path, batch: int):
    """Batches of RGB frames, in order, until the video ends."""
    cap = open_video(path)
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


def frame_count(path: Path) -> int:
    """Frames a video file holds, counted by decoding them (container metadata can be wrong)."""
    cap = open_video(path)
    try:
        n = 0
        while cap.grab():
            n += 1
        return n
    finally:
        cap.release()


def frame_name(video: Path, index: int) -> str:
    return f"{video.name}@{index:07d}"


def parse_frame_name(name: str) -> tuple[str, int]:
    """'clip.mp4@0000120' -> ('clip.mp4', 120)."""
    m = FRAME.match(name)
    if m is None:
        raise SegError(f"{name!r}: not a video frame name (FILE@NNNNNNN)")
    return m["file"], int(m["index"])


class _Reader:
    """One open video per process, read forward: the next frame is a decode, any other a seek (then
    decode), so a split read in order decodes each frame once."""

    def __init__(self) -> None:
        self.path: Optional[Path] = None
        self.cap: Optional[cv2.VideoCapture] = None
        self.next = 0

    def frame(self, path: Path, index: int) -> np.ndarray:
        if self.path != path:
            if self.cap is not None:
                self.cap.release()
            self.cap, self.path, self.next = open_video(path), path, 0
        if index < self.next or index > self.next + 30:  # a short skip forward is cheaper decoded than sought
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, index)
            self.next = index
        while self.next < index:
            if not self.cap.grab():
                break
            self.next += 1
        ok, bgr = self.cap.read()
        if not ok:
            self.path = None
            raise SegError(f"{path}: frame {index} cannot be read (the video is shorter than when it was listed, "
                           "or damaged)")
        self.next = index + 1
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


_READER = _Reader()


def read_frame(path: Path, index: int) -> np.ndarray:
    """Frame `index` (0-based) of the video as RGB uint8 HxWx3."""
    return _READER.frame(Path(path), index)
