"""8-bit tokens: int8 values with one float16 scale per group of channels of each token, packed
with their scales into one byte row per sample so that every read path (raw preads, HDF5, preloads,
DataLoader workers, pinned copies) moves plain bytes; `dequantize` turns them back into the float16
tokens they stand for, on the compute device, at the head's input.

Why groups: DINOv2/DINOv3 tokens carry a few channels of much larger magnitude than the rest. One
scale per token (absmax over all channels) spends the 8 bits on those few and rounds the rest
coarsely; one scale per channel over a split needs a calibration pass before anything is written;
a scale per group of G channels confines an outlier to its group and needs nothing but the token.
The comparison (benchmarks/token_quant.py) measured group scales best; see BENCHMARKS.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

TOKEN_DTYPES = ("fp16", "int8")
QUANT_FORMAT_VERSION = 6
# Version 6 stores 8-bit tokens (`token_dtype` "int8", `token_quant` says how): each shard's `tokens`
# rows are packed bytes (int8 values, then float16 group scales), which a reader of versions 2-5 would
# take for float16 numbers. Any cache, layer or tap, Falcon or another layout, with int8 tokens is
# version 6; float16 caches keep versions 3-5.
DEFAULT_GROUP = 32
QMAX = 127  # symmetric: -127..127, so that -x quantises to -q


@dataclass(frozen=True)
class QuantSpec:
    """How a cache's token rows are packed. `token_shape` is the logical per-sample shape, `axis`
    its channel axis (1 both for layer caches [L, C, Hp, Wp] and for tap caches [T, C])."""
    token_shape: tuple[int, ...]
    axis: int
    group: int

    @staticmethod
    def of(manifest: dict) -> "QuantSpec | None":
        q = manifest.get("token_quant")
        if manifest.get("token_dtype", "float16") == "float16" or q is None:
            return None
        return QuantSpec(tuple(manifest["token_shape"]), int(q["axis"]), int(q["group"]))

    @staticmethod
    def for_tokens(token_shape, tap: bool, group: int = DEFAULT_GROUP) -> "QuantSpec":
        axis = 1  # layer caches: [L, C, Hp, Wp]; tap caches: [T, C]
        channels = int(token_shape[axis])
        # every DINOv2/DINOv3 width (384 ... 1536) splits into groups of 32; a test model's may not
        return QuantSpec(tuple(int(v) for v in token_shape), axis, math.gcd(channels, group))

    @property
    def scale_shape(self) -> tuple[int, ...]:
        s = list(self.token_shape)
        s[self.axis] //= self.group
        return tuple(s)

    @property
    def value_bytes(self) -> int:
        return int(np.prod(self.token_shape))

    @property
    def row_bytes(self) -> int:
        """Bytes of one packed sample: int8 values, then float16 scales."""
        return self.value_bytes + 2 * int(np.prod(self.scale_shape))

    def record(self) -> dict:
        return {"scheme": "group-absmax", "group": self.group, "axis": self.axis, "values": "int8",
                "scales": "float16", "row_bytes": self.row_bytes,
                "packing": "per sample: int8 values in token order, then float16 scales (little-endian)"}

    def _grouped(self, x: Tensor) -> Tensor:
        """[B, *token_shape] -> [B, ..., C/G, G, ...] (the group inside the channel axis)."""
        a = self.axis + 1
        shape = list(x.shape)
        return x.reshape(*shape[:a], shape[a] // self.group, self.group, *shape[a + 1:])

    def quantize(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """float tokens [B, *token_shape] -> (int8 values, same shape; float16 scales [B, *scale_shape])."""
        g = self._grouped(tokens.float())
        amax = g.abs().amax(dim=self.axis + 2, keepdim=True)
        scale = (amax / QMAX).to(torch.float16)  # the stored scale, exactly as dequantize will read it
        s32 = scale.float()
        q = torch.where(s32 > 0, g / s32.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(g))
        q = q.round().clamp_(-QMAX, QMAX).to(torch.int8)
        return q.reshape(tokens.shape), scale.squeeze(self.axis + 2)

    def pack(self, tokens: Tensor) -> Tensor:
        """float tokens [B, *token_shape] -> uint8 rows [B, row_bytes]."""
        q, scale = self.quantize(tokens)
        b = tokens.shape[0]
        return torch.cat([q.view(torch.uint8).reshape(b, -1), scale.contiguous().view(torch.uint8).reshape(b, -1)], 1)

    def unpack(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 rows [B, row_bytes] -> (int8 values [B, *token_shape], float16 scales [B, *scale_shape])."""
        b = rows.shape[0]
        q = rows[:, :self.value_bytes].contiguous().view(torch.int8).reshape(b, *self.token_shape)
        scale = rows[:, self.value_bytes:].contiguous().view(torch.float16).reshape(b, *self.scale_shape)
        return q, scale

    def dequantize(self, rows: Tensor) -> Tensor:
        """uint8 rows [B, row_bytes] -> the float16 tokens [B, *token_shape] they stand for: each value
        times its group's scale, computed in float32 (exact: 8 x 11 significant bits), then rounded
        to float16 once. Runs wherever `rows` lives: on the GPU for a preloaded or streamed batch."""
        q, scale = self.unpack(rows)
        a = self.axis + 1
        deq = self._grouped(q.float()) * scale.float().unsqueeze(a + 1)
        return deq.reshape(rows.shape[0], *self.token_shape).to(torch.float16)

    def scales_of(self, rows: np.ndarray) -> np.ndarray:
        """The float16 scales of packed numpy rows [n, row_bytes], as [n, scale count] (for checks)."""
        return np.ascontiguousarray(rows[:, self.value_bytes:]).view(np.float16)


def relative_rms_error(tokens: Tensor, restored: Tensor) -> float:
    """||restored - tokens|| / ||tokens|| over everything given, in float64."""
    t, r = tokens.double(), restored.double()
    return float(((r - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-300)).sqrt())


def stored_row(manifest: dict) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one sample's row in a shard's `tokens` dataset: float16 tokens, or the
    packed bytes of an int8 cache."""
    if manifest.get("token_dtype", "float16") == "float16":
        return tuple(manifest["token_shape"]), np.dtype(np.float16)
    return (int(manifest["token_quant"]["row_bytes"]),), np.dtype(np.uint8)


def token_dtype_problem(manifest: dict, int8_versions: tuple[int, ...] = (QUANT_FORMAT_VERSION,)) -> Optional[str]:
    """Whether the token dtype, its packing and the format version agree (an int8 row read as float16
    numbers, or the reverse, would be silently wrong values)."""
    dtype = manifest.get("token_dtype", "float16")
    version = manifest.get("format_version")
    if dtype not in ("float16", "int8"):
        return f"token_dtype {dtype!r} is not float16 or int8"
    # int8 rows exist from version 6 on (int8_versions: the versions that may hold them)
    if (dtype == "int8" and version not in int8_versions) or (dtype == "float16" and version == QUANT_FORMAT_VERSION):
        return f"token_dtype {dtype} in a format version {manifest.get('format_version')} manifest"
    if dtype == "int8":
        q = manifest.get("token_quant")
        try:
            spec = QuantSpec.of(manifest)
            ok = (q.get("scheme") == "group-absmax" and spec.token_shape[spec.axis] % spec.group == 0
                  and spec.row_bytes == int(q["row_bytes"]))
        except (AttributeError, KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
            ok = False
        if not ok:
            return f"token_quant {q!r} does not describe the int8 rows of token_shape {manifest.get('token_shape')}"
    return None
