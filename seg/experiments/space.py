"""The search space of a sweep, from `--search NAME=LOW:HIGH[:log]` and `--search NAME=a,b,c`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from seg.runtime.errors import SegError
from seg.train.presets import CHOICES, TrainConfig

# Settings a sweep may not search: they name the experiment, not a hyper-parameter of it
FIXED = {"phase", "backbone", "size", "aug_policy"}
_TYPES = {f.name: f.type for f in fields(TrainConfig)}


@dataclass(frozen=True)
class Dimension:
    name: str                                   # TrainConfig field (lr, focal_gamma, head, ...)
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    integer: bool = False
    choices: Optional[tuple] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.flag} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.flag} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "") + (" (int)" if self.integer else "")

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def _kind(name: str) -> str:
    t = str(_TYPES[name])
    for kind in ("bool", "int", "float", "str"):
        if kind in t:
            return kind
    return "str"


def parse_search(spec: str) -> Dimension:
    """'lr=1e-5:1e-3:log' | 'focal-gamma=1:3' | 'head=convnext,upernet' -> a Dimension, or one line."""
    if "=" not in spec:
        raise SegError(f"--search {spec!r}: expected NAME=LOW:HIGH[:log] or NAME=a,b,c")
    raw_name, _, values = spec.partition("=")
    name = raw_name.strip().lstrip("-").replace("-", "_")
    if name not in _TYPES or name in FIXED:
        allowed = sorted(n.replace("_", "-") for n in _TYPES if n not in FIXED)
        raise SegError(f"--search {spec!r}: {raw_name!r} is not a train-head setting a sweep can search "
                       f"(one of {', '.join(allowed)})")
    kind = _kind(name)
    if "," in values or kind in ("str", "bool") or name in CHOICES:
        items = [v.strip() for v in values.split(",") if v.strip()]
        if len(items) < 2:
            raise SegError(f"--search {spec!r}: give at least two choices, comma-separated")
        parsed = tuple(_value(name, kind, v, spec) for v in items)
        allowed = CHOICES.get(name)
        bad = [v for v in parsed if allowed is not None and v not in allowed]
        if bad:
            raise SegError(f"--search {spec!r}: {bad[0]!r} is not one of {', '.join(allowed)}")
        return Dimension(name, choices=parsed)
    parts = values.split(":")
    log = len(parts) == 3 and parts[2].strip().lower() == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise SegError(f"--search {spec!r}: a range is LOW:HIGH or LOW:HIGH:log")
    low, high = (_value(name, kind, p, spec) for p in parts[:2])
    if not low < high:
        raise SegError(f"--search {spec!r}: LOW must be below HIGH")
    if log and low <= 0:
        raise SegError(f"--search {spec!r}: a log range needs LOW > 0")
    return Dimension(name, float(low), float(high), log, kind == "int")


def _value(name: str, kind: str, text: str, spec: str) -> Union[int, float, str, bool]:
    text = text.strip()
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
    except ValueError:
        raise SegError(f"--search {spec!r}: {text!r} is not a{'n integer' if kind == 'int' else ' ' + kind} "
                       f"for {name.replace('_', '-')}") from None
    return text


def parse_space(specs: list[str]) -> list[Dimension]:
    dims = [parse_search(s) for s in specs]
    names = [d.name for d in dims]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SegError(f"--search names {twice[0].replace('_', '-')} twice")
    if not dims:
        raise SegError("a sweep needs at least one --search NAME=LOW:HIGH[:log] or NAME=a,b,c")
    return dims
