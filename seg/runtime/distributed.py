"""Running under torchrun: rank, world size, and the few collectives the stages need.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from seg.runtime.errors import SegError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(device_name: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=collective_timeout())
    return Dist(rank, world, local)


def collective_timeout() -> timedelta:
    """How long a rank waits at a collective. Rank 0 alone finalises an extraction (sha256 of every
    shard) and the other ranks wait at the barrier meanwhile: hours of data take longer than the
    library's 10-minute default, so seg waits 60 minutes unless SEG_DIST_TIMEOUT_MIN says otherwise."""
    text = os.environ.get("SEG_DIST_TIMEOUT_MIN", "60")
    try:
        minutes = float(text)
    except ValueError:
        raise SegError(f"SEG_DIST_TIMEOUT_MIN must be a number of minutes, got {text!r}") from None
    if minutes <= 0:
        raise SegError(f"SEG_DIST_TIMEOUT_MIN must be positive, got {text!r}")
    return timedelta(minutes=minutes)


def rank_device(d: Dist, device_name: str) -> str:
    """Each rank takes its own GPU (cuda:LOCAL_RANK) when the device is auto or plain cuda. A fixed
    cuda:N would put every rank on the same GPU, so under torchrun it is refused."""
    if d.active and device_name.startswith("cuda:"):
        raise SegError(f"--device {device_name} under torchrun would put every rank on GPU {device_name[5:]}; torchrun "
                       "gives each rank its own GPU (cuda:LOCAL_RANK): pass --device cuda or auto, and choose the "
                       "GPUs with CUDA_VISIBLE_DEVICES")
    if d.active and device_name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{d.local_rank}"
    return device_name


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def on_main(d: Dist, fn: Callable[[], T]) -> Optional[T]:
    """Run fn on rank 0 only; its result reaches every rank, and a user error there is raised on every
    rank (so none waits forever)."""
    error = None
    result = None
    if d.is_main:
        try:
            result = fn()
        except SegError as exc:
            error = str(exc)
    if d.active:
        box = [error, result]
        dist.broadcast_object_list(box, src=0)
        error, result = box
    if error is not None:
        raise SegError(error)
    return result


def all_reduce_sum(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (gloo reduces CPU tensors, nccl GPU ones)."""
    if d.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
