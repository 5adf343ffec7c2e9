"""Reading a feature cache: per-sample access, whole-split loading, human summary, verification."""

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

from seg import cache_format as cf
from seg.atomic import write_json
from seg.backbones import file_sha256
from seg.class_stats import class_counts, describe_counts
from seg.classes import ClassTable
from seg.errors import SegError


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

    def class_counts(self, name: str) -> np.ndarray:
        """int64 [N, K] class pixels of every sample of a split, in sample order. Version-3 caches
        carry them in the manifest; for older ones they are counted from the masks once and kept in
        CLASS_COUNTS_FILE, tied to the shards' checksums."""
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
        self._row_nbytes = (int(np.prod(manifest["token_shape"])) * 2, int(np.prod(manifest["mask_shape"])))
        s = manifest["splits"][split]
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
        if name in self.verified and _plain_rows(tok_ds, "<f2"):
            path = self.path / name
            fd = os.open(path, os.O_RDONLY)
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != self.verified[name]:
                os.close(fd)
                raise SegError(f"{path}: changed after its sha256 was checked; rerun to check it again")
            raw = (fd, _row_offsets(tok_ds), _row_offsets(mask_ds) if _plain_rows(mask_ds, "|u1") else None)
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
        name, seed = self.sample_info(k)
        return torch.from_numpy(tokens), torch.from_numpy(mask), name, seed

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
        token_shape, mask_shape = self.manifest["token_shape"], self.manifest["mask_shape"]
        tokens = np.empty((len(indices), *token_shape), np.float16)
        masks = np.empty((len(indices), *mask_shape), np.uint8)
        order = np.argsort(indices, kind="stable")
        for pos in order:
            j, row = self.locate(int(indices[pos]))
            tok_ds, mask_ds = self._tokens_masks(j)
            raw = self._raw_rows(j)
            try:
                if raw is not None:
                    _pread_into(raw[0], tokens[pos], raw[1][row])
                else:
                    tok_ds.read_direct(tokens, np.s_[row], np.s_[pos])
                if raw is not None and raw[2] is not None:
                    _pread_into(raw[0], masks[pos], raw[2][row])
                else:
                    mask_ds.read_direct(masks, np.s_[row], np.s_[pos])
            except Exception as exc:  # damaged HDF5 fails in many ways
                raise SegError(f"{self.path / self.shards[j].file}: corrupt shard ({exc}); run `seg cache verify`") from None
        return tokens, masks

    def load(self, device: torch.device | str = "cpu", progress: Optional[Callable[[int], None]] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as (tokens float16 [N, L, C, Hp, Wp], masks uint8 [N, H, W]) on device."""
        token_shape, mask_shape = self.manifest["token_shape"], self.manifest["mask_shape"]
        tokens = torch.empty((len(self), *token_shape), dtype=torch.float16, device=device)
        masks = torch.empty((len(self), *mask_shape), dtype=torch.uint8, device=device)
        for j, plan in enumerate(self.shards):
            f = self._file(j)
            try:
                t, m = f["tokens"][()], f["masks"][()]
            except Exception as exc:  # damaged HDF5 fails in many ways
                raise SegError(f"{self.path / plan.file}: corrupt shard ({exc}); run `seg cache verify`") from None
            tokens[plan.start:plan.start + plan.count] = torch.from_numpy(t)
            masks[plan.start:plan.start + plan.count] = torch.from_numpy(m)
            if progress:
                progress(plan.count)
        return tokens, masks

    def count_classes(self, num_classes: int) -> np.ndarray:
        """int64 [N, K] pixels per class id of every mask of the split (ignore excluded), shard by shard."""
        parts = []
        for j in range(len(self.shards)):
            try:
                masks = self._tokens_masks(j)[1][()]
            except Exception as exc:  # damaged HDF5 fails in many ways
                raise SegError(f"{self.path / self.shards[j].file}: corrupt shard ({exc}); run `seg cache verify`") from None
            parts.append(class_counts(masks, num_classes))
        return np.concatenate(parts)

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


def _plain_rows(ds: h5py.Dataset, dtype: str) -> bool:
    return ds.compression is None and not ds.shuffle and ds.dtype == np.dtype(dtype) \
        and ds.chunks == (1, *ds.shape[1:])


def _row_offsets(ds: h5py.Dataset) -> np.ndarray:
    zeros = (0,) * (ds.ndim - 1)
    return np.array([ds.id.get_chunk_info_by_coord((row, *zeros)).byte_offset for row in range(ds.shape[0])],
                    np.int64)


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    got = os.preadv(fd, [memoryview(out).cast("B")], int(offset))
    if got != out.nbytes:
        raise OSError(f"short read ({got} of {out.nbytes} bytes)")


def describe(path: str | Path, class_stats: bool = True) -> list[str]:
    """`seg cache info`: the manifest in human form."""
    cache = FeatureCache(path, require_complete=False)
    m = cache.manifest
    size, grid = m["size"], m["patch_grid"]
    lines = [
        f"cache        {path}  ({'complete' if m.get('complete') else 'INCOMPLETE: rerun the extract command'})",
        f"format       {m['format']} v{m['format_version']} (seg {m.get('seg_version', '?')})",
        f"backbone     {m['backbone']}  weights {m['weights_sha256'] if m['weights_sha256'] == 'random-init' else m['weights_sha256'][:16] + '...'}"
        f"  ({m['weights_source']})",
        f"input        {size['width']}x{size['height']}  -> patch grid {grid['width']}x{grid['height']} "
        f"= {grid['width'] * grid['height']} tokens",
        f"tokens       {m['token_dtype']} {m['token_shape']} per sample ("
        + (f"layers {m['layers']}, normed" if cf.tap_block(m) is None else
           f"tap: the un-normed stream entering block {m['tap_block']} of {m['depth']}, all tokens; "
           f"largest |value| {_largest(m)}") + f"), computed in {m.get('compute_dtype')} on {m.get('device')}",
        f"augmentation {m['augmentation']['policy']} (albumentations {m['augmentation']['albumentations']}); "
        f"{augmented_views(m)} augmented view(s) per train image",
        f"classes      {len(m['class_table']['classes'])}: "
        + ", ".join(f"{c['id']}={c['name']}{c['values']}" for c in m["class_table"]["classes"]),
    ]
    total_bytes = 0
    for name, s in m["splits"].items():
        b = sum(sh.get("bytes") or 0 for sh in s["shards"])
        total_bytes += b
        lines.append(f"split {name:6s} {len(s['images'])} images x seeds {_seeds_text(s['seeds'])} = "
                     f"{s['num_samples']} samples in {len(s['shards'])} shards, {b / 1e6:.1f} MB")
    lines.append(f"total        {total_bytes / 1e6:.1f} MB on disk")
    cp = m["augmentation"].get("copy_paste")
    if cp:
        lines.append(f"copy-paste   {', '.join(cp['class_names'])} (scale {cp['scale'][0]}-{cp['scale'][1]}, "
                     f"flip p {cp['flip_p']}, up to {cp['max_instances']} instances)")
    if class_stats and m.get("complete"):
        names = list(cache.class_table.names)
        for name in m["splits"]:
            lines.append(f"classes in {name} (after augmentation):")
            lines += describe_counts(cache.class_counts(name), names)
    return lines


def _largest(manifest: dict) -> str:
    values = [sh.get("max_abs") for s in manifest["splits"].values() for sh in s["shards"]]
    return f"{max(values):.4g}" if values and None not in values else "?"


def augmented_views(manifest: dict) -> int:
    """How many distinct augmented draws of each train image the cache holds (0: none)."""
    if manifest["augmentation"]["policy"] == "none" or "train" not in manifest["splits"]:
        return 0
    return sum(1 for s in manifest["splits"]["train"]["seeds"] if s != 0)


def _seeds_text(seeds: list[int]) -> str:
    if len(seeds) > 3 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}..{seeds[-1]}"
    return ",".join(map(str, seeds))


def verify(path: str | Path, progress: Optional[Callable[[int], None]] = None, sources: bool = False) -> list[str]:
    """Re-read every shard: file checksum, HDF5 fletcher32, shapes, dtypes and sample order; with
    `sources`, also the source images and masks against their recorded sizes and mtimes.

    Returns the problems found, one line per damaged shard (empty when the cache is sound). Never
    raises for damage: whatever a corrupt file does to the reader is reported as that file's line.
    """
    path = Path(path)
    m = cf.read_manifest(path)
    problems = []
    if not m.get("complete"):
        problems.append(f"{path / cf.MANIFEST}: cache is incomplete (extraction did not finish)")
    for split, s in m["splits"].items():
        plans = cf.split_shards(m, split)
        if [sh["file"] for sh in s["shards"]] != [p.file for p in plans]:
            problems.append(f"{path / cf.MANIFEST}: {split} shard list does not match the planned layout")
            continue
        for plan, sh in zip(plans, s["shards"]):
            found = _verify_shard(path / plan.file, plan, sh, s, m)
            if found:
                more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
                problems.append(f"{path / plan.file}: {found[0]}{more}")
            if progress:
                progress(plan.count)
    if sources:
        problems += cf.source_changes(m)
    return problems


def _verify_shard(f_path: Path, plan: cf.ShardPlan, sh: dict, split: dict, m: dict) -> list[str]:
    if not f_path.is_file():
        return ["missing"]
    problems = []
    if sh.get("sha256") and file_sha256(f_path) != sh["sha256"]:
        problems.append("sha256 differs from the manifest (file changed or corrupt)")
    try:
        problems += _check_contents(f_path, plan, split, m)
    except Exception as exc:  # a damaged HDF5 file fails in many ways; each is this shard's problem
        problems.append(f"unreadable or corrupt ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
    return problems


def _check_contents(f_path: Path, plan: cf.ShardPlan, split: dict, m: dict) -> list[str]:
    expect = {
        "tokens": ((plan.count, *m["token_shape"]), np.float16),
        "masks": ((plan.count, *m["mask_shape"]), np.uint8),
        "image_index": ((plan.count,), np.int32),
        "aug_seed": ((plan.count,), np.int32),
    }
    data = {}
    with h5py.File(f_path, "r") as f:
        for key, (shape, dtype) in expect.items():
            if key not in f:
                return [f"dataset {key!r} missing"]
            d = f[key]
            if d.shape != shape or d.dtype != dtype:
                return [f"{key} is {d.dtype}{list(d.shape)}, expected {np.dtype(dtype)}{list(shape)}"]
            data[key] = d[()]  # reading every chunk checks its fletcher32 checksum
        stored_counts = f["class_counts"][()] if "class_counts" in f else None
        recorded_max = f.attrs.get("max_abs")
    problems = []
    n_img = len(split["images"])
    ks = np.arange(plan.start, plan.start + plan.count)
    if not (np.array_equal(data["image_index"], ks % n_img)
            and np.array_equal(data["aug_seed"], np.asarray(split["seeds"])[ks // n_img])):
        problems.append("image_index/aug_seed do not follow the manifest's sample order")
    masks = data["masks"]
    if ((masks >= len(m["class_table"]["classes"])) & (masks != m["ignore_index"])).any():
        problems.append("masks hold ids outside the class table")
    if not np.isfinite(data["tokens"]).all():
        problems.append("tokens hold NaN or infinite values")
    elif cf.tap_block(m) is not None and (recorded_max is None or float(np.abs(data["tokens"]).max(initial=0))
                                          != float(recorded_max)):
        problems.append(f"the tokens' largest |value| differs from the recorded max_abs {recorded_max}")
    if stored_counts is not None or "class_counts" in split:  # version 3: counts stored; older: nothing to check
        counted = class_counts(masks, len(m["class_table"]["classes"]))
        if stored_counts is not None and not np.array_equal(stored_counts, counted):
            problems.append("class_counts do not match the masks")
        if "class_counts" in split and not np.array_equal(
                np.asarray(split["class_counts"][plan.start:plan.start + plan.count]).reshape(counted.shape), counted):
            problems.append("the manifest's class_counts do not match the masks")
    return problems
