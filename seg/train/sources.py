"""Feeding cached samples to the trainer: which samples an epoch visits, and from where
(preloaded on the device, or streamed from the shards by DataLoader workers)."""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from seg.backbones.features import pack_levels
from seg.cache import CacheSplit
from seg.cache import format as cf
from seg.runtime.device import worker_count


def epoch_indices(num_images: int, num_seeds: int, epoch: int, seed: int, all_seeds: bool = False) -> np.ndarray:
    """Sample indices for one epoch, shuffled: every image once with one of its cached aug seeds
    drawn at random (K cached seeds stand in for on-line augmentation), or every (image, seed).
    A pure function of (seed, epoch), so a resumed or distributed run draws the same."""
    rng = np.random.default_rng([seed, epoch])
    if all_seeds:
        idx = np.arange(num_images * num_seeds)
    else:
        idx = rng.integers(0, num_seeds, num_images) * num_images + np.arange(num_images)
    return idx[rng.permutation(len(idx))]


def batches_of(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def split_bytes(split: CacheSplit, levels: bool = False) -> int:
    """What the split holds in memory when preloaded: its stored rows (int8 caches stay 8-bit) and masks,
    and with `levels` its float16 prefix tokens."""
    per = int(np.prod(split.row_shape)) * split.row_dtype.itemsize + int(np.prod(split.manifest["mask_shape"]))
    if levels:
        per += 2 * int(np.prod(cf.prefix_shape(split.manifest) or (0,)))
    return per * len(split)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def gradient_bytes(head: torch.nn.Module) -> int:
    """Bytes of one tensor the size of every trainable parameter, in its dtype: the gradients."""
    return sum(p.numel() * p.element_size() for p in head.parameters() if p.requires_grad)


def optimizer_state_bytes(head: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """What the optimizer will hold once it steps: AdamW two moments, SGD with momentum one buffer,
    per trainable parameter, in the parameter's dtype (allocated lazily at the first step, so not in
    the free memory measured before it)."""
    group = optimizer.param_groups[0]
    buffers = 2 if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) else int(group.get("momentum", 0) > 0)
    return buffers * gradient_bytes(head)


def choose_preload(mode: str, splits: list[CacheSplit], device: torch.device,
                   free: Optional[int] = None, training: int = 0, training_how: str = "",
                   levels: bool = False) -> tuple[bool, str]:
    """(preload?, the reason in words). 'auto' preloads when the data fills at most half of the free
    memory of the training device (the GPU's, when training on one) and the data plus what training
    the head needs beyond its weights (`training` bytes: optimizer state, gradients, activations;
    `training_how` says how they were known) fit in 90 % of it."""
    need = sum(split_bytes(s, levels) for s in splits)
    if mode == "always":
        return True, f"preload: always ({need / 1e9:.2f} GB on {device.type})"
    if mode == "never":
        return False, "preload: never (streaming from shards)"
    free = available_memory(device) if free is None else free
    head = f" + {training / 1e9:.2f} GB to train the head ({training_how})" if training else ""
    if need <= 0.5 * free and need + training <= 0.9 * free:
        return True, f"preload: auto -> on {device.type} ({need / 1e9:.2f} GB of data{head}, {free / 1e9:.1f} GB free)"
    why = (f"{need / 1e9:.2f} GB of data > half of {free / 1e9:.1f} GB free" if need > 0.5 * free else
           f"{need / 1e9:.2f} GB of data{head} > 90 % of {free / 1e9:.1f} GB free")
    return False, f"preload: auto -> streaming ({why})"


def read_batch(split: CacheSplit, rows: np.ndarray, device: torch.device, levels: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch as a head reads it, straight from the shards: (tokens, masks) on the device, the
    tokens packed with their prefix tokens into levels (`pack_levels`) for a mask decoder."""
    tokens, masks = split.read_rows(rows)
    tokens = split.dequantize(torch.from_numpy(tokens).to(device))
    if levels:
        tokens = pack_levels(tokens, torch.from_numpy(split.read_prefix(rows)).to(device))
    return tokens, torch.from_numpy(masks).to(device)


class PreloadedSplit:
    """A whole split held on the training device: a batch is one indexing op. With `levels` (a mask
    decoder), the prefix tokens are held too and every batch is packed into levels."""

    def __init__(self, split: CacheSplit, device: torch.device, levels: bool = False) -> None:
        self.split = split
        self.tokens, self.masks = split.load(device)
        self.prefix = torch.from_numpy(split.read_prefix(np.arange(len(split)))).to(device) if levels else None
        self.device = device

    def batches(self, batches: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in batches:
            idx = torch.from_numpy(b).to(self.device)
            tokens = self.split.dequantize(self.tokens[idx])
            yield (tokens if self.prefix is None else pack_levels(tokens, self.prefix[idx])), self.masks[idx]

    def close(self) -> None:
        """Frees the device memory now (a sweep trains many heads in one process)."""
        self.tokens = self.masks = self.prefix = None


class _Rows(Dataset):
    """One batch of rows, asked for as (rows, the next batch's rows or None): (tokens, masks, prefix
    tokens or an empty tensor)."""

    def __init__(self, split: CacheSplit, levels: bool = False) -> None:
        self.split, self.levels = split, levels

    def __getitem__(self, key: tuple[np.ndarray, Optional[np.ndarray]]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, ahead = key
        if ahead is not None:  # the disk fetches the next batch while this one trains
            self.split.advise(ahead)
        tokens, masks = self.split.read_rows(rows)
        prefix = torch.from_numpy(self.split.read_prefix(rows)) if self.levels else torch.empty(0)
        return torch.from_numpy(tokens), torch.from_numpy(masks), prefix


class _EpochBatches(Sampler):
    """The batches of the epoch being run. It lives in the training process and is refilled every
    epoch, so the reader processes, which outlive epochs, need not be started again."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[np.ndarray, Optional[np.ndarray]]]:
        b = self.batches
        return ((b[j], b[j + 1] if j + 1 < len(b) else None) for j in range(len(b)))


class StreamedSplit:
    """Batches read from the shards by worker processes, each with its own HDF5 handles; host
    memory holds only the batches in flight, whatever the cache size."""

    def __init__(self, split: CacheSplit, device: torch.device, workers: Optional[int] = None,
                 levels: bool = False) -> None:
        self.split, self.device, self.levels = split, device, levels
        # On a CPU the training step owns every core, and a checked shard reads at page-cache speed
        # (one pread per row): reading in this process beat a reader process (12.8 vs 11.2 samples/s at
        # phase 3). A GPU leaves the cores idle, so reader processes overlap the reads with its steps.
        if workers is None:
            workers = worker_count(4) if device.type == "cuda" else 0
        self.workers = workers
        self._epoch = _EpochBatches()
        self._loader: Optional[DataLoader] = None

    def loader(self) -> DataLoader:
        """One loader for the whole run: its reader processes start once and keep their open shards
        (a loader per epoch forked them again and reopened every shard each epoch; under the spawn
        and forkserver start methods each start also imports torch). For a GPU, batches land in
        pinned host memory so that the copies below overlap with compute (non_blocking)."""
        if self._loader is None:
            self._loader = DataLoader(_Rows(self.split, self.levels), sampler=self._epoch, batch_size=None,
                                      num_workers=self.workers, persistent_workers=self.workers > 0,
                                      pin_memory=self.device.type == "cuda",
                                      prefetch_factor=4 if self.workers else None,
                                      # its own generator: each epoch's iterator draws a seed from it, which
                                      # from the global one would shift a mask decoder's random points
                                      generator=torch.Generator())
        return self._loader

    def batches(self, batches: list[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._epoch.batches = batches
        for tokens, masks, prefix in self.loader():
            # int8 rows cross to the device as bytes and become float16 tokens there
            tokens = self.split.dequantize(tokens.to(self.device, non_blocking=True))
            if self.levels:
                tokens = pack_levels(tokens, prefix.to(self.device, non_blocking=True))
            yield tokens, masks.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stops the reader processes (dropping the last reference to the loader shuts them down)."""
        self._loader = None
