"""Adaptation commands: `seg pseudo-label` (a teacher's class-balanced labels for an unlabeled split)
and `seg adapt` (rounds of pseudo-labels and students, guarded)."""

from __future__ import annotations

import click

from seg.cli.common import COUNT, NO_PROGRESS, example, user_errors
from seg.cli.group import main


@main.command("pseudo-label", epilog=example(
    "seg pseudo-label --run runs/p3 --cache cache/b14 --split target --out pseudo/r1",
    "seg train-head --cache cache/b14 --out runs/student --target pseudo/r1"))
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="The teacher run (best.pt).")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False),
              help="The cache holding the split (features of the teacher's backbone and size).")
@click.option("--split", required=True, help="The split to label (an --unlabeled one; a labelled one is scored too).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for pseudo.json and masks.npy (never inside the cache).")
@click.option("--portion", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="CBST's portion: per class, the share of the pixels predicted as it that keep their label.")
@click.option("--stride", default=4, show_default=True, type=COUNT,
              help="Thresholds from every N-th pixel in each direction (CRST's ds_rate).")
@click.option("--tta", type=click.Choice(["auto", "none", "flip"]), default="auto", show_default=True,
              help="The teacher's flip TTA: its softmax averaged with the mirrored views' (cached by extract "
                   "--flip-views as split NAME-flip); auto: when they are cached.")
@click.option("--batch-size", default=8, show_default=True, type=COUNT)
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda[:N].")
@NO_PROGRESS
@user_errors
def pseudo_label(run_dir, cache_dir, split, out, portion, stride, tta, batch_size, device, no_progress) -> None:
    """Label an unlabeled split of a cache with a trained run: class-balanced thresholds (CBST) keep the
    confident share of each class, the rest is ignored. The cache is never written."""
    from seg.adapt.pseudo_label import PseudoOptions, pseudo_label as run

    run(PseudoOptions(run=run_dir, cache=cache_dir, split=split, out=out, portion=portion, stride=stride, tta=tta,
                      batch_size=batch_size, device=device, progress=not no_progress), log=click.echo)


@main.command("adapt", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              epilog=example("seg adapt --run runs/p3 --cache cache/b14 --target target --out adapt/desert",
                             "seg adapt --run runs/p3 --cache cache/b14 --target target --out adapt/d2 --rounds 2 --epochs 10",
                             "seg adapt --run runs/p3 --cache cache/b14 --target target --out adapt/ema --mode online"))
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The source model: a run trained on the cache's labelled splits.")
@click.option("--cache", "cache_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The cache with the labelled train/val splits and the unlabeled target split.")
@click.option("--target", required=True, help="The unlabeled split (`seg extract --unlabeled NAME=FOLDER`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the rounds (round-N/pseudo, round-N/student) or the on-line student (student/), "
                   "adapt.json and adapt.txt.")
@click.option("--mode", type=click.Choice(["rounds", "online"]), default="rounds", show_default=True,
              help="rounds: CBST pseudo-label rounds; online: DAFormer's EMA teacher labelling every target batch.")
@click.option("--rounds", default=3, show_default=True, type=COUNT, help="rounds mode: how many.")
@click.option("--portion", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="rounds mode: CBST's portion in round 1.")
@click.option("--portion-step", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="rounds mode: added to the portion each round.")
@click.option("--tta", type=click.Choice(["auto", "none", "flip"]), default="auto", show_default=True,
              help="rounds mode: the teachers' flip TTA over the cached mirrored views (extract --flip-views).")
@click.option("--momentum", default=0.999, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="online mode: the EMA teacher's momentum (DAFormer's alpha).")
@click.option("--threshold", default=0.968, show_default=True, type=click.FloatRange(0, 1),
              help="online mode: the teacher confidence whose pixel share weighs the pseudo-labels.")
@click.option("--mix", type=click.Choice(["classmix", "none"]), default="classmix", show_default=True,
              help="online mode: ClassMix of source and target on the token grid, or the target tokens alone.")
@click.option("--student-init", type=click.Choice(["teacher", "scratch"]), default="teacher", show_default=True,
              help="Students start from their teacher's weights, or from a fresh head.")
@click.option("--collapse-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Guard: stop when a class (>= 1% of source pixels) falls below this fraction of its source share.")
@click.option("--val-drop", default=0.01, show_default=True, type=click.FloatRange(0),
              help="Guard: stop when teacher confidence rises while source val mIoU falls by more than this.")
@click.option("--shift-factor", default=2.0, show_default=True, type=click.FloatRange(1, min_open=True),
              help="Guard: stop when a student's predicted share of a class on the target moves by more than this "
                   "factor from its teacher's.")
@NO_PROGRESS
@click.pass_context
@user_errors(on_interrupt="interrupted; rerun the same command to continue (finished steps are kept)")
def adapt(ctx, run_dir, cache_dir, target, out, mode, rounds, portion, portion_step, tta, momentum, threshold, mix,
          student_init, collapse_fraction, val_drop, shift_factor, no_progress) -> None:
    """Self-train on an unlabeled split, guarded. Rounds: the teacher labels it (CBST), a student trains
    on source + target, round after round. Online: one student trains on source and ClassMix-ed target
    batches that its EMA teacher labels (DAFormer), judged after every epoch. The guard stops a round
    or epoch that collapses a class, moves pixels between classes or trades source accuracy for
    confidence, and the last model that passed is kept. Any other train-head flag (--epochs 10, --target-ratio 0.3, --device cuda, ...) applies
    to the students, over their teacher's settings."""
    from seg.adapt.guard import GuardSettings
    from seg.adapt.rounds import AdaptOptions, adapt as run
    from seg.cli.experiments import train_head_flags
    from seg.train_head import RunOptions

    settings, run_flags = train_head_flags(list(ctx.args), 3)
    run(AdaptOptions(run=run_dir, cache=cache_dir, target=target, out=out, mode=mode, rounds=rounds, portion=portion,
                     portion_step=portion_step, tta=tta, momentum=momentum, threshold=threshold, mix=mix,
                     student_init=student_init,
                     guard=GuardSettings(collapse_fraction=collapse_fraction, val_drop=val_drop,
                                         shift_factor=shift_factor),
                     student=settings, run_options=RunOptions(**run_flags), progress=not no_progress),
        log=click.echo)
