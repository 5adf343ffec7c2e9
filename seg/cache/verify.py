"""`seg cache verify`: every shard re-read and checked against the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np

import torch

from seg.backbones import file_sha256
from seg.cache import format as cf
from seg.cache.quant import QuantSpec
from seg.cache.row_checks import bad_token_row
from seg.data.class_stats import class_counts


def verify(path: str | Path, progress: Optional[Callable[[int], None]] = None, sources: bool = False) -> list[str]:
    """Re-read every shard: file checksum, HDF5 fletcher32, shapes, dtypes and sample order; with
    `sources`, also the source images and masks against their recorded sizes and mtimes.

    Returns the problems found, one line per damaged shard (empty when the cache is sound). Never
    raises for damage: whatever a corrupt file does to the reader is reported as that file's line.
    """
    path = Path(path)
    m = cf.read_manifest(path, check=False)  # its inconsistencies are listed here, not raised
    problems = []
    if not m.get("complete"):
        problems.append(f"{path / cf.MANIFEST}: cache is incomplete (extraction did not finish)")
    if not isinstance(m.get("splits"), dict):
        return problems + [f"{path / cf.MANIFEST}: no splits"]
    for split, s in m["splits"].items():
        stated = cf.split_problems(m, split, s)
        problems += [f"{path / cf.MANIFEST}: {p}" for p in stated]
        if stated and (split not in cf.SPLIT_NAMES or "images" not in s or
                       [sh.get("file") if isinstance(sh, dict) else sh for sh in s.get("shards", [])]
                       != [p.file for p in cf.split_shards(m, split)]):
            continue  # the shards cannot be matched to a plan: their checks would say nothing more
        plans = cf.split_shards(m, split)
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
    if sh.get("bytes") is not None and f_path.stat().st_size != sh["bytes"]:
        problems.append(f"{f_path.stat().st_size} bytes, the manifest states {sh['bytes']}")
    try:
        problems += _check_contents(f_path, plan, split, m)
    except Exception as exc:  # a damaged HDF5 file fails in many ways; each is this shard's problem
        problems.append(f"unreadable or corrupt ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
    return problems


def _check_contents(f_path: Path, plan: cf.ShardPlan, split: dict, m: dict) -> list[str]:
    row_shape, row_dtype = cf.stored_row(m)
    expect = {
        "tokens": ((plan.count, *row_shape), row_dtype),
        "masks": ((plan.count, *m["mask_shape"]), np.uint8),
        "image_index": ((plan.count,), np.int32),
        "aug_seed": ((plan.count,), np.int32),
    }
    if cf.prefix_shape(m) is not None:  # version 7: the layers' cls and register tokens
        expect["prefix"] = ((plan.count, *cf.prefix_shape(m)), np.float16)
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
    quant = QuantSpec.of(m)
    if quant is not None:
        found = bad_token_row(data["tokens"], quant)
        if found is not None:
            problems.append(f"sample {plan.start + found[0]} holds {found[1]}")
        elif cf.tap_block(m) is not None:
            # absmax / 127 rounded to float16, times 127: the largest value comes back within 2^-11
            largest = float(quant.dequantize(torch.from_numpy(data["tokens"])).float().abs().max()) if len(masks) else 0.0
            if recorded_max is None or abs(largest - float(recorded_max)) > 2e-3 * max(float(recorded_max), 1e-6):
                problems.append(f"the tokens' largest |value| {largest:.6g} does not match the recorded max_abs {recorded_max}")
    elif not np.isfinite(data["tokens"]).all():
        problems.append("tokens hold NaN or infinite values")
    elif cf.tap_block(m) is not None and (recorded_max is None or float(np.abs(data["tokens"]).max(initial=0))
                                          != float(recorded_max)):
        problems.append(f"the tokens' largest |value| differs from the recorded max_abs {recorded_max}")
    if "prefix" in data and not np.isfinite(data["prefix"]).all():
        problems.append("prefix tokens hold NaN or infinite values")
    if stored_counts is not None or "class_counts" in split:  # version 3: counts stored; older: nothing to check
        counted = class_counts(masks, len(m["class_table"]["classes"]))
        if stored_counts is not None and not np.array_equal(stored_counts, counted):
            problems.append("class_counts do not match the masks")
        if "class_counts" in split and not np.array_equal(
                np.asarray(split["class_counts"][plan.start:plan.start + plan.count]).reshape(counted.shape), counted):
            problems.append("the manifest's class_counts do not match the masks")
    return problems
