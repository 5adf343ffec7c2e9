"""PMT's masked-attention annealing (tue-mps/pmt `lightning_module.py`, `mask_annealing`), scaled to a
run's length.

Block i keeps its attention mask with probability 1 until step start_i, then (1 - progress)^0.9 until
end_i, then 0. The published ADE20K run (`pmt_l_512.yaml`: 16 epochs of 1264 steps) anneals its six
blocks over the steps below; a run of T steps uses them scaled by T / 20224, so each block anneals
over the same share of training. A decoder with another block count takes the published entries
spread evenly over its blocks (first and last kept)."""

from __future__ import annotations

PUBLISHED_STEPS = 20224
PUBLISHED_START = (0, 5384, 7403, 9422, 11442, 13461)
PUBLISHED_END = (3000, 8749, 10769, 12788, 14807, 16826)
POLY_POWER = 0.9


def block_windows(num_blocks: int, total_steps: int) -> list[tuple[float, float]]:
    """(start, end) step of each block's annealing in a run of total_steps optimizer steps."""
    n = len(PUBLISHED_START)
    scale = total_steps / PUBLISHED_STEPS
    picks = [round(i * (n - 1) / (num_blocks - 1)) if num_blocks > 1 else 0 for i in range(num_blocks)]
    return [(PUBLISHED_START[j] * scale, PUBLISHED_END[j] * scale) for j in picks]


def mask_probability(start: float, step: int, end: float, power: float = POLY_POWER) -> float:
    """PMT's `mask_annealing(start, current, final)`: 1 before start, 0 from end on, poly in between."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return (1.0 - (step - start) / (end - start)) ** power


def mask_probabilities(num_blocks: int, step: int, total_steps: int) -> list[float]:
    """Every block's probability of keeping its mask after `step` optimizer steps."""
    return [mask_probability(s, step, e) for s, e in block_windows(num_blocks, total_steps)]
