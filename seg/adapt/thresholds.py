"""Class-balanced pseudo-label selection as CBST does it (Zou et al., ECCV 2018; the authors' CRST
code, `kc_parameters` and `label_selection`).

Thresholds: per class c, the confidences (max softmax) of the pixels predicted c, sorted descending;
with n_c of them, the threshold is the floor(n_c x portion)-th largest (1-based); a class with no such
pixel, or with floor(n_c x portion) = 0, keeps threshold 1. Labels: the argmax of probability /
threshold per class, kept where that ratio is >= 1, else ignore (255). CRST collects the confidences on
every ds_rate-th pixel in each direction (ds_rate 4): `stride` here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

IGNORE = 255


def class_thresholds(confidences: list[np.ndarray], portion: float) -> np.ndarray:
    """float32 [K] thresholds from each class's confidences (any order)."""
    thresholds = np.ones(len(confidences), np.float32)
    for c, conf in enumerate(confidences):
        if conf is None or len(conf) == 0:
            continue
        k = int(math.floor(len(conf) * portion))
        if k:
            thresholds[c] = -np.partition(-np.asarray(conf, np.float32), k - 1)[k - 1]  # k-th largest
    return thresholds


def select_labels(probs: Tensor, thresholds: Tensor) -> Tensor:
    """probs [B, K, H, W] -> uint8 labels [B, H, W]: argmax of probs / thresholds where it is >= 1."""
    weighted = probs / thresholds.to(probs)[None, :, None, None]
    conf, labels = weighted.max(1)
    labels = labels.to(torch.uint8)
    labels[conf < 1] = IGNORE
    return labels


def sampled_confidences(probs: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """(predicted class, confidence) of every stride-th pixel in each direction, flattened."""
    conf, pred = probs[:, :, ::stride, ::stride].max(1)
    return pred.flatten(), conf.flatten()
