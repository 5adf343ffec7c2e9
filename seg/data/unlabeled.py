"""Unlabeled splits: images without masks (a new domain's footage, a test desert), cached like train
images and labelled later by a teacher (`seg pseudo-label`). `--unlabeled NAME=FOLDER` names one."""

from __future__ import annotations

import re
from pathlib import Path

from seg.data.layouts import SPLITS, UNLABELED, SplitFiles, _images_in
from seg.runtime.errors import SegError

NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def unlabeled_split(spec: str) -> SplitFiles:
    """'NAME=FOLDER' -> the folder's images as split NAME, without masks. NAME is a lower-case word
    other than train, val and test (those are the labelled splits of a layout)."""
    name, sep, folder = spec.partition("=")
    name = name.strip()
    if not sep or not folder.strip():
        raise SegError(f"--unlabeled {spec!r}: expected NAME=FOLDER, e.g. target=/data/test_desert/Color_Images")
    if not NAME.match(name) or name in SPLITS:
        raise SegError(f"--unlabeled {spec!r}: the split name must be a lower-case word (letters, digits, - and _), "
                       f"not {', '.join(SPLITS)}")
    root = Path(folder.strip()).expanduser()
    if root.is_file():
        raise SegError(f"{root}: --unlabeled takes a folder of images (videos: extract frames to a folder first)")
    return SplitFiles(name, root, tuple(_images_in(root)), False, UNLABELED)
