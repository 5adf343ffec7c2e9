"""`seg cache info`: a cache's manifest in human form."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seg.cache import format as cf
from seg.cache.reader import FeatureCache
from seg.data.class_stats import describe_counts
from seg.data.video_frames import parse_frame_name


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
        f"prefix       " + (f"{cf.prefix_tokens(m)} token(s) per layer (cls + {cf.prefix_tokens(m) - 1} registers), "
                            "normed, float16: what mask-classification heads (PMT) also read"
                            if cf.prefix_tokens(m) else "none stored (format version "
                            f"{m['format_version']}; version {cf.PREFIX_FORMAT_VERSION} layer caches store them)"),
        f"bytes        {_bytes_per_sample(m)}",
        f"augmentation {m['augmentation']['policy']} (albumentations {m['augmentation']['albumentations']}); "
        f"{cf.augmented_views(m)} augmented view(s) per train image",
        f"classes      {len(m['class_table']['classes'])}: "
        + ", ".join(f"{c['id']}={c['name']}{c['values']}" for c in m["class_table"]["classes"]),
    ]
    total_bytes = 0
    for name, s in m["splits"].items():
        b = sum(sh.get("bytes") or 0 for sh in s["shards"])
        total_bytes += b
        lines.append(f"split {name:6s} {len(s['images'])} images x seeds {_seeds_text(s['seeds'])} = "
                     f"{s['num_samples']} samples in {len(s['shards'])} shards, {b / 1e6:.1f} MB"
                     + (f"; UNLABELED ({_unlabeled_source(s)}; `seg pseudo-label` labels them)"
                        if cf.split_labels(m, name) == "none" else ""))
    lines.append(f"total        {total_bytes / 1e6:.1f} MB on disk")
    if m.get("val_split"):
        lines.append(f"val split    a plain folder: {m['val_split']['val_fraction']:g} of the images, by a hash of each "
                     "name (adding images never moves old ones between splits)")
    cp = m["augmentation"].get("copy_paste")
    if cp:
        lines.append(f"copy-paste   {', '.join(cp['class_names'])} (scale {cp['scale'][0]}-{cp['scale'][1]}, "
                     f"flip p {cp['flip_p']}, up to {cp['max_instances']} instances)")
    if class_stats and m.get("complete"):
        names = list(cache.class_table.names)
        for name in (n for n in m["splits"] if cf.split_labels(m, n) != "none"):
            lines.append(f"classes in {name} (after augmentation):")
            lines += describe_counts(cache.class_counts(name), names)
    return lines


def _bytes_per_sample(m: dict) -> str:
    """Token bytes per sample as stored, against float16; for int8, the scheme and measured error."""
    shape, dtype = cf.stored_row(m)
    stored = int(np.prod(shape)) * dtype.itemsize
    fp16 = int(np.prod(m["token_shape"])) * 2
    text = f"{stored / 1e6:.3f} MB of tokens per sample"
    if m.get("token_dtype") == "int8":
        q = m["token_quant"]
        err = m.get("token_quant_error", {}).get("relative_rms")
        text += (f" = {stored / fp16:.3f}x float16's {fp16 / 1e6:.3f} MB (int8 values, a float16 scale per "
                 f"{q['group']} channels; relative RMS error {'?' if err is None else f'{err:.4f}'})")
    return text + f", + {int(np.prod(m['mask_shape'])) / 1e6:.3f} MB mask"


def _largest(manifest: dict) -> str:
    values = [sh.get("max_abs") for s in manifest["splits"].values() for sh in s["shards"]]
    return f"{max(values):.4g}" if values and None not in values else "?"


def _seeds_text(seeds: list[int]) -> str:
    if len(seeds) > 3 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}..{seeds[-1]}"
    return ",".join(map(str, seeds))


def _unlabeled_source(s: dict) -> str:
    """'images of FOLDER', or 'frames 0, 10, ... of VIDEO' for a video's frames."""
    if s.get("flip_of"):
        return f"the views of {s['flip_of']!r} flipped left-right, for a flip-TTA teacher"
    if s.get("layout") != "video" or not s["images"]:
        return f"images of {s['data_dir']}"
    video, first = parse_frame_name(s["images"][0])
    step = parse_frame_name(s["images"][1])[1] - first if len(s["images"]) > 1 else 0
    return f"frames {first}" + (f", {first + step}, ..." if step else "") + f" of {Path(s['data_dir']) / video}"
