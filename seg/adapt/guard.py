"""The collapse guard of self-training: signs, readable before a student is trained or right after,
that a round teaches its own mistakes. A round that shows one is not taken; the last model that
passed stays the model.

- collapse: a class that holds at least `min_prior` of the source pixels gets less than
  `collapse_fraction` of that share among the pseudo-labels (the teacher stopped predicting it);
- swallow: one class holds more than `swallow_share` of the pseudo-labels and more than
  `swallow_ratio` times its source share (it absorbs its neighbours);
- drift: the student is more confident on the target than its teacher was while its mIoU on the
  labelled source val split fell by more than `val_drop` below its teacher's (confident and wrong:
  the self-training failure mode the round-by-round record exists to catch);
- shift: the student's predictions on the target redistribute the classes: a class that holds at
  least `min_prior` of the teacher's or the student's predicted pixels grows or shrinks by more than
  `shift_factor`. Self-training should sharpen a teacher, not move pixels between classes; on the
  shifted synthetic deserts every student that lost target mIoU had done so (one class growing
  2-3x, another shrinking to a third) while its source val mIoU rose (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class GuardSettings:
    collapse_fraction: float = 0.1
    min_prior: float = 0.01
    swallow_share: float = 0.6
    swallow_ratio: float = 2.0
    val_drop: float = 0.01
    shift_factor: float = 2.0

    def to_dict(self) -> dict:
        return asdict(self)


def label_problems(record: dict, g: GuardSettings) -> list[str]:
    """Collapse and swallow signs in a pseudo-label record (seg.adapt.pseudo_label), one line each."""
    prior, shares, names = record.get("source_prior"), record["shares"], record["classes"]
    if prior is None:
        return []
    problems = []
    for name, p, s in zip(names, prior, shares):
        if p >= g.min_prior and s < g.collapse_fraction * p:
            problems.append(f"collapse: {name} is {s:.1%} of the pseudo-labels against {p:.1%} of the source pixels "
                            f"(below {g.collapse_fraction:g} x)")
    top = max(range(len(shares)), key=shares.__getitem__)
    if shares[top] > g.swallow_share and shares[top] > g.swallow_ratio * prior[top]:
        problems.append(f"swallow: {names[top]} takes {shares[top]:.1%} of the pseudo-labels against "
                        f"{prior[top]:.1%} of the source pixels")
    return problems


def mean_confidence(record: dict) -> Optional[float]:
    """The teacher's pixel-weighted mean confidence over the split."""
    n = record["teacher_pixels"]
    total = sum(c * k for c, k in zip(record["teacher_confidence"], n) if c is not None)
    return total / sum(n) if sum(n) else None


def drift_problem(student_conf: Optional[float], teacher_conf: Optional[float], student_val: float,
                  teacher_val: float, g: GuardSettings, pair: str = "teacher -> student") -> Optional[str]:
    if student_conf is None or teacher_conf is None:
        return None
    if student_conf > teacher_conf and student_val < teacher_val - g.val_drop:
        return (f"drift: confidence on the target rose {teacher_conf:.3f} -> {student_conf:.3f} ({pair}) "
                f"while source val mIoU fell {teacher_val:.4f} -> {student_val:.4f}")
    return None


def shift_problem(teacher_shares: list[float], student_shares: list[float], names: list[str],
                  g: GuardSettings, teacher: str = "its teacher") -> Optional[str]:
    """The class whose predicted share on the target changed most, teacher -> student, when it
    changed by more than shift_factor either way (`teacher` names the model compared with)."""
    worst, name = 1.0, None
    for n, t, s in zip(names, teacher_shares, student_shares):
        if max(t, s) < g.min_prior:
            continue
        ratio = max(t, s) / max(min(t, s), 1e-9)
        if ratio > worst:
            worst, name, pair = ratio, n, (t, s)
    if name is not None and worst > g.shift_factor:
        return (f"shift: the student predicts {name} on {pair[1]:.1%} of the target pixels, {teacher} on "
                f"{pair[0]:.1%} ({worst:.1f}x, over {g.shift_factor:g}x)")
    return None


def verdict(problems: list[str]) -> str:
    """The first problem in one line, with how many more there are."""
    return problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
