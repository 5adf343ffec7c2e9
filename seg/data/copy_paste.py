"""Copy-paste of rare-class instances as a cached augmentation.

For a train sample (image i, aug seed s >= 1), a generator seeded from (image name, s) picks one of
the chosen classes that another train image holds, one such source image, and up to
`max_instances` of its connected components of that class (largest first). Each is flipped
(p = `flip_p`), rescaled by a factor in `scale`, and placed at a random position; its pixels
overwrite the target's image and mask, except where the target mask is ignore. Everything is a
pure function of (image name, seed) and the dataset, so every process pastes the same pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import cv2
import numpy as np

from seg.data.classes import IGNORE_INDEX
from seg.runtime.errors import SegError

MIN_COMPONENT_PIXELS = 16  # smaller specks are annotation noise, not instances
AUTO_SHARE = 0.01          # "auto": classes under 1 % of the train pixels


@dataclass(frozen=True)
class CopyPasteConfig:
    classes: tuple[int, ...]                  # class ids to paste
    scale: tuple[float, float] = (0.5, 1.5)
    flip_p: float = 0.5
    max_instances: int = 4
    sources: dict = field(default_factory=dict)  # class id -> train image indices holding it

    def record(self, names: list[str]) -> dict:
        """What the manifest stores (the sources as counts: they follow from the images)."""
        d = asdict(self)
        d["class_names"] = [names[c] for c in self.classes]
        d["sources"] = {str(c): len(v) for c, v in self.sources.items()}
        d["seeding"] = "sha256(image name, aug seed, 'copy-paste') -> numpy Generator"
        return d


def copy_paste_requested(text: Optional[str]) -> bool:
    return text is not None and text.strip().lower() not in ("", "none")


def parse_copy_paste(text: Optional[str], names: list[str]) -> Optional[str | tuple[int, ...]]:
    """'none' -> None; 'auto' -> 'auto'; 'Logs,Rocks' or '6,7' -> class ids."""
    if not copy_paste_requested(text):
        return None
    if text.strip().lower() == "auto":
        return "auto"
    ids = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.isdigit() and int(part) < len(names):
            ids.append(int(part))
        elif part in names:
            ids.append(names.index(part))
        else:
            raise SegError(f"--copy-paste: unknown class {part!r}; give auto, none, or class names/ids from "
                           f"{', '.join(names)}")
    return tuple(sorted(set(ids)))


def build_config(choice: str | tuple[int, ...], per_image_counts: np.ndarray, names: list[str],
                 scale: tuple[float, float]) -> CopyPasteConfig:
    """Resolve 'auto' and find the source images, from per-image class counts of the train masks."""
    lo, hi = scale
    if not (0 < lo <= hi) or not np.isfinite([lo, hi]).all():
        raise SegError(f"--copy-paste-scale must be two numbers 0 < low <= high, got {lo},{hi}")
    freq = per_image_counts.sum(0) / max(1, per_image_counts.sum())
    if choice == "auto":
        classes = tuple(int(c) for c in np.flatnonzero((freq > 0) & (freq < AUTO_SHARE)))
    else:
        classes = tuple(choice)
    sources = {c: [int(i) for i in np.flatnonzero(per_image_counts[:, c] >= MIN_COMPONENT_PIXELS)] for c in classes}
    if not any(sources.values()):
        raise SegError("--copy-paste: no train image holds any of " + ", ".join(names[c] for c in classes)
                       + " (nothing to paste)")
    return CopyPasteConfig(classes=classes, scale=(float(lo), float(hi)), sources=sources)


def paste_seed(image_name: str, aug_seed: int) -> int:
    digest = hashlib.sha256(f"{image_name}\0{aug_seed}\0copy-paste".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def copy_paste(image: np.ndarray, ids: np.ndarray, index: int, image_name: str, aug_seed: int,
               cfg: CopyPasteConfig, read_source: Callable[[int], tuple[np.ndarray, np.ndarray]]
               ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Paste instances into (image RGB uint8 HxWx3, ids uint8 HxW) of train image `index`; returns
    new arrays and what was placed (for tests and debugging)."""
    rng = np.random.default_rng(paste_seed(image_name, aug_seed))
    usable = [c for c in cfg.classes if any(j != index for j in cfg.sources.get(c, []))]
    if not usable:
        return image, ids, []
    c = usable[int(rng.integers(len(usable)))]
    candidates = [j for j in cfg.sources[c] if j != index]
    j = candidates[int(rng.integers(len(candidates)))]
    src_image, src_ids = read_source(j)
    n, labels, stats, _ = cv2.connectedComponentsWithStats((src_ids == c).astype(np.uint8), connectivity=8)
    comps = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= MIN_COMPONENT_PIXELS]
    comps = sorted(comps, key=lambda k: -stats[k, cv2.CC_STAT_AREA])[: cfg.max_instances]
    image, ids = image.copy(), ids.copy()
    h_img, w_img = ids.shape
    placed = []
    for k in comps:
        x, y, w, h = (int(v) for v in stats[k, :4])
        sel = labels[y:y + h, x:x + w] == k
        crop = src_image[y:y + h, x:x + w]
        flip = bool(rng.random() < cfg.flip_p)
        s = float(rng.uniform(*cfg.scale))
        if flip:
            sel, crop = sel[:, ::-1], crop[:, ::-1]
        nw, nh = min(w_img, max(1, round(w * s))), min(h_img, max(1, round(h * s)))
        crop = cv2.resize(np.ascontiguousarray(crop), (nw, nh), interpolation=cv2.INTER_LINEAR)
        sel = cv2.resize(sel.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
        y0, x0 = int(rng.integers(0, h_img - nh + 1)), int(rng.integers(0, w_img - nw + 1))
        region = ids[y0:y0 + nh, x0:x0 + nw]
        put = sel & (region != IGNORE_INDEX)
        region[put] = c
        image[y0:y0 + nh, x0:x0 + nw][put] = crop[put]
        placed.append({"class": c, "source": j, "component_box": (x, y, w, h), "flip": flip, "scale": s,
                       "at": (x0, y0), "size": (nw, nh), "pixels": int(put.sum())})
    return image, ids, placed
