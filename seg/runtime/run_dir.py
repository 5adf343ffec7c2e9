"""Which directories `seg train-head` may write into, and what `--overwrite` may delete there.

A run directory is seg's only when its config.json says so; every other file in it is the user's,
and seg neither writes next to it nor deletes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from seg.runtime.errors import SegError
from seg.runtime.output import Output

RUN_FORMAT = "seg-run"
LOCK = ".seg-train.lock"
RUN_FILES = ("config.json", "last.pt", "best.pt", "history.csv", "history.json", "metrics.json", "metrics.txt",
             "curves.png", "per_class_iou.png", LOCK)
EVAL_LOCK = ".seg-eval.lock"
EVAL_FILES = ("eval.json", "eval.txt", "confusion.png", "per_class_iou.png", EVAL_LOCK)


def owns_run_file(rel: str) -> bool:
    """A file a seg run directory may hold ('/'-separated, relative): the run's own files, eval
    reports in `eval-*/`, TensorBoard logs."""
    head, _, name = rel.partition("/")
    if not name:
        return head in RUN_FILES
    if head.startswith("eval-"):
        return name in EVAL_FILES
    return head == "tensorboard" and "/" not in name and name.startswith("events.out.tfevents.")


def is_seg_run(out: Path) -> bool:
    """config.json written by seg train-head (this version's marker, or an earlier run's keys)."""
    try:
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (cfg.get("format") == RUN_FORMAT
                                      or {"config", "cache_fingerprint", "class_table"} <= set(cfg))


def run_output(out: Path) -> Output:
    """The claim train-head takes on its run directory."""
    return Output(out, "train-head", owns_run_file, LOCK, what="run directory")


def run_dir_foreign(out: Path) -> list[str]:
    """Files of a seg run directory that seg did not write, sorted."""
    return run_output(out).foreign()


def check_run_dir(out: Path, cache_dir: Path, resume: bool, overwrite: bool) -> str:
    """Check that --out may be used: "fresh" (new or empty), "resume" (a seg run and --resume) or
    "replace" (a seg run and --overwrite; `clear_run_dir` then deletes it)."""
    if resume and overwrite:
        raise SegError("--resume continues a run and --overwrite replaces it: pass one of them")
    out_r, cache_r = out.resolve(), Path(cache_dir).resolve()
    if out_r == cache_r or cache_r in out_r.parents:
        raise SegError(f"{out}: is inside the feature cache {cache_dir}; choose a run directory outside it")
    if out.exists() and not out.is_dir():
        raise SegError(f"{out}: exists and is not a directory")
    if not out.exists() or not any(p.name != LOCK for p in out.iterdir()):  # a lock alone: a start that died
        if resume:
            raise SegError(f"{out}: nothing to resume (no run there); drop --resume to start one")
        return "fresh"
    if not is_seg_run(out):
        first = sorted(p.name for p in out.iterdir() if p.name != LOCK)[0]
        raise SegError(f"{out / first}: not written by seg train-head ({out} is not a seg run directory and is not "
                       "empty); seg writes runs only "
                       "into a new or empty directory: choose another --out")
    foreign = run_dir_foreign(out)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise SegError(f"{out / foreign[0]}: not written by seg{more}; seg will not write next to or delete "
                       "your files: move it or choose another --out")
    if resume:
        return "resume"
    if not overwrite:
        raise SegError(f"{out}: holds a seg run already; pass --resume to continue it, --overwrite to replace it, "
                       "or choose another --out")
    return "replace"


def clear_run_dir(out: Path, log: Callable[[str], None]) -> None:
    """--overwrite: delete the old run's files (check_run_dir has made sure they are all seg's)."""
    doomed = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != LOCK)
    log(f"--overwrite: deleting the old run's {len(doomed)} entries in {out}: {', '.join(doomed)}")
    for p in out.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
