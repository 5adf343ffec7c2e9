"""Reading a JSON file a user or an earlier run gave us: one line naming the file for anything wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seg.runtime.errors import SegError


def read_json(path: str | Path, what: str) -> Any:
    """The parsed JSON in `path`; `what` names the file's role in the error ("class table", ...).
    Missing, unreadable, not UTF-8, or not JSON: a SegError naming the file and the problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SegError(f"{p}: {what} file not found") from None
    except OSError as exc:
        raise SegError(f"{p}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SegError(f"{p}: not a readable JSON {what}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                       f"{exc.start}); save it as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SegError(f"{p}: not a readable JSON {what} ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
