"""`seg compare`: several runs side by side: per-class IoU, their validation curves, and how their
configs differ. A sweep folder stands for its trials."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from seg.runtime.atomic import write_json
from seg.runtime.errors import SegError
from seg.runtime.json_file import read_json
from seg.runtime.output import Output, vouched_by

SWEEP_SETTINGS = "sweep-settings.json"
COMPARE_LOCK = ".seg-compare.lock"
COMPARE_FILES = ("compare.json", "compare.png", COMPARE_LOCK)


@dataclass
class RunSummary:
    path: Path
    label: str
    config: dict
    classes: list[str]
    metrics: dict
    history: list[dict]


def expand(paths: list[str]) -> list[Path]:
    """Run folders; a sweep folder gives its trials that finished an epoch, in trial order."""
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise SegError(f"{p}: not a folder (give run folders or sweep folders)")
        if (p / SWEEP_SETTINGS).is_file():
            trials = sorted(t for t in p.glob("trial-*") if (t / "metrics.json").is_file())
            if not trials:
                raise SegError(f"{p}: a sweep with no trial that finished an epoch yet")
            runs += trials
        else:
            runs.append(p)
    if len(runs) < 2:
        raise SegError("seg compare needs two or more runs (or a sweep folder with two or more trials)")
    return runs


def load_summary(path: Path, label: str) -> RunSummary:
    for name in ("config.json", "metrics.json"):
        if not (path / name).is_file():
            raise SegError(f"{path}: no {name} (not a seg run, or no epoch has finished)")
    config = read_json(path / "config.json", "run config")
    metrics = read_json(path / "metrics.json", "run metrics")
    history = read_json(path / "history.json", "run history") if (path / "history.json").is_file() else []
    try:
        classes = [c["name"] for c in config["class_table"]["classes"]]
        cfg = dict(config["config"])
    except (KeyError, TypeError):
        raise SegError(f"{path / 'config.json'}: not a seg run config") from None
    return RunSummary(path, label, cfg, classes, metrics, history if isinstance(history, list) else [])


def _labels(paths: list[Path]) -> list[str]:
    """Folder names, with their parent where two names clash."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def compare(paths: list[str], out: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    if out is None:
        return _compare(paths, None, log)
    owns = vouched_by(Path(out), "compare.json", {"runs", "classes", "config_differences"}, COMPARE_FILES)
    with Output(Path(out), "compare", owns, COMPARE_LOCK, what="comparison"):
        return _compare(paths, Path(out), log)


def _compare(paths: list[str], folder: Optional[Path], log: Callable[[str], None]) -> dict:
    folders = expand(paths)
    runs = [load_summary(p, label) for p, label in zip(folders, _labels(folders))]
    first = runs[0]
    for r in runs[1:]:
        if r.classes != first.classes:
            raise SegError(f"{r.path}: its classes ({', '.join(r.classes[:4])}{'...' if len(r.classes) > 4 else ''}) "
                           f"differ from those of {first.path} ({', '.join(first.classes[:4])}"
                           f"{'...' if len(first.classes) > 4 else ''}); compare runs with the same class table")
    keys = sorted({k for r in runs for k in r.config})
    differs = {k: [r.config.get(k) for r in runs] for k in keys
               if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1}
    result = {
        "runs": [{"label": r.label, "path": str(r.path.resolve()), "miou": r.metrics.get("miou"),
                  "best_epoch": r.metrics.get("epoch"), "iou": dict(zip(r.classes, r.metrics.get("iou", [])))}
                 for r in runs],
        "classes": first.classes,
        "config_differences": differs,
    }
    log(_iou_table(runs))
    log(_config_table(runs, differs))
    if folder is not None:
        write_json(folder / "compare.json", result)
        _plot(runs, folder / "compare.png")
        log(f"wrote {folder / 'compare.json'} and {folder / 'compare.png'}")
    return result


def _cell(v) -> str:
    return "   -  " if v is None else f"{v:6.4f}"


def _iou_table(runs: list[RunSummary]) -> str:
    width = max(8, *(len(r.label) for r in runs))
    name_w = max(len("mean IoU"), *(len(c) for c in runs[0].classes))
    lines = [f"{'class':{name_w}s}  " + "  ".join(f"{r.label:>{width}s}" for r in runs)]
    for i, c in enumerate(runs[0].classes):
        values = [r.metrics.get("iou", [None] * (i + 1))[i] for r in runs]
        lines.append(f"{c:{name_w}s}  " + "  ".join(f"{_cell(v):>{width}s}" for v in values))
    lines.append(f"{'mean IoU':{name_w}s}  " + "  ".join(f"{_cell(r.metrics.get('miou')):>{width}s}" for r in runs))
    return "\n".join(lines)


def _config_table(runs: list[RunSummary], differs: dict) -> str:
    if not differs:
        return "configs: identical"
    width = max(8, *(len(r.label) for r in runs))
    key_w = max(len("config differs"), *(len(k) + 2 for k in differs))
    lines = [f"{'config differs':{key_w}s}  " + "  ".join(f"{r.label:>{width}s}" for r in runs)]
    for k, values in differs.items():
        lines.append(f"{'--' + k.replace('_', '-'):{key_w}s}  " + "  ".join(f"{_short(v):>{width}s}" for v in values))
    return "\n".join(lines)


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(runs: list[RunSummary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from seg.runtime.atomic import write_atomic

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    for r in runs:
        epochs = [h["epoch"] for h in r.history if "val_miou" in h]
        ax1.plot(epochs, [h["val_miou"] for h in r.history if "val_miou" in h], marker=".", label=r.label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("val mIoU")
    ax1.set_title("validation curves")
    ax1.legend(fontsize=8)
    classes = runs[0].classes
    x = np.arange(len(classes))
    w = 0.8 / len(runs)
    for j, r in enumerate(runs):
        iou = [v if v is not None else 0.0 for v in r.metrics.get("iou", [0.0] * len(classes))]
        ax2.bar(x + (j - (len(runs) - 1) / 2) * w, iou, w, label=r.label)
    ax2.set_xticks(x, classes, rotation=35, ha="right", fontsize=8)
    ax2.set_ylabel("IoU (best epoch)")
    ax2.set_ylim(0, 1)
    ax2.set_title("per-class IoU")
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
