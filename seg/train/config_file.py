"""`train-head --config FILE`: a run's own config.json, or a file of the same shape, as the starting
point of a new run; flags still override. The run records the file and its sha256."""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path
from typing import Any

from seg.runtime.errors import SegError
from seg.runtime.json_file import read_json
from seg.train.presets import PRESETS, TrainConfig, resolve, with_legacy_fields

_FIELDS = {f.name: str(f.type) for f in fields(TrainConfig)}


def _type_ok(value: Any, annotation: str) -> bool:
    if value is None:
        return "Optional" in annotation or annotation == "None"
    if "bool" in annotation:
        return isinstance(value, bool)
    if "float" in annotation:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if "int" in annotation:
        return isinstance(value, int) and not isinstance(value, bool)
    if "str" in annotation:
        return isinstance(value, str)
    return True


def read_config_file(path: str | Path) -> tuple[int | None, dict]:
    """(phase or None, settings) from a run's config.json ({"config": {...}, ...}) or a bare object
    holding any subset of the training settings."""
    path = Path(path)
    data = read_json(path, "training config")
    settings = data.get("config", data) if isinstance(data, dict) else None
    if not isinstance(settings, dict):
        raise SegError(f"{path}: expected a run's config.json or an object of training settings")
    unknown = sorted(set(settings) - set(_FIELDS))
    if unknown:
        raise SegError(f"{path}: unknown training setting(s) {', '.join(unknown)} (from a newer seg, or a typo)")
    settings = with_legacy_fields(settings)
    for key, value in settings.items():
        if not _type_ok(value, _FIELDS[key]):
            raise SegError(f"{path}: {key} is {value!r}, which is not a valid {_FIELDS[key]}")
    phase = settings.pop("phase", None)
    if phase is not None and phase not in PRESETS:
        raise SegError(f"{path}: phase must be 1, 2 or 3, got {phase!r}")
    return phase, settings


def config_from_file(path: str | Path, flags: dict, phase_flag: int | None,
                     default_phase: int = 3) -> tuple[TrainConfig, dict]:
    """The file's settings with the flags given on the command line on top; (config, the record of
    where it came from). The preset is the file's phase or --phase (else default_phase); a --phase
    other than the file's is refused: which preset would it mean?"""
    phase, settings = read_config_file(path)
    if phase is not None and phase_flag is not None and phase_flag != phase:
        raise SegError(f"--phase {phase_flag} differs from the phase {phase} in {path}; give one of them")
    phase = phase if phase is not None else (phase_flag if phase_flag is not None else default_phase)
    given = {k: v for k, v in flags.items() if v is not None}
    cfg = resolve(phase, {**settings, **given}, keep_none=True)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return cfg, {"path": str(Path(path).resolve()), "sha256": digest, "overridden": sorted(given)}
