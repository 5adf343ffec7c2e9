"""Class tables: raw mask values -> class ids, names and the colours used for drawing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from seg.runtime.errors import SegError
from seg.runtime.json_file import read_json

IGNORE_INDEX = 255

# The published value map, plus 600 (Flowers) -> Background, which the published scripts did
# silently and we do explicitly (DESIGN.md section 1).
DEFAULT_CLASSES = [
    ("Background", [0, 600], (0, 0, 0)),
    ("Trees", [100], (34, 139, 34)),
    ("Lush Bushes", [200], (0, 255, 0)),
    ("Dry Grass", [300], (210, 180, 140)),
    ("Dry Bushes", [500], (139, 90, 43)),
    ("Ground Clutter", [550], (128, 128, 0)),
    ("Logs", [700], (139, 69, 19)),
    ("Rocks", [800], (128, 128, 128)),
    ("Landscape", [7100], (160, 82, 45)),
    ("Sky", [10000], (135, 206, 235)),
]


@dataclass(frozen=True)
class ClassTable:
    names: tuple[str, ...]
    raw_values: tuple[tuple[int, ...], ...]   # per class, the raw mask values that map to it
    colors: tuple[tuple[int, int, int], ...]  # RGB, for colour masks and plots
    ignore_values: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not 1 <= len(self.names) < IGNORE_INDEX:
            raise SegError(f"a class table needs 1 to {IGNORE_INDEX - 1} classes, got {len(self.names)}")
        seen: dict[int, str] = {}
        for name, values in zip(self.names, self.raw_values):
            for v in values:
                if not 0 <= v <= 65535:
                    raise SegError(f"class {name!r}: raw value {v} is outside 0..65535")
                if v in seen:
                    raise SegError(f"raw value {v} is given to both {seen[v]!r} and {name!r}")
                seen[v] = name

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def lut(self) -> np.ndarray:
        """uint16 raw value -> class id; -1 for values the table does not know."""
        table = np.full(65536, -1, dtype=np.int16)
        for cid, values in enumerate(self.raw_values):
            table[list(values)] = cid
        table[list(self.ignore_values)] = IGNORE_INDEX
        return table

    def palette(self) -> np.ndarray:
        """[256, 3] uint8 RGB; ids past the table (and ignore) are white."""
        pal = np.full((256, 3), 255, dtype=np.uint8)
        pal[: self.num_classes] = np.array(self.colors, dtype=np.uint8)
        return pal

    def to_json(self) -> dict:
        return {
            "classes": [
                {"id": i, "name": n, "values": list(v), "color": list(c)}
                for i, (n, v, c) in enumerate(zip(self.names, self.raw_values, self.colors))
            ],
            "ignore_values": list(self.ignore_values),
            "ignore_index": IGNORE_INDEX,
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "class table") -> "ClassTable":
        """Validate the whole table now, not when a later stage trips over it; every error is one
        line naming the source and the entry."""

        def fail(where: str, problem: str) -> SegError:
            return SegError(f"{source}: {where}: {problem}")

        if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
            raise SegError(f'{source}: expected {{"classes": [{{"name": ..., "values": [...]}}, ...]}} '
                           "with at least one class")
        names, values, colors, owner = [], [], [], {}
        for i, e in enumerate(data["classes"]):
            where = f"classes[{i}]"
            if not isinstance(e, dict):
                raise fail(where, f"expected an object with name and values, got {e!r}")
            name = e.get("name")
            if not isinstance(name, str) or not name.strip():
                raise fail(where, f"needs a non-empty string name, got {name!r}")
            where = f"classes[{i}] ({name!r})"
            if name in names:
                raise fail(where, f"the name is also class {names.index(name)}'s; names must be unique")
            vals = e.get("values")
            if not isinstance(vals, list) or not vals:
                raise fail(where, f"needs a non-empty list of raw mask values, got {vals!r}")
            for v in vals:
                _check_raw_value(v, lambda p: fail(where, p))
                if v in owner:
                    raise fail(where, f"raw value {v} is also given to {owner[v]!r}")
                owner[v] = name
            color = e.get("color", list(fallback_color(i)))
            if not (isinstance(color, list) and len(color) == 3
                    and all(_is_int(c) and 0 <= c <= 255 for c in color)):
                raise fail(where, f"color must be three integers in 0..255 (RGB), got {color!r}")
            names.append(name)
            values.append(tuple(vals))
            colors.append(tuple(color))
        ignore = data.get("ignore_values", [])
        if not isinstance(ignore, list):
            raise fail("ignore_values", f"expected a list of raw values, got {ignore!r}")
        for v in ignore:
            _check_raw_value(v, lambda p: fail("ignore_values", p))
            if v in owner:
                raise fail("ignore_values", f"raw value {v} is also class {owner[v]!r}'s; a value is either "
                                            "a class or ignored")
        return cls(tuple(names), tuple(values), tuple(colors), tuple(ignore))  # type: ignore[arg-type]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_raw_value(v, fail) -> None:
    if not _is_int(v):
        raise fail(f"raw values must be integers, got {v!r}")
    if not 0 <= v <= 65535:
        raise fail(f"raw value {v} is outside 0..65535 (uint16 masks)")


def fallback_color(i: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(1000 + i)
    return tuple(int(c) for c in rng.integers(0, 256, 3))  # type: ignore[return-value]


def default_class_table() -> ClassTable:
    return ClassTable(
        names=tuple(n for n, _, _ in DEFAULT_CLASSES),
        raw_values=tuple(tuple(v) for _, v, _ in DEFAULT_CLASSES),
        colors=tuple(c for _, _, c in DEFAULT_CLASSES),
    )


def load_class_table(path: Optional[str]) -> ClassTable:
    """--classes: a JSON class table file, or class names in id order (`ground,sky,tree`)."""
    if path is None:
        return default_class_table()
    names = class_names(path)
    if names is not None:
        return names_table(names)
    return ClassTable.from_json(read_json(path, "class table"), source=str(path))


def class_names(text: str) -> Optional[list[str]]:
    """The names of `--classes a,b,c`; None when the text names a file (it exists, or ends in .json,
    or has no comma)."""
    if "," not in text or text.lower().endswith(".json") or Path(text).exists():
        return None
    return [n.strip() for n in text.split(",")]


def names_table(names: list[str]) -> ClassTable:
    """Masks of class ids 0..K-1 named in id order; 255 is ignored (the usual void value)."""
    data = {"classes": [{"name": n, "values": [i]} for i, n in enumerate(names)], "ignore_values": [255]}
    if len(names) < 2:
        raise SegError(f"--classes {','.join(names)}: segmentation needs at least two classes")
    if len(names) > 255:
        raise SegError(f"--classes: {len(names)} names, but id masks hold at most 255 classes (255 is ignored)")
    return ClassTable.from_json(data, source="--classes")


def table_from_mask_values(values: list[int], ignore: tuple[int, ...] = (255,)) -> dict:
    """A starting class table (JSON) for id masks holding `values`: one class per value, in value
    order, named class_<value>; values in `ignore` are ignored."""
    kept = sorted(v for v in set(values) if v not in ignore)
    return {"classes": [{"id": i, "name": f"class_{v}", "values": [v]} for i, v in enumerate(kept)],
            "ignore_values": sorted(v for v in set(values) if v in ignore) or [255]}
