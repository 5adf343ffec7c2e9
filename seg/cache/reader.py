"""Reading a feature cache: the directory (`FeatureCache`) and one split's samples (`CacheSplit`)."""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from seg.cache import format as cf
from seg.cache.prefix_rows import read_prefix
from seg.runtime.atomic import write_json
from seg.backbones import file_sha256
from seg.cache.quant import QuantSpec
from seg.cache.raw_rows import plain_rows, pread_into, row_offsets
from seg.cache.row_checks import bad_row
from seg.cache.whole_split import count_split_classes, load_split
from seg.data.classes import ClassTable
from seg.runtime.errors import SegError


class FeatureCache:
    """A complete cache directory; `split(name)` gives its samples."""

    def __init__(self, path: str | Path, require_complete: bool = True) -> None:
        self.path = Path(path)
        self.manifest = cf.read_manifest(self.path)
        # shard file name -> (size, mtime_ns) when its sha256 matched the manifest in this process;
        # shared with every split, whose token reads then skip the per-chunk checksums
        self.verified: dict[str, tuple[int, int]] = {}
        if require_complete and not self.manifest.get("complete"):
            raise SegError(f"{self.path}: cache is incomplete (extraction was interrupted); "
                           "rerun the same `seg extract` command to finish it")

    @property
    def class_table(self) -> ClassTable:
        return ClassTable.from_json(self.manifest["class_table"], source=str(self.path / cf.MANIFEST))

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def in_channels(self) -> int:
        layers, dim = cf.head_input(self.manifest)
        return layers * dim

    @property
    def head_layers(self) -> int:
        return cf.head_input(self.manifest)[0]

    def check_shards(self, splits: list[str], progress: Optional[Callable[[int], None]] = None) -> tuple[int, int]:
        """Every shard of these splits against the manifest's sha256, before anything reads it: HDF5
        reads damaged metadata as the fill value (zeros) without an error, so a checksum over the
        whole file is the only check that cannot be fooled. Returns (shards, bytes) checked."""
        n, total = 0, 0
        for name in splits:
            self.split(name)  # a clear error for a missing split
            for sh in self.manifest["splits"][name]["shards"]:
                path = self.path / sh["file"]
                if not path.is_file():
                    raise SegError(f"{path}: shard missing; the cache is damaged (`seg cache verify {self.path}`)")
                before = os.stat(path)
                if file_sha256(path) != sh["sha256"]:
                    raise SegError(f"{path}: sha256 differs from the manifest (corrupt or changed shard); "
                                   f"run `seg cache verify {self.path}`, re-extract, or pass --no-verify to use it anyway")
                after = os.stat(path)
                if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
                    self.verified[sh["file"]] = (after.st_size, after.st_mtime_ns)
                n, total = n + 1, total + sh["bytes"]
                if progress:
                    progress(sh["bytes"])
        return n, total

    def adopt_verified(self, checked: dict[str, tuple[int, int]]) -> None:
        """Trust another process's sha256 check (torchrun's rank 0 hashes once for all ranks) for each
        shard that is, here, the very file it checked (same size and mtime); any other shard is read
        through HDF5, whose per-chunk checksums still apply."""
        for name, seen in checked.items():
            try:
                st = os.stat(self.path / name)
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == tuple(seen):
                self.verified[name] = (st.st_size, st.st_mtime_ns)

    def class_counts(self, name: str, persist: bool = True) -> np.ndarray:
        """int64 [N, K] class pixels of every sample of a split, in sample order. Version-3 caches
        carry them in the manifest; for older ones they are counted from the masks once and kept in
        CLASS_COUNTS_FILE, tied to the shards' checksums; only where `persist` (under torchrun, rank 0
        alone writes it: every rank writing through the same temporary name would clash)."""
        s = self.split(name).manifest["splits"][name]
        if "class_counts" in s:
            return np.asarray(s["class_counts"], np.int64).reshape(-1, len(self.class_table.names))
        side = self.path / cf.CLASS_COUNTS_FILE
        key = [sh["sha256"] for sh in s["shards"]]
        stored = {}
        if side.exists():
            try:
                stored = json.loads(side.read_text())
            except (OSError, ValueError):
                stored = {}
        entry = stored.get(name)
        if isinstance(entry, dict) and entry.get("shards_sha256") == key:
            return np.asarray(entry["counts"], np.int64).reshape(-1, len(self.class_table.names))
        counts = self.split(name).count_classes(len(self.class_table.names))
        if persist:
            stored[name] = {"shards_sha256": key, "counts": counts.tolist()}
            write_json(side, stored)
        return counts

    def split(self, name: str) -> "CacheSplit":
        if name not in self.manifest["splits"]:
            raise SegError(f"{self.path}: cache has no {name!r} split (it has {', '.join(self.splits) or 'none'})")
        return CacheSplit(self.path, self.manifest, name, self.verified)


class CacheSplit(Dataset):
    """Sample i -> (tokens float16 [L, C, Hp, Wp], mask uint8 [H, W], image name, aug seed).

    HDF5 handles are opened lazily per process, so DataLoader workers each get their own. Rows of a
    shard whose sha256 was checked in this process (`verified`) are read as raw bytes at their chunk's
    file offset, without HDF5's per-chunk checksum work: the whole-file checksum covered them.
    """

    def __init__(self, path: Path, manifest: dict, split: str,
                 verified: Optional[dict[str, tuple[int, int]]] = None) -> None:
        self.path, self.manifest, self.name = path, manifest, split
        self.verified = verified if verified is not None else {}
        # shard -> (fd, byte offset of each row's tokens, of each row's mask or None), or None: HDF5 reads
        self._raw: dict[int, Optional[tuple[int, np.ndarray, Optional[np.ndarray]]]] = {}
        self.row_shape, self.row_dtype = cf.stored_row(manifest)
        # int8 caches: rows are packed bytes, dequantised on the compute device (`dequantize`)
        self.quant: Optional[QuantSpec] = QuantSpec.of(manifest)
        self._row_nbytes = (int(np.prod(self.row_shape)) * self.row_dtype.itemsize, int(np.prod(manifest["mask_shape"])))
        s = manifest["splits"][split]
        self.num_classes = len(manifest["class_table"]["classes"])
        self.images: list[str] = s["images"]
        self.seeds: list[int] = s["seeds"]
        self.shards = cf.split_shards(manifest, split)
        self._starts = [p.start for p in self.shards]
        self._files: dict[int, h5py.File] = {}
        self._datasets: dict[int, tuple[h5py.Dataset, h5py.Dataset]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.images) * len(self.seeds)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"], state["_datasets"], state["_raw"] = {}, {}, {}
        return state

    def _file(self, j: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: never share the parent's handles
            self._files, self._datasets, self._raw, self._pid = {}, {}, {}, os.getpid()
        f = self._files.get(j)
        if f is None:
            path = self.path / self.shards[j].file
            try:
                f = h5py.File(path, "r")
            except Exception as exc:  # damaged HDF5 fails in many ways
                raise SegError(f"{path}: cannot open shard ({exc})") from None
            self._files[j] = f
        return f

    def _tokens_masks(self, j: int) -> tuple[h5py.Dataset, h5py.Dataset]:
        """Dataset handles of shard j, kept: looking them up by name costs more than a small read."""
        f = self._file(j)
        ds = self._datasets.get(j)
        if ds is None:
            try:
                ds = self._datasets[j] = (f["tokens"], f["masks"])
            except Exception as exc:  # damaged HDF5 metadata
                raise SegError(f"{self.path / self.shards[j].file}: corrupt shard ({exc}); run `seg cache verify`") from None
        return ds

    def _raw_rows(self, j: int) -> Optional[tuple[int, np.ndarray, Optional[np.ndarray]]]:
        """(file descriptor, byte offset of each row's tokens, of each row's mask or None) of a
        verified shard, else None (read through HDF5). A dataset is read raw when it is stored as
        plain chunks, one per row, with no compression or shuffle (masks were lzf-compressed before
        seg 0.1's performance round: those are still read through HDF5)."""
        tok_ds, mask_ds = self._tokens_masks(j)  # first: it drops a parent process's handles after a fork
        if j in self._raw:
            return self._raw[j]
        raw = None
        name = self.shards[j].file
        if name in self.verified and plain_rows(tok_ds, self.row_dtype.str):
            path = self.path / name
            fd = os.open(path, os.O_RDONLY)
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != self.verified[name]:
                os.close(fd)
                raise SegError(f"{path}: changed after its sha256 was checked; rerun to check it again")
            raw = (fd, row_offsets(tok_ds), row_offsets(mask_ds) if plain_rows(mask_ds, "|u1") else None)
        self._raw[j] = raw
        return raw

    def locate(self, k: int) -> tuple[int, int]:
        """(shard index, row in shard) of sample k."""
        if not 0 <= k < len(self):
            raise IndexError(k)
        j = bisect_right(self._starts, k) - 1
        return j, k - self._starts[j]

    def sample_info(self, k: int) -> tuple[str, int]:
        i, seed = cf.sample_of(k, len(self.images), self.seeds)
        return self.images[i], seed

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, str, int]:
        j, row = self.locate(k)
        f = self._file(j)
        try:
            tokens = f["tokens"][row]
            mask = f["masks"][row]
        except Exception as exc:  # fletcher32 mismatch, truncated or damaged file
            raise SegError(f"{self.path / self.shards[j].file}: corrupt shard ({exc}); run `seg cache verify`") from None
        self._check(tokens[None], mask[None], [k])
        name, seed = self.sample_info(k)
        return torch.from_numpy(tokens), torch.from_numpy(mask), name, seed

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Stored rows of this split (on any device) -> float16 tokens [B, ...]: int8 rows are
        dequantised where they are, float16 ones returned as they are."""
        return tokens if self.quant is None else self.quant.dequantize(tokens)

    def _check(self, tokens: np.ndarray, masks: np.ndarray, samples) -> None:
        found = bad_row(tokens, masks, self.num_classes, self.quant)
        if found is not None:
            row, why = found
            k = int(samples[row])
            j, _ = self.locate(k)
            name, seed = self.sample_info(k)
            raise SegError(f"{self.path / self.shards[j].file}: sample {k} ({name}, aug seed {seed}) holds {why}; "
                           f"the cache is damaged: run `seg cache verify {self.path}` and re-extract")

    def advise(self, indices: np.ndarray) -> None:
        """Ask the kernel to start reading these samples' rows (checked shards only): from a cold page
        cache, the disk then works on a whole batch at once, and on the next batch while this one trains."""
        for k in np.asarray(indices):
            j, row = self.locate(int(k))
            raw = self._raw_rows(j)
            if raw is None:
                continue
            fd, tok_off, mask_off = raw
            os.posix_fadvise(fd, int(tok_off[row]), self._row_nbytes[0], os.POSIX_FADV_WILLNEED)
            if mask_off is not None:
                os.posix_fadvise(fd, int(mask_off[row]), self._row_nbytes[1], os.POSIX_FADV_WILLNEED)

    def read_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and masks of several samples, read shard by shard in sorted order."""
        indices = np.asarray(indices)
        self.advise(indices)
        mask_shape = self.manifest["mask_shape"]
        tokens = np.empty((len(indices), *self.row_shape), self.row_dtype)
        masks = np.empty((len(indices), *mask_shape), np.uint8)
        order = np.argsort(indices, kind="stable")
        for pos in order:
            j, row = self.locate(int(indices[pos]))
            tok_ds, mask_ds = self._tokens_masks(j)
            raw = self._raw_rows(j)
            try:
                if raw is not None:
                    pread_into(raw[0], tokens[pos], raw[1][row])
                else:
                    tok_ds.read_direct(tokens, np.s_[row], np.s_[pos])
                if raw is not None and raw[2] is not None:
                    pread_into(raw[0], masks[pos], raw[2][row])
                else:
                    mask_ds.read_direct(masks, np.s_[row], np.s_[pos])
            except Exception as exc:  # damaged HDF5 fails in many ways
                raise SegError(f"{self.path / self.shards[j].file}: corrupt shard ({exc}); run `seg cache verify`") from None
        self._check(tokens, masks, indices)
        return tokens, masks

    def read_prefix(self, indices: np.ndarray) -> np.ndarray:
        """Prefix tokens (cls, registers) of several samples, float16 [n, L, P, C] (seg.cache.prefix_rows)."""
        return read_prefix(self, indices)

    def load(self, device: torch.device | str = "cpu", progress: Optional[Callable[[int], None]] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as (stored token rows [N, ...], masks uint8 [N, H, W]) on device
        (seg.cache.whole_split)."""
        return load_split(self, device, progress)

    def count_classes(self, num_classes: int) -> np.ndarray:
        """int64 [N, K] pixels per class id of every mask of the split (seg.cache.whole_split)."""
        return count_split_classes(self, num_classes)

    def _close_raw(self) -> None:
        for raw in getattr(self, "_raw", {}).values():
            if raw is not None:
                try:
                    os.close(raw[0])
                except OSError:
                    pass
        self._raw = {}

    def __del__(self) -> None:
        self._close_raw()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._close_raw()
        self._files, self._datasets = {}, {}
