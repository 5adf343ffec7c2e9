"""`seg adapt --mode online`: DAFormer's self-training (seg.train.ema_teacher) in one student run,
guarded epoch by epoch.

OUT/student is a train-head run on the labelled source and the unlabeled target split, started from
the source model (or a fresh head with --student-init scratch), its EMA teacher starting as the same
weights. After each epoch's validation, before the epoch is kept, the guard reads what the teacher
labelled in the epoch (collapse and swallow, against the source split's class prior) and the
student's predictions over the cached target views (drift and shift, against the source model's,
measured once at the start). An epoch the guard stops is not saved and ends the run: the student
keeps its final weights (as DAFormer does), so best.pt holds the last epoch that passed; with none,
the source model stays the model. A kill at any point resumes: the student from its last saved epoch
with its teacher, the table from adapt.json.
"""

from __future__ import annotations

from pathlib import Path

from seg.adapt.guard import drift_problem, label_problems, shift_problem, verdict
from seg.adapt.pseudo_label import head_predictions, source_prior
from seg.adapt.record import load_state, measure, prediction_summary, save_state
from seg.cache import FeatureCache
from seg.runtime.device import resolve_device
from seg.train.config_file import config_from_file
from seg.train.ema_teacher import OnlineSettings
from seg.train.presets import TARGET_DEFAULTS
from seg.train_head import RunOptions, train


def online(opts, cache: FeatureCache, out: Path, log) -> dict:
    device = resolve_device(opts.run_options.device)
    settings = OnlineSettings(split=opts.target, momentum=opts.momentum, threshold=opts.threshold, mix=opts.mix)
    state = load_state(out, "online", {"run": str(Path(opts.run).resolve()), "cache": str(Path(opts.cache).resolve()),
                                       **settings.to_dict(), "student_init": opts.student_init,
                                       "guard": opts.guard.to_dict(), "student": opts.student},
                       {"source": None, "epochs": [], "final": None})
    if state["source"] is None:
        state["source"] = {"run": str(Path(opts.run).resolve()), **measure(opts.run, cache, opts.target, device),
                           "prior": source_prior(cache)}
        _save(out, state)
    src = state["source"]
    if state["final"] is not None:
        log(f"adapt: {out} is complete; final model {state['final']['model']}")
        return state
    log(f"adapt: on line on {opts.target} (EMA teacher {settings.momentum:g}, confidence {settings.threshold:g}, "
        f"mix {settings.mix}); source model {src['run']}: val mIoU {src['val_miou']:.4f}")
    student = out / "student"
    _train_student(opts, settings, cache, student, state, lambda: _save(out, state), log)
    passed = [e for e in state["epochs"] if e["passed"]]
    if passed and (student / "best.pt").exists():
        state["final"] = {"model": str(student.resolve()), "val_miou": passed[-1]["val_miou"],
                          "why": f"the student after epoch {passed[-1]['epoch']}, the last epoch the guard passed"}
    else:
        state["final"] = {"model": src["run"], "val_miou": src["val_miou"],
                          "why": "the source model: no epoch passed the guard"}
    _save(out, state)
    log(f"final model: {state['final']['model']} ({state['final']['why']})")
    return state


def _train_student(opts, settings: OnlineSettings, cache: FeatureCache, folder: Path, state: dict, save, log) -> None:
    """The student run, judged after every epoch; an epoch the guard stops ends it unsaved."""
    src, g = state["source"], opts.guard
    names = list(cache.class_table.names)

    def accept(epoch: int, row: dict, trainer) -> str | None:
        taught = trainer.epochs.teacher.epoch_stats()
        seen = _student_on_target(trainer, cache.split(opts.target))
        problems = label_problems({"source_prior": src["prior"], "shares": taught["shares"], "classes": names}, g)
        problems += [p for p in (drift_problem(seen["confidence"], src["confidence"], row["val_miou"],
                                               src["val_miou"], g, "source model -> student"),
                                 shift_problem(src["shares"], seen["shares"], names, g, "the source model")) if p]
        state["epochs"] = [e for e in state["epochs"] if e["epoch"] <= epoch] + [{
            "epoch": epoch + 1, "coverage": taught["coverage"], "shares": taught["shares"],
            "teacher_confidence": taught["teacher_confidence"], "mean_confidence": taught["mean_confidence"],
            "val_miou": row["val_miou"], "student_confidence": seen["confidence"], "student_shares": seen["shares"],
            "guard": problems, "passed": not problems}]
        save()
        if problems:
            return "STOPPED by the guard: " + verdict(problems)
        return None

    flags = {**TARGET_DEFAULTS, "select": "final", **opts.student}  # DAFormer keeps its last iteration
    cfg, source = config_from_file(Path(opts.run) / "config.json", flags, None)
    run_opts = RunOptions(**{**opts.run_options.__dict__, "online": settings, "accept_epoch": accept,
                             "resume": (folder / "config.json").exists(), "progress": opts.progress,
                             "config_source": source,
                             "init_from": opts.run if opts.student_init == "teacher" else None})
    train(cfg, opts.cache, str(folder), run_opts, log=log)


def _student_on_target(trainer, split) -> dict:
    """The student's mean confidence and predicted class shares over every cached view of the target."""
    trainer.head.eval()
    views = head_predictions(trainer.head, trainer.amp_dtype, trainer.epochs.grid, trainer.levels, split,
                             trainer.device, 8)
    return prediction_summary((logits for _, logits, _ in views), len(trainer.names))


def _save(out: Path, state: dict) -> None:
    save_state(out, state, epoch_table)


def epoch_table(state: dict) -> list[str]:
    """Per epoch: the teacher's coverage (confident share) and mean confidence, the student's mean
    confidence on the target, source val mIoU, the guard's verdict."""
    rows = [f"{'epoch':>5s} {'coverage':>8s} {'teacher conf':>12s} {'student conf':>12s} {'val mIoU':>8s}  guard"]
    src = state.get("source")
    if src:
        rows.append(f"{0:5d} {'-':>8s} {'-':>12s} {src['confidence']:12.3f} {src['val_miou']:8.4f}  source model")
    for e in state["epochs"]:
        rows.append(f"{e['epoch']:5d} {e['coverage']:8.1%} {e['mean_confidence']:12.3f} {e['student_confidence']:12.3f} "
                    f"{e['val_miou']:8.4f}  " + ("passed" if e["passed"] else f"STOPPED: {'; '.join(e['guard'])}"))
    if state.get("final"):
        rows.append(f"final: {state['final']['model']} ({state['final']['why']})")
    return rows
