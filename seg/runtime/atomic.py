"""Writes that never leave a half-written file under the final name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from seg.runtime.errors import SegError
from seg.runtime.output import temp_path


def publish(tmp: Path, final: Path) -> None:
    """Flush tmp to disk, then rename it over final in one step."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), then rename it to path; on failure remove the partial file. What was
    under `path` before stays intact; a failed write (full disk, file-size limit) is one SegError
    naming the path. The temporary name is unique (seg.runtime.output), so two writers never share
    one and a user's file is never taken for one."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        publish(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SegError(f"{path}: cannot write ({exc.strerror or exc}); nothing under this name was changed") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(Path(path), lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def write_text(path: Path, text: str) -> None:
    write_atomic(Path(path), lambda p: p.write_text(text))
