"""Unlabeled splits: images without masks (a new domain's footage, a test desert), cached like train
images and labelled later by a teacher (`seg pseudo-label`). `--unlabeled NAME=FOLDER` names one, or
`NAME=VIDEO` (its frames); `--every N` keeps every N-th image (in name order) or frame."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from seg.data.layouts import SPLITS, UNLABELED, VIDEO, SplitFiles, _images_in
from seg.data.video_frames import VIDEO_SUFFIXES, frame_count, frame_name
from seg.runtime.errors import SegError

NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def unlabeled_split(spec: str, every: int = 1) -> SplitFiles:
    """'NAME=FOLDER' -> the folder's images as split NAME, without masks; 'NAME=VIDEO' -> its frames
    (0, every, 2 x every, ...), each sample named FILE@NNNNNNN. NAME is a lower-case word other than
    train, val and test (those are the labelled splits of a layout)."""
    name, sep, folder = spec.partition("=")
    name = name.strip()
    if not sep or not folder.strip():
        raise SegError(f"--unlabeled {spec!r}: expected NAME=FOLDER, e.g. target=/data/test_desert/Color_Images")
    if not NAME.match(name) or name in SPLITS:
        raise SegError(f"--unlabeled {spec!r}: the split name must be a lower-case word (letters, digits, - and _), "
                       f"not {', '.join(SPLITS)}")
    if every < 1:
        raise SegError(f"--every must be at least 1, got {every}")
    root = Path(folder.strip()).expanduser()
    if root.is_file():
        if root.suffix.lower() not in VIDEO_SUFFIXES:
            raise SegError(f"{root}: --unlabeled takes a folder of images or a video ({', '.join(VIDEO_SUFFIXES)})")
        frames = frame_count(root)
        if frames == 0:
            raise SegError(f"{root}: no frame could be decoded")
        return SplitFiles(name, root.parent, tuple(frame_name(root, i) for i in range(0, frames, every)), False, VIDEO)
    return SplitFiles(name, root, tuple(_images_in(root)[::every]), False, UNLABELED)


def flipped_twin(files: SplitFiles) -> SplitFiles:
    """The split NAME-flip that holds each of NAME's views (same image, same augmentation seed)
    flipped left-right: the other half of a flip-TTA teacher's input (`seg pseudo-label --tta flip`)."""
    twin = f"{files.split}-flip"
    if not NAME.match(twin):
        raise SegError(f"--flip-views: the twin split's name {twin!r} would be too long; shorten {files.split!r}")
    return replace(files, split=twin, flip_of=files.split)
