"""Rare-class sampling over cached samples (DAFormer, Hoyer et al., CVPR 2022, section 3.3).

Class c is drawn with P(c) = softmax((1 - f_c) / T), f_c its share of the train pixels, then a
cached (image, seed) sample holding at least `min_pixels` of c is drawn uniformly. Every draw is a
pure function of (seed, epoch), so resumed and distributed runs draw the same samples.
"""

from __future__ import annotations

import numpy as np

from seg.runtime.errors import SegError

# DAFormer's threshold: 3000 pixels of a 1024x512 crop; scaled by our mask area.
REFERENCE_PIXELS, REFERENCE_AREA = 3000, 1024 * 512


def default_min_pixels(mask_shape: tuple[int, int]) -> int:
    h, w = mask_shape
    return max(1, round(REFERENCE_PIXELS * h * w / REFERENCE_AREA))


def class_probabilities(freq: np.ndarray, temperature: float, eligible: np.ndarray) -> np.ndarray:
    """softmax((1 - f_c) / T) over the classes that have at least one eligible sample (others 0)."""
    logits = np.where(eligible, (1.0 - freq) / temperature, -np.inf)
    logits = logits - logits[eligible].max()
    p = np.exp(logits)
    return p / p.sum()


class RareClassSampler:
    """Draws an epoch of sample indices from per-sample class counts [N, K]."""

    def __init__(self, counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 1) -> None:
        if temperature <= 0 or not np.isfinite(temperature):
            raise SegError(f"--rcs-temperature must be a finite number > 0, got {temperature}")
        self.counts = counts
        total = counts.sum(0).astype(np.float64)
        self.freq = total / total.sum() if total.sum() else np.zeros(len(total))
        self.holders = [np.flatnonzero(counts[:, c] >= min_pixels) for c in range(counts.shape[1])]
        eligible = np.array([len(h) > 0 for h in self.holders])
        if not eligible.any():
            raise SegError(f"rare-class sampling: no cached sample holds {min_pixels} pixels of any class "
                           "(lower --rcs-min-pixels)")
        self.probs = class_probabilities(self.freq, temperature, eligible)

    def draw(self, n: int, epoch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices [n], drawn classes [n]) for one epoch."""
        rng = np.random.default_rng([seed, epoch, 0x5C5])  # a stream of its own, apart from the uniform draw
        classes = rng.choice(len(self.probs), size=n, p=self.probs)
        picks = rng.random(n)
        idx = np.array([self.holders[c][int(u * len(self.holders[c]))] for c, u in zip(classes, picks)], np.int64)
        return idx, classes
