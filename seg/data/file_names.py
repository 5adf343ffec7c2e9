"""File names as they come from a user's disk: bytes that need not be UTF-8."""

from __future__ import annotations

import os
from pathlib import Path

from seg.runtime.errors import SegError


def printable(path: Path | str) -> str:
    """The path as text that can always be printed: bytes of a name that is not UTF-8 as \\xNN."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def check_utf8_name(path: Path) -> None:
    """OpenCV is handed paths as text: a name that is not valid UTF-8 (Python holds its bytes as lone
    surrogates) crashes it, and no manifest or log can carry it. Refused in one line instead."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise SegError(f"{printable(path)}: the file name is not valid UTF-8; rename the file "
                       "(e.g. with `convmv -f latin1 -t utf8`)") from None
