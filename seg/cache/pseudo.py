"""Pseudo-labels: a teacher's masks for an unlabeled split of a cache, kept beside it, never in it.

A pseudo-label folder holds `pseudo.json` (what they were made from and how: the source cache, its
settings fingerprint and the split's shard checksums, the teacher run, the thresholds, per-class
counts) and `masks.npy` (uint8 [samples, H, W], sample k = cached sample k of the split, 255 where no
label was kept). The tokens stay in the source cache: `PseudoSplit` reads them there and the masks
here, so a round of pseudo-labels costs the masks' bytes, not a copy of the features.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from seg.backbones import file_sha256
from seg.cache import format as cf
from seg.runtime.errors import SegError
from seg.runtime.json_file import read_json

PSEUDO_FORMAT = "seg-pseudo-labels"
PSEUDO_VERSION = 1
RECORD, MASKS = "pseudo.json", "masks.npy"


def settings_fingerprint(manifest: dict) -> str:
    """sha256 of a cache's settings without its splits: equal for caches of the same features."""
    settings = cf.settings_of(manifest)
    settings.pop("splits")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def split_fingerprint(manifest: dict, split: str) -> list:
    """The split's images, seeds and shard checksums: pseudo-labels belong to exactly these samples."""
    s = manifest["splits"][split]
    return [s["images"], s["seeds"], [sh.get("sha256") for sh in s["shards"]]]


def read_pseudo(folder: str | Path) -> dict:
    """The record of a pseudo-label folder, checked: its format, and its masks file's sha256."""
    folder = Path(folder)
    path = folder / RECORD
    if not path.is_file():
        raise SegError(f"{folder}: not a pseudo-label folder (no {RECORD}; `seg pseudo-label` writes one)")
    record = read_json(path, "pseudo-label record")
    if not isinstance(record, dict) or record.get("format") != PSEUDO_FORMAT:
        raise SegError(f"{path}: not a seg pseudo-label record")
    if record.get("format_version") != PSEUDO_VERSION:
        raise SegError(f"{path}: pseudo-label format version {record.get('format_version')!r}; this seg reads "
                       f"version {PSEUDO_VERSION}: label the split again with this seg")
    masks = folder / MASKS
    if not masks.is_file() or file_sha256(masks) != record.get("masks_sha256"):
        raise SegError(f"{masks}: missing or changed since `seg pseudo-label` wrote it (sha256); label the split again")
    return record


def open_pseudo(folder: str | Path, cache) -> "PseudoSplit":
    """The pseudo-labelled split of `cache` (a FeatureCache) that `folder` labels, refusing labels of
    another cache's features or of other samples than the split now holds."""
    record = read_pseudo(folder)
    m = cache.manifest
    if record["settings_fingerprint"] != settings_fingerprint(m):
        raise SegError(f"{folder}: pseudo-labels of a cache with other features ({record['cache']}), not of "
                       f"{cache.path}; pass the cache they were made from")
    split = record["split"]
    if split not in m["splits"] or record["split_fingerprint"] != split_fingerprint(m, split):
        raise SegError(f"{folder}: labels the {split!r} split as it was when labelled; {cache.path} holds other "
                       f"samples there now: label it again")
    return PseudoSplit(cache.split(split), Path(folder), record)


class PseudoSplit:
    """A cached split read with pseudo-label masks: tokens (and prefix tokens) from the cache, masks
    from the folder's masks.npy (memory-mapped, read-only)."""

    def __init__(self, split, folder: Path, record: dict) -> None:
        self.split, self.folder, self.record = split, folder, record
        self.masks = np.load(folder / MASKS, mmap_mode="r", allow_pickle=False)
        expect = (len(split), *split.manifest["mask_shape"])
        if self.masks.shape != expect or self.masks.dtype != np.uint8:
            raise SegError(f"{folder / MASKS}: holds {self.masks.dtype} {self.masks.shape}, not uint8 {expect}")
        self.manifest, self.images, self.seeds = split.manifest, split.images, split.seeds
        self.row_shape, self.row_dtype, self.name = split.row_shape, split.row_dtype, split.name

    def __len__(self) -> int:
        return len(self.split)

    def __getstate__(self) -> dict:  # a reader process maps the file itself instead of a pickled copy
        state = self.__dict__.copy()
        state["masks"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.masks = np.load(self.folder / MASKS, mmap_mode="r", allow_pickle=False)

    def read_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens, _ = self.split.read_rows(indices)
        return tokens, np.ascontiguousarray(self.masks[np.asarray(indices)])

    def read_prefix(self, indices: np.ndarray) -> np.ndarray:
        return self.split.read_prefix(indices)

    def load(self, device: torch.device | str = "cpu", progress: Optional[Callable[[int], None]] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, _ = self.split.load(device, progress)
        return tokens, torch.from_numpy(np.array(self.masks)).to(device)  # a writable copy of the map

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.split.dequantize(tokens)

    def advise(self, indices: np.ndarray) -> None:
        self.split.advise(indices)
