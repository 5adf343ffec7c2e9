"""A shard file's bytes: written in one piece (tokens, masks, sample order, class counts, prefix
tokens) and checked cheaply for the planned shapes when an extraction resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from seg.runtime.atomic import write_atomic


def write_shard(
    path: Path,
    tokens: np.ndarray,
    masks: np.ndarray,
    image_index: np.ndarray,
    aug_seed: np.ndarray,
    attrs: Optional[dict[str, Any]] = None,
    class_counts: Optional[np.ndarray] = None,
    prefix: Optional[np.ndarray] = None,
) -> None:
    """One shard, written under a temporary name and renamed when complete. `prefix`: the prefix
    tokens [n, L, P, C] of a version-7 layer cache, float16.

    Tokens and masks are stored uncompressed, one chunk per sample, fletcher32 on all: a reader
    that checked the file's sha256 reads each row with one pread at its chunk's offset (masks would
    compress 5-10x with lzf, but they are an eighth of a sample and decompressing them cost more
    than reading all the tokens).
    """
    n = tokens.shape[0]
    if not (masks.shape[0] == image_index.shape[0] == aug_seed.shape[0] == n):
        raise ValueError("shard arrays disagree on the sample count")

    # The HDF5 file is built in memory and written with one plain write: a full disk or a file-size
    # limit is then one OSError naming the path, never an HDF5 error storm or a crash inside HDF5.
    with h5py.File(f"{path}.image", "w", driver="core", backing_store=False) as f:
        # float16 tokens, or an int8 cache's packed rows (uint8), stored as given
        f.create_dataset("tokens", data=tokens if tokens.dtype == np.uint8 else tokens.astype(np.float16, copy=False),
                         chunks=(1, *tokens.shape[1:]), fletcher32=True)
        f.create_dataset("masks", data=masks.astype(np.uint8, copy=False), chunks=(1, *masks.shape[1:]),
                         fletcher32=True)
        f.create_dataset("image_index", data=image_index.astype(np.int32, copy=False), chunks=(n,),
                         fletcher32=True)
        f.create_dataset("aug_seed", data=aug_seed.astype(np.int32, copy=False), chunks=(n,),
                         fletcher32=True)
        if prefix is not None:
            f.create_dataset("prefix", data=prefix.astype(np.float16, copy=False), chunks=(1, *prefix.shape[1:]),
                             fletcher32=True)
        if class_counts is not None:
            f.create_dataset("class_counts", data=class_counts.astype(np.int64, copy=False), fletcher32=True)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        f.flush()
        image = f.id.get_file_image()

    write_atomic(Path(path), lambda tmp: tmp.write_bytes(image))


def shard_ok(path: Path, plan, token_shape, mask_shape: list[int],
             prefix: Optional[tuple[int, ...]] = None) -> bool:
    """Cheap check that a finished shard has the planned shapes (used when resuming)."""
    try:
        with h5py.File(path, "r") as f:
            return (
                f["tokens"].shape == (plan.count, *token_shape)
                and f["masks"].shape == (plan.count, *mask_shape)
                and f["image_index"].shape == (plan.count,)
                and (prefix is None or f["prefix"].shape == (plan.count, *prefix))
            )
    except Exception:  # any damage means "redo this shard"
        return False
