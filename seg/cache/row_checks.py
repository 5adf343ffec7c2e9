"""The cheap checks every read of cached rows gets, whether or not shard checksums were verified:
tokens must be finite float16 numbers and masks must hold class ids of the table (or ignore).
A NaN token trains a head into NaNs and scores near zero; an id past the table indexes out of
range in the loss. Both are refused with one line naming the shard and the sample."""

from __future__ import annotations

from typing import Optional

import numpy as np

from seg.data.classes import IGNORE_INDEX

_EXPONENT = 0x7C00   # float16: all exponent bits set = inf or NaN
_MAGNITUDE = 0x7FFF


def bad_row(tokens: np.ndarray, masks: np.ndarray, num_classes: int, quant=None) -> Optional[tuple[int, str]]:
    """(row, what is wrong) of the first row that fails, or None. Tokens are float16 [n, ...], or with
    `quant` (a QuantSpec) an int8 cache's packed rows."""
    return bad_token_row(tokens, quant) or _bad_mask(masks, num_classes)


def bad_token_row(tokens: np.ndarray, quant=None) -> Optional[tuple[int, str]]:
    """The first row whose float16 tokens are not finite or, for an int8 cache's packed rows, whose
    float16 scales are not finite or negative (seg writes absmax / 127; int8 values are always
    finite). The test reads float16 bits (about 10 GB/s on one core, several times numpy's isfinite
    on float16)."""
    if quant is None:
        row = _non_finite_row(tokens)
        return None if row is None else (row, "NaN or infinite tokens")
    scales = quant.scales_of(tokens).reshape(len(tokens), -1)
    row = _non_finite_row(scales)
    if row is not None:
        return row, "NaN or infinite token scales"
    if len(scales) and (scales < 0).any():
        return int(np.argmax((scales < 0).any(1))), "negative token scales"
    return None


def _non_finite_row(half: np.ndarray) -> Optional[int]:
    bits = half.view(np.uint16).reshape(len(half), -1)
    if len(bits) and (bits & _MAGNITUDE).max() >= _EXPONENT:
        return int(np.argmax(((bits & _EXPONENT) == _EXPONENT).any(1)))
    return None


def _bad_mask(masks: np.ndarray, num_classes: int) -> Optional[tuple[int, str]]:
    flat = masks.reshape(len(masks), -1)
    if len(flat) and flat.max() >= num_classes:  # fast path: no ignore pixels and nothing past the table
        wrong = (flat >= num_classes) & (flat != IGNORE_INDEX)
        rows = wrong.any(1)
        if rows.any():
            row = int(np.argmax(rows))
            ids = np.unique(flat[row][wrong[row]])
            return row, (f"mask ids {', '.join(map(str, ids[:5].tolist()))} outside the class table "
                         f"(ids 0..{num_classes - 1}, {IGNORE_INDEX} = ignore)")
    return None
