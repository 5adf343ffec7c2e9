"""PyTorch files on disk: written atomically, read with a one-line error when unreadable."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from seg.atomic import write_atomic
from seg.errors import SegError


def save_checkpoint(path: Path, payload: dict) -> None:
    def write(tmp: Path) -> None:
        buf = io.BytesIO()
        torch.save(payload, buf)
        tmp.write_bytes(buf.getvalue())

    write_atomic(Path(path), write)


def load_torch_file(path: Path, weights_only: bool, what: str) -> Any:
    """torch.load onto the CPU; a corrupt or foreign file is a user error naming it, not a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # unpickling fails in many ways; all mean "not the file we need"
        raise SegError(f"{path}: {what} ({type(exc).__name__})") from None
