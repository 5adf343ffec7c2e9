"""File names as they come from a user's disk: bytes that need not be UTF-8, extensions in any case,
names in either Unicode normal form, hidden companions that are not samples."""

from __future__ import annotations

import functools
import os
import unicodedata
from pathlib import Path, PurePath

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


def name_key(name: str) -> tuple[str, str]:
    """How seg matches file names: the stem in one Unicode normal form (NFC; macOS writes NFD), the
    extension in any case (S0.PNG is S0.png)."""
    p = PurePath(name)
    return unicodedata.normalize("NFC", p.stem), p.suffix.lower()


def is_hidden(name: str) -> bool:
    """Hidden files, macOS AppleDouble `._*` companions among them, are never samples."""
    return name.startswith(".")


@functools.lru_cache(maxsize=64)
def listing(folder: str, mtime_ns: int) -> dict[tuple[str, str], str]:
    """name_key -> file name in a folder; keyed by the folder's mtime, so a changed folder is read anew."""
    try:
        return {name_key(n): n for n in sorted(os.listdir(folder)) if not is_hidden(n)}
    except OSError:
        return {}
