"""The fast read path of a checked shard: rows stored as plain chunks, one per sample, are read with
one pread at their chunk's file offset, skipping HDF5 and its per-chunk checksums (the file's
sha256 covered them)."""

from __future__ import annotations

import os

import h5py
import numpy as np


def plain_rows(ds: h5py.Dataset, dtype: str) -> bool:
    return ds.compression is None and not ds.shuffle and ds.dtype == np.dtype(dtype) \
        and ds.chunks == (1, *ds.shape[1:])


def row_offsets(ds: h5py.Dataset) -> np.ndarray:
    zeros = (0,) * (ds.ndim - 1)
    return np.array([ds.id.get_chunk_info_by_coord((row, *zeros)).byte_offset for row in range(ds.shape[0])],
                    np.int64)


def pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    got = os.preadv(fd, [memoryview(out).cast("B")], int(offset))
    if got != out.nbytes:
        raise OSError(f"short read ({got} of {out.nbytes} bytes)")
