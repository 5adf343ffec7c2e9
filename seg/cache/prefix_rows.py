"""Reading the prefix tokens (cls, registers) a version-7 layer cache stores beside the patch tokens."""

from __future__ import annotations

import numpy as np

from seg.cache import format as cf
from seg.runtime.errors import SegError


def read_prefix(split, indices: np.ndarray) -> np.ndarray:
    """Prefix tokens of several samples of a CacheSplit, float16 [n, L, P, C]; an older cache is
    refused in one line saying to re-extract, and non-finite values are refused naming the sample."""
    shape = cf.prefix_shape(split.manifest)
    if shape is None:
        raise SegError(f"{split.path}: a format version {split.manifest.get('format_version')} cache holds no "
                       "prefix tokens (cls, registers), which this needs; re-extract it with this seg "
                       f"(version {cf.PREFIX_FORMAT_VERSION} stores them)")
    indices = np.asarray(indices)
    out = np.empty((len(indices), *shape), np.float16)
    for pos in np.argsort(indices, kind="stable"):
        j, row = split.locate(int(indices[pos]))
        try:
            split._file(j)["prefix"].read_direct(out, np.s_[row], np.s_[pos])
        except Exception as exc:  # a missing dataset, fletcher32 mismatch, damaged file
            raise SegError(f"{split.path / split.shards[j].file}: corrupt shard ({exc}); run `seg cache verify`") from None
    bad = ~np.isfinite(out).reshape(len(out), -1).all(1)
    if bad.any():
        k = int(indices[int(bad.argmax())])
        j, _ = split.locate(k)
        raise SegError(f"{split.path / split.shards[j].file}: sample {k} holds NaN or infinite prefix tokens; "
                       f"the cache is damaged: run `seg cache verify {split.path}` and re-extract")
    return out
