"""Experiment commands: `seg sweep` (hyper-parameter search on one cache) and `seg compare`."""

from __future__ import annotations

import click

from seg.cli.common import COUNT, example, user_errors
from seg.cli.group import main

# train-head's own flags that say where and how a run trains, not what it trains
_RUN_FLAGS = ("device", "preload", "workers", "strict_preset", "allow_mismatch", "weights", "checkpointing",
              "amp_dtype", "scale_batch", "tensorboard", "init_from", "init_from_pmt", "target", "deterministic")
# flags a sweep sets per trial itself, or that would make the trials other than the study says
_NOT_IN_SWEEPS = ("--cache", "--out", "--resume", "--overwrite", "--phase", "--config", "--no-verify")


def train_head_flags(args: list[str], phase: int) -> tuple[dict, dict]:
    """Parse train-head flags given to `seg sweep` with train-head's own parser: (settings every trial
    shares, run options)."""
    from seg.cli.pipeline import train_head

    named = [a for a in args if a.split("=", 1)[0] in _NOT_IN_SWEEPS]
    if named:
        raise click.UsageError(f"{named[0].split('=', 1)[0]} is not a train-head flag a sweep passes on "
                               "(seg sweep has its own --cache, --out and --phase; trials resume by themselves)")
    ctx = train_head.make_context("seg sweep", ["--cache", ".", "--out", ".", "--phase", str(phase), *args])
    params = dict(ctx.params)
    run = {k: params.pop(k) for k in _RUN_FLAGS if k in params}
    for k in ("cache_dir", "out", "phase", "resume", "overwrite", "no_verify", "no_progress", "config_file"):
        params.pop(k, None)
    return {k: v for k, v in params.items() if v is not None}, run


@main.command("sweep", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              epilog=example("seg sweep --cache cache --out sweeps/p3 --trials 12 --epochs 8 "
                             "--search lr=1e-5:1e-3:log --search focal-gamma=1:3 --search head=convnext,upernet",
                             "seg sweep --cache cache --out sweeps/p3 --trials 24 --storage postgresql://host/db ..."))
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False), help="Feature cache every trial trains on.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Sweep folder: study.db, one run folder per trial, sweep.json, best -> the best trial.")
@click.option("--trials", required=True, type=COUNT, help="Trials in the study (all processes together).")
@click.option("--phase", type=click.IntRange(1, 3), default=3, show_default=True, help="Preset the trials start from.")
@click.option("--search", multiple=True, required=True, metavar="NAME=LOW:HIGH[:log] | NAME=a,b,c",
              help="A searched train-head setting (repeatable): a range of numbers, or choices.")
@click.option("--storage", default=None, help="Optuna RDB URL of a shared study [default: sqlite in --out].")
@click.option("--study-name", default=None, help="Study name in the storage [default: the --out folder's name].")
@click.option("--sampler", type=click.Choice(["tpe", "random"]), default="tpe", show_default=True)
@click.option("--pruner", type=click.Choice(["median", "none"]), default="median", show_default=True,
              help="median: stop a trial whose val mIoU at an epoch is below the median of earlier trials there.")
@click.option("--seed", type=int, default=None, help="Sampler seed (give each process its own) [default: random].")
@click.option("--heartbeat", type=COUNT, default=20, show_default=True,
              help="Seconds between a trial's liveness records; a trial silent for 3x this is taken as dead and retried.")
@click.pass_context
@user_errors(on_interrupt="interrupted; rerun the same command to continue: finished trials are kept and the "
                          "interrupted one resumes from its last finished epoch")
def sweep_cmd(ctx, cache_dir, out, trials, phase, search, storage, study_name, sampler, pruner, seed,
              heartbeat) -> None:
    """Search head hyper-parameters on one cache with Optuna (TPE, median pruning on val mIoU).

    Any other train-head flag (--epochs 8, --head upernet, --device cuda, ...) holds for every trial.
    Several processes, on one machine or many (with --storage), can work on one study."""
    from seg.experiments.study import SweepOptions, sweep
    from seg.train_head import RunOptions

    fixed, run = train_head_flags(list(ctx.args), phase)
    searched = {s.partition("=")[0].strip().lstrip("-").replace("-", "_") for s in search}
    both = sorted(searched & set(fixed))
    if both:
        raise click.UsageError(f"--{both[0].replace('_', '-')} is both searched and fixed; drop one")
    sweep(SweepOptions(cache=cache_dir, out=out, trials=trials, search=tuple(search), phase=phase, fixed=fixed,
                       run=RunOptions(**run), storage=storage, study_name=study_name, sampler=sampler,
                       pruner=pruner, seed=seed, heartbeat=heartbeat), log=click.echo)


@main.command("compare", epilog=example("seg compare runs/p2 runs/p3 --out compare/",
                                        "seg compare sweeps/p3 --out sweeps/p3/compare"))
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Write compare.json and compare.png here.")
@user_errors
def compare_cmd(runs, out) -> None:
    """Runs side by side: per-class IoU, validation curves and config differences (sweep folders
    stand for their trials)."""
    from seg.experiments.compare import compare

    compare(list(runs), out, log=click.echo)
