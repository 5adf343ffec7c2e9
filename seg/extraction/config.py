"""What `seg extract` is asked to do: one dataclass, the command line's flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from seg.data.copy_paste import copy_paste_requested
from seg.data.layouts import DEFAULT_VAL_FRACTION

DEFAULT_SHARD_SIZE = 64
# The published runs drew a fresh augmentation every epoch (30-40 draws per image); K cached views
# stand in for them. 4 is where val mIoU on the synthetic set stopped rising (BENCHMARKS.md,
# "Augmented views per image") at 4x the extraction time and cache size of K = 1.
DEFAULT_AUG_SEEDS = 4


@dataclass
class ExtractConfig:
    data: str
    out: str
    layout: str = "auto"                    # auto | falcon | folders | cityscapes | ade20k | voc
    backbone: str = "vitb14_reg"
    size: str = "644x364"
    weights: Optional[str] = None
    random_init: bool = False
    random_init_seed: int = 0
    aug_policy: str = "none"
    border_fill: str = "ignore"             # mask fill of geometric transforms: ignore | background (published)
    aug_seeds: Optional[int] = None         # None: DEFAULT_AUG_SEEDS with a policy or copy-paste, else 1
    splits: tuple[str, ...] = ("train", "val")
    layers: str = "1"
    tap_block: Optional[int] = None         # store the un-normed stream entering this block instead
    batch_size: int = 8
    device: str = "auto"
    workers: Optional[int] = None
    shard_size: int = DEFAULT_SHARD_SIZE
    classes: Optional[str] = None
    overwrite: bool = False
    half: bool = True
    token_dtype: str = "fp16"               # fp16 | int8 (8-bit values with float16 group scales)
    progress: bool = True
    copy_paste: Optional[str] = None        # none | auto | class names/ids (train seeds only)
    copy_paste_scale: tuple[float, float] = (0.5, 1.5)
    val_fraction: float = DEFAULT_VAL_FRACTION  # a plain folder (images/, masks/): the share drawn for val
    unlabeled: tuple[str, ...] = ()         # NAME=FOLDER or NAME=VIDEO: images without masks, cached as split NAME
    every: int = 1                          # of those, every N-th image (name order) or video frame
    flip_views: bool = False                # and each one's twin split NAME-flip: its views mirrored (flip TTA)

    @property
    def copy_paste_enabled(self) -> bool:
        return copy_paste_requested(self.copy_paste)

    @property
    def augmented(self) -> bool:
        return self.aug_policy != "none" or self.copy_paste_enabled

    def seeds_k(self) -> int:
        """K, the augmented views cached per train image: as given, else the default for the policy."""
        if self.aug_seeds is not None:
            return self.aug_seeds
        return DEFAULT_AUG_SEEDS if self.augmented else 1
