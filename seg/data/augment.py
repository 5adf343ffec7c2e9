"""Augmentation policies (DESIGN.md section 2) as pure functions of (image name, aug seed).

albumentations 2.0.8 notes that shape this module:
- `ShiftScaleRotate` is deprecated; `Affine(keep_ratio=True)` reproduces it.
- Geometric fills must send masks to the ignore index, not class 0 (`fill_mask=255`).
- `Compose(seed=...)` seeds every child with the same seed, so their coin flips are correlated;
  we hand the whole pipeline one generator per sample with `set_random_state` instead.
- `GaussianBlur` draws sigma from (0.5, 3.0); the published 1.x code had sigma 0, i.e. OpenCV's
  sigma from the kernel size. `PublishedGaussianBlur` restores that (see its docstring).
"""

from __future__ import annotations

import hashlib
import random
from typing import Optional

import albumentations as A
import cv2
import numpy as np

from seg.data.classes import IGNORE_INDEX
from seg.runtime.errors import SegError

POLICIES = ("none", "phase2", "phase3")


class PublishedGaussianBlur(A.ImageOnlyTransform):
    """albumentations 1.x `GaussianBlur(blur_limit=(3, 5))` with its default sigma_limit=0, as the
    published runs used it: the kernel size is drawn the 1.x way (randrange(lo, hi + 1), an even
    draw moved up to the next odd size, so 3 with p 1/3 and 5 with p 2/3 for (3, 5)), and
    `cv2.GaussianBlur(img, (k, k), 0)` derives sigma from k (0.8 for 3, 1.1 for 5)."""

    def __init__(self, blur_limit: tuple[int, int] = (3, 5), p: float = 0.5) -> None:
        super().__init__(p=p)
        self.blur_limit = tuple(blur_limit)

    @classmethod
    def get_class_fullname(cls) -> str:
        # The name is recorded in every cache manifest's settings: it stays what it was before this
        # module moved into seg.data, so existing caches still resume and compare equal.
        return "seg.augment.PublishedGaussianBlur"

    def get_params(self) -> dict[str, int]:
        lo, hi = self.blur_limit
        k = self.py_random.randrange(lo, hi + 1)
        if k % 2 != 1:
            k = (k + 1) % (hi + 1)
        return {"ksize": k}

    def apply(self, img: np.ndarray, ksize: int = 3, **params) -> np.ndarray:
        return cv2.GaussianBlur(img, (ksize, ksize), 0)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("blur_limit",)


BORDER_FILLS = {"ignore": IGNORE_INDEX, "background": 0}


def policy_params(name: str, border_fill: str = "ignore") -> list[dict]:
    """The policy as plain data, recorded in the cache manifest."""
    return [t.to_dict()["transform"] for t in _transforms(name, border_fill)]


def _transforms(name: str, border_fill: str = "ignore") -> list[A.BasicTransform]:
    """border_fill: what the mask gets where a geometric transform moves the image out of frame:
    ignore (ours: not scored, not learned) or background (class 0, as the published scripts did)."""
    if name not in POLICIES:
        raise SegError(f"unknown augmentation policy {name!r}; choose from {', '.join(POLICIES)}")
    if border_fill not in BORDER_FILLS:
        raise SegError(f"unknown border fill {border_fill!r}; choose from {', '.join(BORDER_FILLS)}")
    if name == "none":
        return []
    ops: list[A.BasicTransform] = [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.1),
        A.Affine(scale=(0.85, 1.15), translate_percent=(-0.08, 0.08), rotate=(-20, 20), keep_ratio=True,
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=BORDER_FILLS[border_fill], p=0.4),
        A.OneOf([PublishedGaussianBlur(blur_limit=(3, 5)), A.MedianBlur(blur_limit=5)], p=0.2),
        A.OneOf([A.RandomBrightnessContrast(), A.HueSaturationValue()], p=0.4),
    ]
    if name == "phase3":
        ops += [A.RandomShadow(p=0.15), A.CLAHE(clip_limit=2.0, p=0.15)]
    return ops


def sample_seed(image_name: str, aug_seed: int) -> int:
    """A stable 64-bit seed per (image, aug seed): same in every process, unlike hash()."""
    # surrogateescape: a name that is not UTF-8 still hashes (to its own bytes); others are unchanged
    digest = hashlib.sha256(f"{image_name}\0{aug_seed}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little")


# Patch tokens per image: far above every published setting (Cityscapes at full width, 2044x1022 at
# patch 14, is 10,658), low enough that a mistyped size fails here, not in a 100 GiB allocation.
MAX_TOKENS = 16384


def parse_size(text: str, patch_size: int = 14) -> tuple[int, int]:
    """'WxH' -> (W, H), both multiples of the patch size."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SegError(f"--size must look like 644x364 (width x height), got {text!r}") from None
    if w <= 0 or h <= 0 or w % patch_size or h % patch_size:
        raise SegError(f"--size {text}: both sides must be positive multiples of {patch_size} "
                       f"(e.g. {max(1, round(w / patch_size)) * patch_size}x{max(1, round(h / patch_size)) * patch_size})")
    tokens = (w // patch_size) * (h // patch_size)
    if tokens > MAX_TOKENS:
        # Checked before anything is allocated or written: attention memory grows with tokens squared.
        scale = (MAX_TOKENS / tokens) ** 0.5
        raise SegError(f"--size {text}: {w // patch_size}x{h // patch_size} = {tokens} patch tokens per image, more "
                       f"than seg's limit of {MAX_TOKENS} (e.g. {int(w * scale) // patch_size * patch_size}x"
                       f"{int(h * scale) // patch_size * patch_size}); score larger images with `seg eval --mode slide`")
    return w, h


class Augmenter:
    """Resize to the input size, then the policy; seed 0 means resize only (the cache gives it to
    val/test, and to train only without a policy)."""

    def __init__(self, policy: str, size: tuple[int, int], border_fill: str = "ignore") -> None:
        w, h = size
        self.policy = policy
        self.resize = A.Compose([A.Resize(height=h, width=w, interpolation=cv2.INTER_LINEAR,
                                          mask_interpolation=cv2.INTER_NEAREST)], strict=True)
        ops = _transforms(policy, border_fill)
        self.augment = A.Compose(ops, strict=True) if ops else None

    def __call__(
        self, image: np.ndarray, mask: Optional[np.ndarray], image_name: str, aug_seed: int
    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        kwargs = {"image": image} if mask is None else {"image": image, "mask": mask}
        out = self.resize(**kwargs)
        if aug_seed != 0 and self.augment is not None:
            s = sample_seed(image_name, aug_seed)
            self.augment.set_random_state(np.random.default_rng(s), random.Random(s))
            out = self.augment(**{k: out[k] for k in kwargs})
        return np.ascontiguousarray(out["image"]), (None if mask is None else np.ascontiguousarray(out["mask"]))
