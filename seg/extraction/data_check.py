"""One pass over the data before any backbone work: every mask is decoded and compared with its
image's size, and every problem found is listed (up to a bound, with a count of the rest), each with
the hint that fixes it, instead of one problem per run."""

from __future__ import annotations

from typing import Callable

from PIL import Image

from seg.data.decode import MaskDecoder, mask_size_problem
from seg.data.layouts import SplitFiles
from seg.runtime.errors import SegError
from seg.runtime.progress import progress_bar

SHOWN = 20  # problems listed one per line; the rest are counted


def image_size(path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # unreadable here: the extraction's decoder says why, naming the file
        return (-1, -1)


def check_data(split_files: dict[str, SplitFiles], decoder: MaskDecoder, log: Callable[[str], None],
               progress: bool = True) -> None:
    """Decode every mask once and compare its size with its image's; one problem is raised as it is,
    several are listed (log) and raised as the first with a count."""
    problems: list[str] = []
    total = sum(len(f.names) for f in split_files.values() if f.has_masks)
    with progress_bar(enabled=progress, total=total, unit="mask", desc="check data") as bar:
        for files in split_files.values():
            if not files.has_masks:
                continue
            for i in range(len(files.names)):
                mask_path = files.mask_path(i)
                try:
                    ids = decoder.read(mask_path)
                    w, h = image_size(files.image_path(i))
                    problem = mask_size_problem(mask_path, ids.shape[:2], (h, w)) if w > 0 else None
                    if problem:
                        problems.append(problem)
                except SegError as exc:
                    problems.append(str(exc))
                bar.update(1)
    if not problems:
        return
    if len(problems) == 1:
        raise SegError(problems[0])
    for p in problems[:SHOWN]:
        log(f"data problem: {p}")
    more = len(problems) - SHOWN
    if more > 0:
        log(f"data problem: ... and {more} more")
    raise SegError(f"{len(problems)} problems in the data (listed above; the first: {problems[0]}); fix them and "
                   "rerun: nothing was extracted")
