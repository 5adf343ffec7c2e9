"""A sweep's results: a table in the terminal, sweep.json, the best trial linked as `best`, and a
plot of val mIoU per trial with the running best."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from seg.runtime.atomic import write_json
from seg.runtime.output import temp_path

BEST_LINK = "best"


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                     "params": dict(t.params), "run_dir": t.user_attrs.get("run_dir"),
                     "best_epoch": t.user_attrs.get("best_epoch"),
                     "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
                     "error": t.user_attrs.get("error"),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None})
    return rows


def write_report(study, out: Path, opts, dims, seconds: float, log: Callable[[str], None]) -> dict:
    rows = trial_rows(study)
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = max(done, key=lambda r: r["value"]) if done else None
    summary = {"study": study.study_name, "storage": opts.storage or str((out / "study.db").resolve()),
               "trials_wanted": opts.trials, "search": [d.describe() for d in dims],
               "counts": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running", "waiting")},
               "best": best, "wall_seconds_this_process": seconds, "trials": rows}
    write_json(out / "sweep.json", summary)
    if best is not None and best["run_dir"]:
        _link_best(out, best["run_dir"])
    _plot(rows, out / "sweep.png")
    log(_table(rows, [d.name for d in dims]))
    c = summary["counts"]
    log(f"{c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed; "
        + (f"best: trial {best['trial']} val mIoU {best['value']:.4f} -> {out / BEST_LINK}" if best else "no trial finished")
        + f"; {out / 'sweep.json'}, {out / 'sweep.png'}")
    return summary


def _link_best(out: Path, run_dir: str) -> None:
    """`best` -> the best trial's run folder: a relative symlink, replaced only when it is seg's own."""
    link = out / BEST_LINK
    if link.exists() and not link.is_symlink():
        return  # never replace a file or folder seg did not make
    tmp = temp_path(link)
    try:
        os.symlink(run_dir, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a file system without symlinks: sweep.json still names the best run
        tmp.unlink(missing_ok=True)


def _table(rows: list[dict], names: list[str]) -> str:
    head = f"{'trial':>5s}  {'state':8s} {'val mIoU':>8s}  " + "  ".join(f"{n.replace('_', '-'):>12s}" for n in names)
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["value"] is None, -(r["value"] or 0))):
        vals = []
        for n in names:
            v = r["params"].get(n)
            vals.append(f"{v:12.4g}" if isinstance(v, float) else f"{str(v):>12s}")
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        lines.append(f"{r['trial']:5d}  {r['state']:8s} {value:>8s}  " + "  ".join(vals))
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seg.runtime.atomic import write_atomic

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["trial"] for r in rows if r["value"] is not None]
    ys = [r["value"] for r in rows if r["value"] is not None]
    colors = ["tab:blue" if r["state"] == "complete" else "tab:gray" for r in rows if r["value"] is not None]
    ax.scatter(xs, ys, c=colors, label="trial (grey: pruned)")
    running, best = [], float("-inf")
    for r in sorted((r for r in rows if r["state"] == "complete" and r["value"] is not None), key=lambda r: r["trial"]):
        best = max(best, r["value"])
        running.append((r["trial"], best))
    if running:
        ax.step(*zip(*running), where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("val mIoU")
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
