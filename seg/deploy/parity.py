"""How far an exported graph's answers are from the eager model's, and the bound that refuses a bad one.

The bound, and why: the exported graph computes what the eager float32 graph computes, only with
another library's kernels (other summation orders, fused attention or not). Such differences are
float32 rounding, around 1e-6 of the logits' scale per layer and 1e-5 to 1e-4 after a ViT, a head and
the float16 rounding of the tokens (measured: 6e-6 to 9e-5 relative on random-weight ViT-S models).
A translation error (a wrong resize mode, position embedding, normalisation or layout) moves logits
by a sizeable fraction of their scale. So a graph is refused when any logit differs by more than
LOGIT_BOUND times the largest eager logit magnitude (at least 1), or when a pixel whose eager top
two logits are further apart than twice that tolerance gets another label: rounding can only flip
near-ties."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

LOGIT_BOUND = 1e-3


@dataclass
class Parity:
    reference: str               # what the ONNX outputs were compared with
    images: int
    max_abs_logit_diff: float
    logit_scale: float           # the largest |eager logit|
    tolerance: float             # LOGIT_BOUND x max(1, logit_scale)
    label_agreement: float       # fraction of pixels with equal labels
    decided_pixels: int          # pixels whose eager top-2 margin exceeds 2 x tolerance
    decided_disagreements: int   # of those, how many changed label

    @property
    def within_bound(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.decided_disagreements == 0

    def to_json(self) -> dict:
        return {**asdict(self), "within_bound": self.within_bound}


def compare(reference: str, onnx_labels: np.ndarray, onnx_logits: np.ndarray, eager_logits: np.ndarray,
            eager_labels: np.ndarray | None = None) -> Parity:
    """ONNX labels [N, H, W] and logits [N, K, H, W] against eager logits (and labels: their argmax
    when not given) of the same images."""
    if onnx_logits.shape != eager_logits.shape:
        raise ValueError(f"ONNX logits {onnx_logits.shape} vs eager {eager_logits.shape}")
    eager_labels = eager_logits.argmax(1) if eager_labels is None else eager_labels
    scale = float(np.abs(eager_logits).max())
    tolerance = LOGIT_BOUND * max(1.0, scale)
    top2 = np.sort(eager_logits, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * tolerance
    differ = onnx_labels.astype(np.int64) != eager_labels.astype(np.int64)
    return Parity(reference=reference, images=int(onnx_logits.shape[0]),
                  max_abs_logit_diff=float(np.abs(onnx_logits - eager_logits).max()), logit_scale=scale,
                  tolerance=tolerance, label_agreement=float(1.0 - differ.mean()),
                  decided_pixels=int(decided.sum()), decided_disagreements=int((differ & decided).sum()))
