"""`seg adapt`: rounds of self-training (CBST) on an unlabeled split of the cache, guarded.

Round r: the teacher (the given run, then the last student that passed) labels the split at portion
p + (r - 1) x step (`seg pseudo-label`, into OUT/round-r/pseudo); the guard reads the labels; a
student trains on the labelled source and the pseudo-labelled target (`train-head --target`, into
OUT/round-r/student, starting from the teacher's weights unless told otherwise); the guard compares
its source val mIoU and its confidence on the target with its teacher's. A round the guard stops is recorded with its reason and ends the rounds: the last
model that passed is the result (the given run when none did). Every step is resumable: a finished
step is kept, a student stopped mid-way continues from its last epoch. OUT/adapt.json holds the
table and the choice, rewritten after each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from seg.adapt.guard import GuardSettings, drift_problem, label_problems, mean_confidence, shift_problem, verdict
from seg.adapt.pseudo_label import PseudoOptions, pseudo_label, tta_twin
from seg.adapt.record import MODES, RECORD, TABLE, adapt_output, load_state, measure, save_state
from seg.backbones import file_sha256
from seg.cache import FeatureCache
from seg.cache.pseudo import read_pseudo
from seg.runtime.device import resolve_device
from seg.runtime.errors import SegError
from seg.train.config_file import config_from_file
from seg.train.presets import TARGET_DEFAULTS
from seg.train_head import RunOptions, train


@dataclass
class AdaptOptions:
    run: str
    cache: str
    target: str                  # the unlabeled split of the cache
    out: str
    mode: str = "rounds"         # rounds (CBST) | online (DAFormer: EMA teacher, seg.adapt.online)
    rounds: int = 3
    portion: float = 0.5
    portion_step: float = 0.05   # CBST's schedule: the portion grows each round
    student_init: str = "teacher"  # teacher (its weights) | scratch
    stride: int = 4
    momentum: float = 0.999      # online: the EMA teacher's
    threshold: float = 0.968     # online: the confidence whose pixel share weighs the pseudo-labels
    mix: str = "classmix"        # online: classmix (on the token grid) | none
    tta: str = "auto"            # rounds: the teachers' flip TTA (auto: when the target's mirrored twin is cached)
    guard: GuardSettings = field(default_factory=GuardSettings)
    student: dict = field(default_factory=dict)  # train-head settings for the students, over the teacher's
    run_options: RunOptions = field(default_factory=RunOptions)
    progress: bool = True


def adapt(opts: AdaptOptions, log: Callable[[str], None] = print) -> dict:
    if opts.mode not in MODES:
        raise SegError(f"--mode must be one of {', '.join(MODES)}, got {opts.mode!r}")
    if opts.rounds < 1:
        raise SegError(f"--rounds must be at least 1, got {opts.rounds}")
    if opts.student_init not in ("teacher", "scratch"):
        raise SegError(f"--student-init must be teacher or scratch, got {opts.student_init!r}")
    cache = FeatureCache(opts.cache)
    if opts.target not in cache.manifest["splits"]:
        raise SegError(f"{opts.cache}: no {opts.target!r} split to adapt to (it has {', '.join(cache.splits)}); "
                       "add one with `seg extract ... --unlabeled NAME=FOLDER`")
    out = Path(opts.out)
    with adapt_output(out):
        if opts.mode == "online":
            from seg.adapt.online import online

            return online(opts, cache, out, log)
        return _rounds(opts, cache, out, log)


def _rounds(opts: AdaptOptions, cache: FeatureCache, out: Path, log) -> dict:
    device = resolve_device(opts.run_options.device)
    state = _state(out, opts)
    twin = tta_twin(cache, opts.target, opts.tta, opts.cache)
    teacher = str(Path(opts.run).resolve())
    if state["source"] is None:
        state["source"] = {"run": teacher, "val_miou": measure(teacher, cache, None, device)["val_miou"]}
        _save(out, state)
    teacher_val = state["source"]["val_miou"]
    log(f"adapt: {opts.rounds} round(s) on {opts.target}; source model {teacher}: val mIoU {teacher_val:.4f}")
    for r in range(1, opts.rounds + 1):
        row = next((x for x in state["rounds"] if x["round"] == r), None)
        if row is None:
            row = {"round": r, "teacher": teacher, "portion": min(1.0, opts.portion + (r - 1) * opts.portion_step)}
            state["rounds"].append(row)
        rdir = out / f"round-{r}"
        pseudo = _pseudo_labels(opts, row, rdir / "pseudo", twin, log)
        row.update(coverage=pseudo["coverage"], shares=pseudo["shares"], prior=pseudo["source_prior"],
                   teacher_confidence=pseudo["teacher_confidence"], mean_confidence=mean_confidence(pseudo),
                   kept_label_accuracy=pseudo["kept_label_accuracy"])
        _save(out, state)  # a kill from here on finds this round's labels recorded
        problems = label_problems(pseudo, opts.guard)
        if not problems:
            student = _student(opts, row, rdir / "student", log)
            seen = measure(student, cache, opts.target, device, twin)
            row.update(student=student, val_miou=seen["val_miou"], student_confidence=seen["confidence"],
                       student_shares=seen["shares"],
                       # the teacher's predictions were counted while it labelled the split
                       teacher_shares=(np.asarray(pseudo["teacher_pixels"]) / sum(pseudo["teacher_pixels"])).tolist())
            problems = [p for p in (drift_problem(row["student_confidence"], row["mean_confidence"], row["val_miou"],
                                                  teacher_val, opts.guard),
                                    shift_problem(row["teacher_shares"], row["student_shares"], pseudo["classes"],
                                                  opts.guard)) if p]
        row["guard"] = problems
        row["passed"] = not problems
        _save(out, state)
        if problems:
            log(f"round {r}: STOPPED by the guard: {verdict(problems)}; keeping {teacher}")
            break
        log(f"round {r}: passed; student val mIoU {row['val_miou']:.4f} (teacher {teacher_val:.4f}), "
            f"{row['coverage']:.1%} of target pixels labelled")
        teacher, teacher_val = row["student"], row["val_miou"]
    passed = [x for x in state["rounds"] if x.get("passed")]
    state["final"] = {"model": teacher, "val_miou": teacher_val,
                      "why": (f"the student of round {passed[-1]['round']}, the last round the guard passed"
                              if passed else "the source model: no round passed the guard")}
    _save(out, state)
    log(f"final model: {teacher} ({state['final']['why']}); {out / RECORD}, {out / TABLE}")
    return state


def _state(out: Path, opts: AdaptOptions) -> dict:
    settings = {"run": str(Path(opts.run).resolve()), "cache": str(Path(opts.cache).resolve()),
                "target": opts.target, "portion": opts.portion, "portion_step": opts.portion_step,
                "student_init": opts.student_init, "stride": opts.stride, "guard": opts.guard.to_dict(),
                "student": opts.student, **({"tta": opts.tta} if opts.tta != "auto" else {})}
    return load_state(out, "rounds", settings, {"source": None, "rounds": [], "final": None})


def _pseudo_labels(opts: AdaptOptions, row: dict, folder: Path, twin: Optional[str], log) -> dict:
    """The round's pseudo-labels: kept when complete and made by this teacher at this portion, with
    flip TTA exactly when the mirrored twin is read."""
    try:
        record = read_pseudo(folder)
        if (record["teacher"]["best_pt_sha256"] == file_sha256(Path(row["teacher"]) / "best.pt")
                and record["method"]["portion"] == row["portion"]
                and record["method"]["tta"].startswith("flip") == (twin is not None)):
            return record
    except SegError:
        pass
    return pseudo_label(PseudoOptions(run=row["teacher"], cache=opts.cache, split=opts.target, out=str(folder),
                                      portion=row["portion"], stride=opts.stride, device=opts.run_options.device,
                                      progress=opts.progress, tta="flip" if twin else "none"), log)


def _student(opts: AdaptOptions, row: dict, folder: Path, log) -> str:
    """Train (or continue, or keep) the round's student; returns its run folder."""
    done = folder / "metrics.json"
    if done.exists() and (folder / "last.pt").exists():
        last = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
        cfg, _ = config_from_file(folder / "config.json", {}, None)
        if last.get("epoch", -1) + 1 >= cfg.epochs:
            return str(folder.resolve())
    flags = {**TARGET_DEFAULTS, **opts.student}
    cfg, source = config_from_file(Path(row["teacher"]) / "config.json", flags, None)
    # a student stopped before or during its epochs continues (from its last epoch, or from the start
    # with the teacher's weights when none finished)
    run_opts = RunOptions(**{**opts.run_options.__dict__, "target": str(folder.parent / "pseudo"),
                             "resume": (folder / "config.json").exists(), "progress": opts.progress,
                             "config_source": source,
                             "init_from": row["teacher"] if opts.student_init == "teacher" else None})
    train(cfg, opts.cache, str(folder), run_opts, log=log)
    return str(folder.resolve())


def _save(out: Path, state: dict) -> None:
    save_state(out, state, round_table)


def round_table(state: dict) -> list[str]:
    """Per round: portion, coverage, mean teacher confidence, source val mIoU, the guard's verdict."""
    rows = [f"{'round':>5s} {'portion':>7s} {'coverage':>8s} {'confidence':>10s} {'val mIoU':>8s}  guard"]
    if state.get("source"):
        rows.append(f"{0:5d} {'-':>7s} {'-':>8s} {'-':>10s} {state['source']['val_miou']:8.4f}  source model")
    for x in state["rounds"]:
        conf = x.get("mean_confidence")
        rows.append(f"{x['round']:5d} {x['portion']:7.2f} {x.get('coverage', 0):8.1%} "
                    + (f"{conf:10.3f}" if conf is not None else f"{'-':>10s}")
                    + (f" {x['val_miou']:8.4f}" if x.get("val_miou") is not None else f" {'-':>8s}")
                    + ("  passed" if x.get("passed") else f"  STOPPED: {'; '.join(x.get('guard') or ['(unfinished)'])}"))
    if state.get("final"):
        rows.append(f"final: {state['final']['model']} ({state['final']['why']})")
    return rows
