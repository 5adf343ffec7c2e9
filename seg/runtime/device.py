"""Device choice and the half-precision compute type that is safe on it."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from seg.runtime.errors import SegError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SegError(f"--device {name}: no CUDA device is available on this machine (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise SegError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:  # plain "cuda": the current GPU, by its index (set_device needs one)
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise SegError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        # Make it the current device: kernels, caches and libraries that use "the" GPU follow it.
        torch.cuda.set_device(device)
    return device


def has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: every CPU torch supports, and GPUs of compute capability 8.0 (Ampere) or later.
    torch.cuda.is_bf16_supported() also counts emulation, which makes V100s and T4s run bf16 slowly."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def half_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (CPU, compute capability 8.0+), else fp16 (older GPUs)."""
    return torch.bfloat16 if has_native_bf16(device) else torch.float16


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def training_amp_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of head training. auto: on a GPU fp16 with a GradScaler, as the published
    phase-2/3 scripts trained; on a CPU bf16 (fp16 autocast with a GradScaler is a GPU path)."""
    if choice == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if choice not in AMP_DTYPES:
        raise SegError(f"--amp-dtype must be auto, bf16 or fp16, got {choice!r}")
    if choice == "bf16" and not has_native_bf16(device):
        raise SegError(f"--amp-dtype bf16: this GPU (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}) "
                       "has no bf16 in hardware; use --amp-dtype fp16 or auto")
    if choice == "fp16" and device.type != "cuda":
        raise SegError("--amp-dtype fp16 trains with a GradScaler, a GPU path; on a CPU use bf16 (or auto)")
    return AMP_DTYPES[choice]


def run_amp_dtype(amp: bool, recorded: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype to run a trained head in: the one it trained in (its record's amp_dtype)
    where this device has it, so that eval scores what training validated; else the device's half
    type (a GPU's fp16 run on a CPU, a bf16 run on a pre-Ampere GPU). Runs recorded before the
    dtype was (amp only) get the device's half type, as they always did. None without AMP."""
    if not amp:
        return None
    if recorded == "float16" and device.type == "cuda":
        return torch.float16
    if recorded == "bfloat16" and has_native_bf16(device):
        return torch.bfloat16
    return half_dtype(device)


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """With `on`, for the duration: torch's deterministic mode (kernels that have a deterministic variant
    use it, and seg's heads and losses switch to their matrix and scatter forms, see heads/resize.py
    and train/losses.py), cuDNN's deterministic algorithms without autotuning, and cuBLAS's fixed
    workspace (CUBLAS_WORKSPACE_CONFIG, read when CUDA creates its handle: set before the first matmul
    on the GPU). The previous settings come back afterwards (a sweep or a notebook goes on)."""
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def configure_matmul_precision() -> dict:
    """Set TF32 explicitly (PyTorch's defaults: off for matmuls, on for cuDNN convolutions) instead of
    leaving it to whatever an imported library changed, and return the setting for the records."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    return {"tf32_matmul": False, "tf32_cudnn_conv": True}


def environment(device: torch.device) -> dict:
    """What ran the numbers: library versions, and on a GPU its model, compute capability, CUDA, cuDNN
    and driver versions (the driver from nvidia-smi, when it is there)."""
    env = {"torch": str(torch.__version__), "device": str(device), **configure_matmul_precision()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device),
                   compute_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   cuda=str(torch.version.cuda), cudnn=str(torch.backends.cudnn.version()), driver=_driver_version())
    return env


def _driver_version() -> Optional[str]:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


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
    # Reproducing recorded features needs bf16 arithmetic, not speed: emulated bf16 (V100, T4) will do.
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SegError("the run's features were computed in bfloat16, which this GPU lacks; "
                       "use --device cpu to reproduce them")
    return dtype


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a scheduler or taskset narrows),
    shared among the ranks torchrun started on this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API on this platform
        cores = os.cpu_count() or 2
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def worker_count(cap: int = 8) -> int:
    """Loader processes: all this rank's cores but one (the compute owns it), at least 1, at most cap."""
    return max(1, min(cap, usable_cores() - 1))
