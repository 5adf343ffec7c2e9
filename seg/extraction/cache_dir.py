"""The cache directory an extraction owns: refusing foreign files, resuming or replacing an old
cache, finding the shards still to do, and the final manifest with checksums and class counts."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import h5py

from seg.backbones import file_sha256
from seg.cache import format as cf
from seg.runtime.errors import SegError
from seg.runtime.json_file import read_json


def _seg_manifest(out: Path) -> Optional[dict]:
    """The manifest in out when it is a seg cache's (any format version); None when there is none."""
    path = out / cf.MANIFEST
    if not path.exists():
        return None
    try:
        data = read_json(path, "cache manifest")
    except SegError as exc:
        raise SegError(f"{exc}; so not a seg cache seg may touch: choose another --out") from None
    if not isinstance(data, dict) or data.get("format") != cf.FORMAT:
        raise SegError(f"{path}: not a seg feature cache manifest; seg will not touch {out}: choose another --out")
    return data


def cache_kind(manifest: dict) -> str:
    """'int8 layer cache', 'float16 tap cache', ...: what a manifest describes, in words."""
    dtype = "int8" if manifest.get("token_dtype") == "int8" else "float16"
    return f"{dtype} {'tap' if cf.tap_block(manifest) is not None else 'layer'} cache"


def check_cache_dir(out: Path, manifest: dict) -> Optional[dict]:
    """Refuse an --out that holds anything seg did not write; returns the old manifest, if any."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise SegError(f"{out}: exists and is not a directory")
    old = _seg_manifest(out)
    foreign = cf.foreign_files(out, *([old, manifest] if old else []))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        what = "is not part of the cache there" if old else "is there, and the directory is not a feature cache"
        raise SegError(f"{out / foreign[0]}: {what} (not written by seg extract){more}; seg writes only into a "
                       "new or empty directory or its own cache: choose another --out")
    return old


def prepare_cache_dir(out: Path, old: Optional[dict], manifest: dict, overwrite: bool,
                      log: Callable[[str], None]) -> None:
    """Refuse to mix settings in one cache; a rerun with the same settings keeps finished shards.
    `old` is the manifest check_cache_dir found; --overwrite deletes only the files it lists."""
    if old is None:
        return
    if overwrite:
        inside = out.resolve()
        # owned_files names only seg's own shard names; resolving each again keeps every deletion
        # inside --out, whatever the old manifest says
        doomed = sorted(n for n in cf.owned_files(old) - {cf.LOCK}
                        if (out / n).exists() and (out / n).resolve().parent == inside)
        log(f"--overwrite: deleting the old cache's {len(doomed)} file(s) in {out}: "
            + ", ".join(doomed[:4]) + (" ..." if len(doomed) > 4 else ""))
        for n in doomed:
            (out / n).unlink()
        return
    if cache_kind(old) != cache_kind(manifest):
        raise SegError(f"{out}: holds a {cache_kind(old)} (format version {old.get('format_version')!r}); this "
                       f"extraction makes a {cache_kind(manifest)} (version {manifest['format_version']}), a "
                       "different cache, not a newer one: choose another --out (--overwrite would DELETE the "
                       "cache there)")
    if old.get("format_version") != manifest["format_version"]:
        raise SegError(f"{out}: holds a {cache_kind(old)} in format version {old.get('format_version')!r}; this seg "
                       f"writes version {manifest['format_version']} for it (a resume cannot mix them): pass "
                       "--overwrite to re-extract it there, or choose another --out")
    # Splits on one side only are not a difference: a new one (an unlabeled target) is added, an old
    # one this run does not name is kept as it is, shards and record
    old_s, new_s = cf.settings_of(old), cf.settings_of(manifest)
    added = sorted(set(new_s["splits"]) - set(old_s["splits"]))
    kept = sorted(set(old_s["splits"]) - set(new_s["splits"]))
    for name in added:
        del new_s["splits"][name]
    for name in kept:
        del old_s["splits"][name]
    diffs = cf.differing_fields(old_s, new_s)
    if diffs:
        raise SegError(f"{out}: holds a cache with other settings (differs in {', '.join(diffs[:6])}"
                       + (" ..." if len(diffs) > 6 else "") + "); a resume computes with exactly the recorded "
                       "settings: use another --out, or pass --overwrite to replace it")
    for name in kept:
        manifest["splits"][name] = old["splits"][name]
    order = [*old["splits"], *added]  # the cache's splits in their order, then the new ones
    manifest["splits"] = {name: manifest["splits"][name] for name in order}
    for name, split in manifest["splits"].items():  # the record of what the finished shards were made from
        if name in old["splits"]:
            split["sources"] = old["splits"][name].get("sources", split["sources"])
    if added:
        log(f"adding split(s) {', '.join(added)} to the cache in {out}; its other splits "
            f"({', '.join(n for n in manifest['splits'] if n not in added)}) stay as they are")
    changed = cf.source_changes(old)
    if changed:
        log(f"WARNING: {len(changed)} source file(s) differ from what this cache was extracted from "
            f"(first: {changed[0]}); finished shards keep the old content. `seg cache verify --sources` "
            "lists them; --overwrite re-extracts")


def missing_shards(out: Path, manifest: dict, shards: list[cf.ShardPlan]) -> list[cf.ShardPlan]:
    missing = []
    for plan in shards:
        path = out / plan.file  # an interrupted write's temporary was cleared when the cache was claimed
        if not cf.shard_ok(path, plan, cf.stored_row(manifest)[0], manifest["mask_shape"],
                           cf.prefix_shape(manifest)):
            path.unlink(missing_ok=True)
            missing.append(plan)
    return missing


def finalize_manifest(out: Path, manifest: dict) -> int:
    """Record every shard's sha256 and size and every sample's class counts (from the shards, which
    other ranks may have written), mark the cache complete; returns total bytes."""
    total = 0
    for split in manifest["splits"].values():
        counts = []
        for sh in split["shards"]:
            path = out / sh["file"]
            if not path.is_file():
                raise SegError(f"{path}: shard missing at the end of extraction")
            sh["sha256"] = file_sha256(path)
            sh["bytes"] = path.stat().st_size
            total += sh["bytes"]
            with h5py.File(path, "r") as f:
                counts += f["class_counts"][()].tolist()
                if cf.tap_block(manifest) is not None:
                    sh["max_abs"] = float(f.attrs["max_abs"])
                if "quant_error" in f.attrs:  # int8: [sum of squared errors, sum of squares] of its tokens
                    sh["quant_error"] = [float(v) for v in f.attrs["quant_error"]]
        split["class_counts"] = counts
    errors = [sh["quant_error"] for s in manifest["splits"].values() for sh in s["shards"] if "quant_error" in sh]
    if errors:
        sq_err, sq = (sum(e[i] for e in errors) for i in (0, 1))
        manifest["token_quant_error"] = {
            "relative_rms": (sq_err / sq) ** 0.5 if sq > 0 else 0.0,
            "over": "every token of every sample: ||dequantised - float16 token|| / ||float16 token||"}
    manifest["complete"] = True
    cf.write_manifest(out, manifest)
    return total
