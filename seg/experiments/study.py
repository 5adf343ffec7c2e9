"""`seg sweep`: hyper-parameter search over head training on one cache, with Optuna.

The study lives in an SQLite file in the sweep folder (or any Optuna RDB URL), so a sweep resumes
after a kill and several processes or machines can work on one study. Each trial is a normal run
directory, `trial-NNNN`; a trial cut short by Ctrl-C or a killed process resumes from its last epoch
when the sweep runs again.

How the N trials stay N with several processes: trial numbers come from the database in order; a
trial whose number finds N counted trials (complete, pruned, running or waiting) below it is a
surplus, ended at once and never trained.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from seg.cache import FeatureCache
from seg.experiments.space import Dimension, parse_space
from seg.experiments.compare import COMPARE_FILES
from seg.runtime.errors import SegError
from seg.runtime.output import Output
from seg.runtime.run_dir import owns_run_file
from seg.train.presets import resolve
from seg.train_head import RunOptions, train

SETTINGS = "sweep-settings.json"
DB = "study.db"
MAX_FAILURES_IN_A_ROW = 3
OPTUNA_HINT = "seg sweep needs the sweep extra: pip install 'seg[sweep]' (optuna)"


@dataclass
class SweepOptions:
    cache: str
    out: str
    trials: int
    search: tuple[str, ...]
    phase: int = 3
    fixed: dict[str, Any] = field(default_factory=dict)    # train-head settings every trial shares
    run: RunOptions = field(default_factory=RunOptions)    # device, preload, ... of every trial
    storage: Optional[str] = None                          # an Optuna RDB URL; default SWEEP/study.db
    study_name: Optional[str] = None                       # default: the sweep folder's name
    sampler: str = "tpe"                                   # tpe | random
    pruner: str = "median"                                 # median | none
    seed: Optional[int] = None                             # the sampler's; give each process its own
    heartbeat: int = 20                                    # s between liveness records; 3x silent = dead


class _Surplus(Exception):
    pass


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SegError(OPTUNA_HINT) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # seg prints one line per trial itself
    logging.getLogger("optuna").setLevel(logging.ERROR)
    return optuna


def settings_record(opts: SweepOptions, dims: list[Dimension]) -> dict:
    """What makes two sweeps the same study: checked when a sweep resumes or a process joins."""
    # not --trials: a sweep may be extended by running it again with more
    return {"cache": str(Path(opts.cache).resolve()), "phase": opts.phase,
            "fixed": {k: v for k, v in sorted(opts.fixed.items()) if v is not None},
            "search": [d.describe() for d in dims], "sampler": opts.sampler, "pruner": opts.pruner}


def open_study(opts: SweepOptions, dims: list[Dimension]):
    optuna = _optuna()
    out = Path(opts.out)
    url = opts.storage or f"sqlite:///{(out / DB).resolve()}"
    # heartbeats let a process notice trials whose process died; they are retried once, resuming their
    # run (Optuna 4.9 renamed the callback; both mark the retry with the "failed_trial" system attr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" notes about heartbeats: not the user's business
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
                retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
            else:
                retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=opts.heartbeat, grace_period=3 * opts.heartbeat, **retry,
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
    except Exception as exc:  # a bad URL or an unreachable database
        raise SegError(f"cannot open the study storage {url}: {str(exc).splitlines()[0][:200]}") from None
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if opts.pruner == "median"
              else optuna.pruners.NopPruner())
    name = opts.study_name or out.resolve().name
    study = optuna.create_study(study_name=name, storage=storage, pruner=pruner, direction="maximize",
                                load_if_exists=True)
    # A seeded sampler restarted on a resumed study would propose its first trials again: offset the
    # seed by the trials the study already holds
    seed = None if opts.seed is None else opts.seed + 1000 * len(study.get_trials(deepcopy=False))
    study.sampler = (optuna.samplers.TPESampler(seed=seed) if opts.sampler == "tpe"
                     else optuna.samplers.RandomSampler(seed=seed))
    mine = settings_record(opts, dims)
    theirs = study.user_attrs.get("seg_settings")
    if theirs is None:
        study.set_user_attr("seg_settings", mine)
    elif theirs != mine:
        diffs = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise SegError(f"study {name!r} in {url} was started with other settings (differs in {', '.join(diffs)}: "
                       f"{theirs.get(diffs[0])!r} vs {mine[diffs[0]]!r}); use another --out or --study-name")
    return study


def counted(trial) -> bool:
    """A trial that is one of the N: finished, pruned, running or queued; not failed, not surplus."""
    from optuna.trial import TrialState

    return (trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
            and not trial.user_attrs.get("surplus"))


def finished(study) -> int:
    """Counted trials that are done: complete or pruned."""
    return sum(counted(t) for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED"))


def requeue_interrupted(study) -> int:
    """Trials a Ctrl-C ended are queued again (once), with their parameters: they resume their run."""
    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("resume_trial") for t in trials}
    n = 0
    for t in trials:
        if t.user_attrs.get("interrupted") and t.number not in queued and t.state.name == "FAIL":
            study.enqueue_trial(t.params, user_attrs={"resume_trial": t.number, "run_dir": t.user_attrs["run_dir"]})
            n += 1
    return n


def sweep(opts: SweepOptions, log: Callable[[str], None] = print) -> dict:
    optuna = _optuna()
    dims = parse_space(list(opts.search))
    if opts.trials < 1:
        raise SegError("--trials must be at least 1")
    resolve(opts.phase, dict(opts.fixed))  # the shared settings are checked once, before any trial
    out = Path(opts.out)
    cache = FeatureCache(opts.cache)
    n_shards, n_bytes = cache.check_shards(cache.splits)  # once here; the trials read checked files
    # The folder, the study and the settings file are set up by one process at a time: the others
    # wait for the lock, then find the study and the settings in place and join them.
    settings = settings_record(opts, dims)
    with sweep_output(out):
        _check_settings(out, settings)
        study = open_study(opts, dims)
        _write_settings(out, settings)
    log(f"sweep {out}: {opts.trials} trials of phase {opts.phase} on {opts.cache} "
        f"({n_shards} shards, {n_bytes / 1e6:.0f} MB checked); searching " + "; ".join(d.describe() for d in dims))
    requeued = requeue_interrupted(study)
    if requeued:
        log(f"{requeued} interrupted trial(s) queued again: they resume from their last finished epoch")
    t0 = time.perf_counter()

    def objective(trial) -> float:
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counted(t)]
        if len(earlier) >= opts.trials:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise _Surplus()
        params = {d.name: d.suggest(trial) for d in dims}
        # a retried trial (its process died) inherits its run folder, and so does a trial queued again
        # after a Ctrl-C: either resumes from the folder's last.pt
        run_dir = out / (trial.user_attrs.get("run_dir") or f"trial-{trial.number:04d}")
        trial.set_user_attr("run_dir", run_dir.name)
        try:
            cfg = resolve(opts.phase, {**opts.fixed, **params})
        except SegError as exc:  # a combination the trainer refuses: this trial fails, the sweep goes on
            trial.set_user_attr("error", str(exc))
            log(f"trial {trial.number}: {_params_text(params)} -> refused: {exc}")
            raise
        resume = (run_dir / "last.pt").is_file()

        def report(epoch: int, row: dict) -> None:
            trial.report(row["val_miou"], epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", epoch + 1)
                raise optuna.TrialPruned()

        run_opts = replace(opts.run, resume=resume, overwrite=False, verify=False, progress=False, on_epoch=report)
        try:
            metrics = train(cfg, str(cache.path), str(run_dir), run_opts, log=lambda s: None)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        value = float(metrics.get("miou", float("nan")))
        trial.set_user_attr("best_epoch", metrics.get("epoch"))
        return value

    failures = []

    def after(study_, trial) -> None:
        state = trial.state.name.lower()
        if trial.user_attrs.get("surplus"):
            return
        failures.append(state == "fail")
        if failures[-MAX_FAILURES_IN_A_ROW:] == [True] * MAX_FAILURES_IN_A_ROW:
            log(f"stopping: {MAX_FAILURES_IN_A_ROW} trials in a row failed (see each trial's line above)")
            study_.stop()
            return
        value = f"val mIoU {trial.value:.4f}" if trial.value is not None else ""
        if state == "pruned":
            value = f"pruned after epoch {trial.user_attrs.get('pruned_at_epoch', '?')}"
        best = _best(study_)
        log(f"trial {trial.number} ({trial.user_attrs.get('run_dir', '')}): {_params_text(trial.params)} -> "
            f"{value or state}" + (f"   best so far: trial {best.number}, {best.value:.4f}" if best else ""))
        if finished(study_) >= opts.trials:
            study_.stop()

    interrupted = False
    try:
        if finished(study) < opts.trials:
            study.optimize(objective, callbacks=[after], catch=(_Surplus, SegError), gc_after_trial=True)
    except KeyboardInterrupt:
        interrupted = True
    from seg.experiments.sweep_report import write_report

    summary = write_report(study, out, opts, dims, time.perf_counter() - t0, log)
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _best(study):
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]
    return max(done, key=lambda t: t.value) if done else None


def _params_text(params: dict) -> str:
    return ", ".join(f"{k.replace('_', '-')}={v:.4g}" if isinstance(v, float) else f"{k.replace('_', '-')}={v}"
                     for k, v in params.items())


SWEEP_FILES = (SETTINGS, DB, DB + "-journal", DB + "-wal", DB + "-shm", "sweep.json", "sweep.png", "best")
SWEEP_LOCK = ".seg-sweep.lock"


def owns_sweep_file(rel: str) -> bool:
    """What a sweep folder may hold: the study, settings and report, one run folder per trial, and a
    `seg compare` of its trials in `compare/`."""
    head, _, rest = rel.partition("/")
    if not rest:
        return head in SWEEP_FILES
    if head == "compare":
        return rest in COMPARE_FILES
    return head.startswith("trial-") and head[6:].isdigit() and owns_run_file(rest)


def sweep_output(out: Path) -> Output:
    """The claim on the sweep folder. Several sweep processes share one folder on purpose, so a
    process waits for the lock instead of being refused; it is held while the study is set up."""
    return Output(out, "sweep", owns_sweep_file, SWEEP_LOCK, wait=True, what="sweep folder")


def _check_settings(out: Path, record: dict) -> None:
    """A folder holding files but no settings is not a sweep (the claim refuses foreign files; an
    empty study.db alone is what a process that died at its start leaves)."""
    path = out / SETTINGS
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise SegError(f"{path}: unreadable sweep settings; this folder is not a sweep seg can continue") from None
        if old != record:
            diffs = sorted(k for k in record if record[k] != old.get(k))
            raise SegError(f"{out}: this sweep was started with other settings (differs in {', '.join(diffs)}); "
                           "use another --out to search differently")


def _write_settings(out: Path, record: dict) -> None:
    from seg.runtime.atomic import write_json

    if not (out / SETTINGS).is_file():
        write_json(out / SETTINGS, record)
