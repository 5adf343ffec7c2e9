"""Device choice and the half-precision compute type that is safe on it."""

from __future__ import annotations

import contextlib
import os

import torch

from seg.runtime.errors import SegError


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


def autocast(device: torch.device, enabled: bool = True, dtype: torch.dtype | None = None
             ) -> contextlib.AbstractContextManager:
    """Half-precision autocast in `dtype` (default: the device's safe half type); off when not enabled."""
    if not enabled or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype or half_dtype(device))


def recorded_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype a cache recorded ('float32', 'bfloat16', 'float16'), checked against the device."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise SegError(f"unknown compute dtype {name!r} in the run's record")
    dtype = dtypes[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SegError("the run's features were computed in bfloat16, which this GPU lacks; "
                       "use --device cpu to reproduce them")
    return dtype


def worker_count(cap: int = 8) -> int:
    """Loader processes: all cores but one (the compute owns it), at least 1, at most cap."""
    return max(1, min(cap, (os.cpu_count() or 2) - 1))
