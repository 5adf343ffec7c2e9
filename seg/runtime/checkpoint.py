"""PyTorch files on disk: written atomically, read with a one-line error when unreadable."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from seg.runtime.atomic import write_atomic
from seg.runtime.errors import SegError


def save_checkpoint(path: Path, payload: dict) -> None:
    def write(tmp: Path) -> None:
        buf = io.BytesIO()
        torch.save(payload, buf)
        tmp.write_bytes(buf.getvalue())

    write_atomic(Path(path), write)


def load_torch_file(path: Path, what: str) -> Any:
    """torch.load onto the CPU with weights_only=True, always: a checkpoint from a shared or downloaded
    run directory must never run code. A corrupt, foreign or code-carrying file is a user error
    naming it, not a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any object but tensors and plain containers: a planted __reduce__ ends here
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise SegError(f"{path}: {what}: it holds objects other than tensors and plain containers, which seg "
                       f"never loads ({first})") from None
    except Exception as exc:  # unpickling fails in many ways; all mean "not the file we need"
        raise SegError(f"{path}: {what} ({type(exc).__name__})") from None


def check_finite_head(weights, best: Path) -> None:
    """A head whose weights are NaN or infinite labels every pixel alike: one line, never a prediction."""
    bad = next((k for k, t in weights.items() if torch.is_tensor(t) and t.is_floating_point()
                and not torch.isfinite(t).all()), None) if isinstance(weights, dict) else None
    if bad is not None:
        raise SegError(f"{best}: head weight {bad} holds NaN or infinite values (a diverged run or a damaged "
                       "file); it would label every pixel alike: retrain, or use another run")
