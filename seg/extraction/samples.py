"""What the extraction loop is fed: decoded, pasted and augmented samples, batched within shards."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from seg.cache import format as cf
from seg.data.augment import Augmenter
from seg.data.class_stats import class_counts
from seg.data.classes import IGNORE_INDEX
from seg.data.copy_paste import CopyPasteConfig, copy_paste
from seg.data.decode import MaskDecoder, read_split_pair
from seg.data.layouts import SplitFiles
from seg.runtime.device import usable_cores, worker_count
from seg.runtime.errors import SegError
from seg.runtime.progress import progress_bar


class ExtractionSamples(Dataset):
    """Sample k of a split -> resized, augmented uint8 image and class-id mask (or an error text).
    Copy-paste (train, seeds >= 1) happens at the original size, before the resize and the policy."""

    def __init__(self, files: SplitFiles, seeds: list[int], augmenter: Augmenter, decoder: MaskDecoder,
                 paste: Optional[CopyPasteConfig] = None) -> None:
        self.files, self.seeds, self.augmenter, self.decoder, self.paste = files, seeds, augmenter, decoder, paste

    def __len__(self) -> int:
        return len(self.files.names) * len(self.seeds)

    def __getitem__(self, k: int) -> dict:
        i, seed = cf.sample_of(k, len(self.files.names), self.seeds)
        try:
            image, mask = read_split_pair(self.files, i, self.decoder)
            if mask is None:  # an unlabeled split: every pixel ignored until a teacher labels it
                mask = np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
            if self.paste is not None and seed != 0:
                image, mask, _ = copy_paste(image, mask, i, self.files.names[i], seed, self.paste,
                                            lambda j: read_split_pair(self.files, j, self.decoder))
            image, mask = self.augmenter(image, mask, self.files.names[i], seed)
            if self.files.flip_of is not None:  # the twin of a view: the same draw, mirrored
                image, mask = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
        except SegError as exc:
            # Raised in a worker, an exception comes back wrapped in a traceback; pass the text instead.
            return {"error": str(exc), "k": k}
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask), "k": k}


def collate(batch: list[dict]) -> dict:
    errors = [b["error"] for b in batch if "error" in b]
    if errors:
        return {"error": errors[0]}
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "mask": torch.stack([b["mask"] for b in batch]),
        "k": torch.tensor([b["k"] for b in batch]),
    }


def extraction_workers(device: torch.device) -> int:
    """Decode/augment processes. On a CPU with 2 cores a decoder steals one of the backbone's two
    threads: decoding in the main process between batches measured as fast or faster (ViT-S 476x266:
    49-52 % of the bf16 matmul rate with 0 workers against 42-49 % with 1; ViT-B: equal), so none there.
    With more cores, or a GPU doing the compute, decoders overlap with it."""
    cores = usable_cores()
    return 0 if device.type == "cpu" and cores <= 2 else worker_count()


def scan_class_counts(files: SplitFiles, decoder: MaskDecoder, num_classes: int, progress: bool) -> np.ndarray:
    """int64 [n_images, K] class pixels of every train mask at its original size (for copy-paste)."""
    counts = np.zeros((len(files.names), num_classes), np.int64)
    for i in progress_bar(range(len(files.names)), progress, desc="scan train masks", unit="mask", leave=False):
        counts[i] = class_counts(decoder.read(files.mask_path(i))[None], num_classes)[0]
    return counts
