"""The feature cache on disk (DESIGN.md section 4): manifest, sample order, shard files.

A cache is a directory holding `manifest.json` and shards `<split>-NNNNN.h5`. The manifest is
written first (with `"complete": false`) so that a rerun knows the plan, and rewritten with the
shards' checksums when every shard exists. Sample order is seed-major: sample k of a split is
image `k % n_images` with aug seed `seeds[k // n_images]`, and shard j holds samples
`[j * shard_size, (j + 1) * shard_size)`. Everything about the layout derives from the manifest.

Version 2 differs from version 1 in meaning, not only in fields, so version-1 caches are
refused: with an augmentation policy every train seed (1..K) is an augmented draw (v1: seed 0 was
the plain resize), the compute precision, device and batch size are settings compared on resume,
`data_dir` is absolute, and each split records its source files' sizes and mtimes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from seg.runtime.atomic import write_json
from seg.runtime.output import owned_name
from seg.data.layouts import LAYOUTS, SPLITS as SPLIT_NAMES, UNLABELED, VIDEO, sample_paths
from seg.data.unlabeled import NAME as UNLABELED_NAME
from seg.runtime.errors import SegError
from seg.runtime.json_file import read_json
from seg.cache.quant import QUANT_FORMAT_VERSION, stored_row, token_dtype_problem  # noqa: F401 (cf.stored_row)
from seg.cache.shard_file import shard_ok, write_shard  # noqa: F401 (cf.write_shard, cf.shard_ok)

FORMAT = "seg-feature-cache"
FORMAT_VERSION = 3
# Version 3 adds per-sample class pixel counts (a `class_counts` dataset in each shard, and per split
# in the manifest) and the copy-paste record; a version-2 cache is still read, its counts computed
# from the masks on first use and kept in CLASS_COUNTS_FILE.
TAP_FORMAT_VERSION = 4
# Version 4 is a tap cache: `tap_block` B, and tokens [T, C] per sample that are the un-normed
# residual stream entering block B (all tokens), not normed patch maps. Layer caches are still
# written as version 3, so older seg versions keep reading them and refuse tap caches by version.
LAYOUT_FORMAT_VERSION = 5
# Version 5 records a dataset `layout` other than Falcon (cityscapes, ade20k, voc, folders): its
# image names resolve to paths only through that layout, so older seg versions, which know the
# Falcon layout alone, must refuse it. Layer or tap cache alike; `tap_block` says which. Falcon
# caches keep versions 3 and 4.
# Version 6 (QUANT_FORMAT_VERSION, seg.cache.quant): 8-bit tokens, in any cache.
PREFIX_FORMAT_VERSION = 7
# Version 7: a layer cache that also stores each stored layer's prefix tokens (cls and registers,
# normed like the patches; `prefix_tokens` per layer) in a `prefix` dataset [n, L, P, C] float16,
# for mask-classification heads (PMT). Every layer cache is written as version 7, of any layout and
# token dtype; tap caches (whose stream holds every token already) keep versions 4 to 6. Older seg
# versions refuse version 7 by its number; this seg reads every older version, without prefix tokens.
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7)
MANIFEST = "manifest.json"
LOCK = ".seg-extract.lock"
CLASS_COUNTS_FILE = "class-counts.json"
# Fields that describe results, not settings: a rerun with the same settings may differ in these.
# Everything else (compute dtype and device included) changes the bytes and must match on resume.
RESULT_FIELDS = ("complete", "seg_version", "torch_version", "environment", "token_quant_error")
SHARD_RESULT_FIELDS = ("sha256", "bytes", "max_abs", "quant_error")
# Per split: where the sources are and what they looked like; they may move or change without
# changing the settings (a change is reported, see `source_changes`).
SPLIT_RESULT_FIELDS = ("data_dir", "sources", "class_counts")


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    start: int      # first sample of the split in this shard
    count: int

    @property
    def file(self) -> str:
        return shard_file(self.split, self.index)


def shard_file(split: str, index: int) -> str:
    return f"{split}-{index:05d}.h5"


def plan_shards(split: str, num_samples: int, shard_size: int) -> list[ShardPlan]:
    return [
        ShardPlan(split, j, start, min(shard_size, num_samples - start))
        for j, start in enumerate(range(0, num_samples, shard_size))
    ]


def sample_of(k: int, num_images: int, seeds: list[int]) -> tuple[int, int]:
    """(image index, aug seed) of sample k in seed-major order."""
    return k % num_images, seeds[k // num_images]


def split_shards(manifest: dict, split: str) -> list[ShardPlan]:
    s = manifest["splits"][split]
    return plan_shards(split, len(s["images"]) * len(s["seeds"]), manifest["shard_size"])


def settings_of(manifest: dict) -> dict:
    """The manifest minus results: two runs with equal settings must produce the same cache."""
    out = {k: v for k, v in manifest.items() if k not in RESULT_FIELDS}
    out["splits"] = {
        name: {
            **{k: v for k, v in s.items() if k not in ("shards", *SPLIT_RESULT_FIELDS)},
            "shards": [{k: v for k, v in sh.items() if k not in SHARD_RESULT_FIELDS} for sh in s["shards"]],
        }
        for name, s in manifest["splits"].items()
    }
    return out


def differing_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two settings dicts differ."""
    diffs = []
    for key in sorted(set(a) | set(b), key=str):
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += differing_fields(va, vb, name + ".")
        elif va != vb:
            diffs.append(name)
    return diffs


def format_version(tap_block: Optional[int], layout: str = "falcon", token_dtype: str = "float16") -> int:
    if tap_block is None:
        return PREFIX_FORMAT_VERSION
    if token_dtype != "float16":
        return QUANT_FORMAT_VERSION
    if layout != "falcon":
        return LAYOUT_FORMAT_VERSION
    return FORMAT_VERSION if tap_block is None else TAP_FORMAT_VERSION


def layout_of(manifest: dict) -> str:
    """The dataset layout the cache's image names belong to (caches before version 5: Falcon)."""
    return manifest.get("layout", "falcon")


def split_labels(manifest: dict, split: str) -> str:
    """'true' (a labelled split), or 'none' (an unlabeled split: its masks are all ignore)."""
    return manifest["splits"][split].get("labels", "true")


def flip_twin(manifest: dict, split: str) -> Optional[str]:
    """The split holding `split`'s views flipped left-right (`extract --flip-views`), if cached."""
    return next((n for n, s in manifest["splits"].items() if s.get("flip_of") == split), None)


def prefix_tokens(manifest: dict) -> int:
    """Prefix tokens (cls + registers) stored per layer and sample; 0 for caches before version 7."""
    return int(manifest.get("prefix_tokens") or 0)


def prefix_shape(manifest: dict) -> Optional[tuple[int, ...]]:
    """[L, P, C] of one sample's prefix tokens in a version-7 cache, None before."""
    p = prefix_tokens(manifest)
    return (manifest["token_shape"][0], p, manifest["token_shape"][1]) if p else None


def tap_block(manifest: dict) -> Optional[int]:
    """The block whose input a tap cache stores, or None for a cache of normed layer outputs."""
    return manifest.get("tap_block")


def head_input(manifest: dict) -> tuple[int, int]:
    """(layers, channels per layer) of what the head sees: the stored layers, or for a tap cache the
    one normed last block the tuned tail produces."""
    if tap_block(manifest) is not None:
        return 1, manifest["embed_dim"]
    return manifest["token_shape"][0], manifest["token_shape"][1]


def augmented_views(manifest: dict) -> int:
    """How many distinct augmented draws of each train image the cache holds (0: none)."""
    if manifest["augmentation"]["policy"] == "none" or "train" not in manifest["splits"]:
        return 0
    return sum(1 for s in manifest["splits"]["train"]["seeds"] if s != 0)


def read_manifest(cache_dir: Path, check: bool = True) -> dict:
    """The manifest of a cache, refused in one line when it is not a readable seg manifest of a
    version this seg reads; with `check`, also when its stated layout is inconsistent
    (`manifest_problems`), so that no stage acts on counts or names the shards do not bear out."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise SegError(f"{cache_dir}: not a feature cache (no {MANIFEST})")
    manifest = read_json(path, "cache manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SegError(f"{path}: not a seg feature cache manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SegError(f"{path}: format_version is {version!r}, a {type(version).__name__}; seg writes it as a "
                       f"whole number ({', '.join(map(str, READABLE_VERSIONS))}), so the manifest was damaged or "
                       "hand-edited; re-extract it")
    if version not in READABLE_VERSIONS:
        raise SegError(f"{path}: cache format version {version}, "
                       f"this seg reads versions {', '.join(map(str, READABLE_VERSIONS))}; re-extract it")
    prefix = manifest.get("prefix_tokens")
    if (version == PREFIX_FORMAT_VERSION) != (isinstance(prefix, int) and not isinstance(prefix, bool) and prefix > 0
                                             and manifest.get("tap_block") is None):
        raise SegError(f"{path}: format version {version} with prefix_tokens {prefix!r} and tap_block "
                       f"{manifest.get('tap_block')!r}: a damaged or hand-edited manifest; re-extract it")
    if version in (QUANT_FORMAT_VERSION, LAYOUT_FORMAT_VERSION, PREFIX_FORMAT_VERSION):
        pass  # layer or tap: `tap_block` says which
    elif (version == TAP_FORMAT_VERSION) != isinstance(manifest.get("tap_block"), int):
        raise SegError(f"{path}: format version {version} with tap_block "
                       f"{manifest.get('tap_block')!r}: a damaged or hand-edited manifest; re-extract it")
    if check:
        problems = manifest_problems(manifest)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise SegError(f"{path}: {problems[0]}{more}; a damaged or hand-edited manifest: "
                           f"`seg cache verify {cache_dir}` lists every problem; re-extract it")
    return manifest


def plain_name(name) -> bool:
    """A bare file name: no folder part, not '.' or '..', nothing that could point outside its folder."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def manifest_problems(manifest: dict) -> list[str]:
    """What the manifest states about its layout that does not hold together: split names, image
    names, sample counts, the shard plan, per-sample class counts. Cheap (no file is read)."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return ["no splits"]
    if layout_of(manifest) not in LAYOUTS:
        return [f"dataset layout {layout_of(manifest)!r} is not one of {', '.join(LAYOUTS)}"]
    token_problem = token_dtype_problem(manifest, (QUANT_FORMAT_VERSION, PREFIX_FORMAT_VERSION))
    if token_problem:
        return [token_problem]
    return [p for name, s in splits.items() for p in split_problems(manifest, name, s)]


def split_problems(manifest: dict, name: str, s: dict) -> list[str]:
    unlabeled = s.get("labels") == "none"
    if unlabeled and not (UNLABELED_NAME.match(name) and name not in SPLIT_NAMES and s.get("layout") in (UNLABELED,
                                                                                                         VIDEO)):
        return [f"unlabeled split {name!r}: not a lower-case word other than {', '.join(SPLIT_NAMES)}, or not a "
                "folder of images or a video's frames"]
    if not unlabeled and name not in SPLIT_NAMES:
        return [f"split {name!r} is not one of {', '.join(SPLIT_NAMES)}"]
    images, seeds = s.get("images"), s.get("seeds")
    if not isinstance(images, list) or not isinstance(seeds, list) or not seeds:
        return [f"{name}: images or seeds missing"]
    problems = []
    bad = [n for n in images if not plain_name(n)]
    if bad:
        problems.append(f"{name}: image name {bad[0]!r} is not a plain file name (no folders, no '..')")
    n = len(images) * len(seeds)
    if s.get("num_samples") != n:
        problems.append(f"{name}: num_samples is {s.get('num_samples')!r}, but {len(images)} images x "
                        f"{len(seeds)} seeds make {n}")
    plan = [(p.file, p.start, p.count) for p in plan_shards(name, n, manifest.get("shard_size") or 1)]
    stated = [(sh.get("file"), sh.get("start"), sh.get("samples")) if isinstance(sh, dict) else sh
              for sh in s.get("shards", [])]
    if stated != plan:
        problems.append(f"{name}: the shard list (files, starts, sample counts) does not match the planned "
                        f"layout of {n} samples in shards of {manifest.get('shard_size')}")
    twin_of = manifest["splits"].get(s["flip_of"]) if "flip_of" in s else None
    if "flip_of" in s and not (unlabeled and isinstance(twin_of, dict) and twin_of.get("images") == images
                               and twin_of.get("seeds") == seeds):
        problems.append(f"{name}: flip_of names {s['flip_of']!r}, which is not an unlabeled split of the same "
                        "images and seeds")
    counts = s.get("class_counts")
    if counts is not None and (not isinstance(counts, list) or len(counts) != n):
        problems.append(f"{name}: class_counts has {len(counts) if isinstance(counts, list) else counts!r} "
                        f"rows for {n} samples")
    return problems


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    write_json(Path(cache_dir) / MANIFEST, manifest)


def owned_files(manifest: dict) -> set[str]:
    """Every file name a seg cache with this manifest may hold: its shards, the manifest and the
    extraction lock (and, by seg.runtime.output's rule, seg's temporaries of these)."""
    names = {MANIFEST, LOCK, CLASS_COUNTS_FILE}
    for name, split in manifest.get("splits", {}).items():
        for j, sh in enumerate(split.get("shards", [])):
            # Only the names seg itself gives shards: whatever else a manifest says is never seg's to touch.
            if isinstance(sh, dict) and sh.get("file") == shard_file(name, j) and plain_name(sh["file"]):
                names.add(sh["file"])
    return names


def foreign_files(cache_dir: Path, *manifests: dict) -> list[str]:
    """Names in cache_dir that none of the manifests accounts for, sorted: never seg's to touch."""
    owned = set().union(*(owned_files(m) for m in manifests)) if manifests else {LOCK}
    return sorted(p.name for p in Path(cache_dir).iterdir() if not owned_name(p.name, owned.__contains__, LOCK))


def source_files(layout: str, data_dir: str | Path, split: str, image_name: str) -> tuple[Path, Path]:
    return sample_paths(layout, data_dir, split, image_name)


def file_stat(path: Path) -> Optional[list[int]]:
    """[size, mtime_ns], or None for a missing file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def source_record(layout: str, data_dir: str | Path, split: str, images: list[str]) -> list[list]:
    """Per image: [image [size, mtime_ns], mask [size, mtime_ns]] as they are now."""
    return [[file_stat(p) for p in source_files(layout, data_dir, split, name)] for name in images]


def source_changes(manifest: dict, splits: Optional[list[str]] = None) -> list[str]:
    """'path: changed|missing' for every source file that differs from what extraction read."""
    changes = []
    for name, s in manifest["splits"].items():
        if splits is not None and name not in splits:
            continue
        for image, then in zip(s["images"], s.get("sources", [])):
            if not plain_name(image):  # never look outside the data root (manifest_problems names it)
                continue
            for path, before in zip(source_files(s.get("layout", layout_of(manifest)), s["data_dir"], name, image),
                                    then):
                now = file_stat(path)
                if now is None and before is None:  # an unlabeled split's mask: none then, none now
                    continue
                if now is None:
                    changes.append(f"{path}: missing")
                elif now != before:
                    changes.append(f"{path}: changed since extraction (size/mtime {before} -> {now})")
    return changes
