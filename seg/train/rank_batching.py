"""How a preset's batch is split over torchrun ranks. A preset's batch x accum is the batch of the
published experiment: one optimizer step sees that many samples. Under DDP seg keeps it by giving each
rank a share, instead of letting every rank take the whole batch (which multiplies it by the world)."""

from __future__ import annotations

from seg.runtime.errors import SegError


def rank_batching(batch: int, accum: int, world: int, scale: bool = False) -> tuple[int, int]:
    """(per-rank batch, per-rank accumulation steps) whose product times world is batch x accum; with
    `scale` (--scale-batch) every rank takes the whole batch and accumulation (global x world)."""
    if world == 1 or scale:
        return batch, accum
    if accum % world == 0:  # each rank accumulates its share of the steps at the preset's batch
        return batch, accum // world
    if (batch * accum) % world == 0:
        return batch * accum // world, 1
    raise SegError(f"a global batch of {batch} x accum {accum} = {batch * accum} samples per step cannot be "
                   f"split over {world} ranks; pass --batch-size/--accum whose product is a multiple of "
                   f"{world}, or --scale-batch to give every rank the whole batch (global {batch * accum * world})")
