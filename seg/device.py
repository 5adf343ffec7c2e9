"""Device choice and the half-precision compute type that is safe on it."""

from __future__ import annotations

import contextlib

import torch

from seg.errors import SegError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SegError(f"--device {name}: no CUDA device is available on this machine (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise SegError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def half_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (CPU, Ampere+), else fp16 (older GPUs)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=half_dtype(device))
