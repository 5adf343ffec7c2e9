"""A run's state on disk: last.pt (everything needed to continue exactly), best.pt and its metrics,
resuming from them, and repairing a best.pt whose write failed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch

from seg.runtime.checkpoint import load_torch_file, save_checkpoint
from seg.runtime.device import training_amp_dtype
from seg.runtime.errors import SegError
from seg.train.presets import with_legacy_fields
from seg.train.reports import write_metrics


class RunState:
    """Where the run stands: the epoch saved last, the best epoch, its weights and metrics."""

    def __init__(self, out: Path, names: list[str], log: Callable[[str], None]) -> None:
        self.out, self.names, self.log = out, names, log
        self.record: dict = {}                     # what every checkpoint holds besides weights (set once built)
        self.history: list[dict] = []
        self.best = {"miou": -1.0, "epoch": None}
        self.best_head: Optional[dict] = None
        self.best_metrics: Optional[dict] = None
        self.saved_epoch: Optional[int] = None     # 1-based epoch of last.pt, once written
        self.start_epoch = 0

    def last_good(self) -> str:
        """Words naming the last checkpoint that is truly good (only finite ones are ever written)."""
        last = self.out / "last.pt"
        if last.exists():
            return f"The last good checkpoint is {last} (epoch {self.saved_epoch}); --resume continues from it."
        return "No checkpoint was written: no epoch finished with finite results."

    def load_for_resume(self, config: dict, fingerprint: str) -> Optional[dict]:
        """last.pt of the run (after --resume), checked against this run's settings and cache."""
        out = self.out
        last_path = out / "last.pt"
        if not last_path.exists():
            if (out / "best.pt").exists():
                raise SegError(f"{out}: has best.pt but no last.pt, so it cannot be continued exactly; "
                               "pass --overwrite to start it again")
            self.log(f"{out}: no epoch finished before; --resume starts at epoch 1")
            return None
        state = load_torch_file(last_path, what="unreadable checkpoint; cannot resume")
        if not isinstance(state, dict) or "config" not in state or "head" not in state:
            raise SegError(f"{last_path}: not a seg training checkpoint; cannot resume")
        saved = with_legacy_fields(state["config"])
        if saved != config:
            diffs = [k for k in config if saved.get(k) != config[k]]
            raise SegError(f"{out}: --resume with other settings than the run's (differs in {', '.join(diffs)})")
        if state["cache_fingerprint"] != fingerprint:
            raise SegError(f"{out}: --resume with another cache than the run was trained on")
        return state

    def restore(self, state: dict, head, opt, sched, scaler, is_main: bool) -> None:
        """Weights, optimizer, schedule, scaler, RNG and the run's record as last.pt holds them."""
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        self.start_epoch, self.history, self.best = state["epoch"] + 1, state["history"], state["best"]
        self.best_head, self.best_metrics = state["best_head"], state["best_metrics"]
        self.saved_epoch = state["epoch"] + 1
        if is_main:
            self.repair_best()

    def record_epoch(self, row: dict, miou: float, select: str, head, summary: dict, cm: torch.Tensor) -> bool:
        """Add the epoch to the history; True when it is the new best (always, with select=final)."""
        self.history.append(row)
        if not (miou > self.best["miou"] or select == "final"):
            return False
        self.best = {"miou": miou, "epoch": row["epoch"]}
        self.best_head = {k: v.detach().clone() for k, v in head.state_dict().items()}
        self.best_metrics = {"summary": summary, "confusion_matrix": cm.cpu().tolist()}
        return True

    def save(self, epoch: int, head, opt, sched, scaler, improved: bool, extra: Optional[dict] = None) -> None:
        # last.pt first: it holds everything (the best weights and metrics too), so a failed write of
        # anything after it is repaired by --resume.
        save_checkpoint(self.out / "last.pt", {
            **self.record, "head": head.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(), "epoch": epoch, "history": self.history, "best": self.best,
            "best_head": self.best_head, "best_metrics": self.best_metrics, **(extra or {})})
        self.saved_epoch = epoch + 1
        if improved:
            self.write_best()

    def write_best(self) -> None:
        save_checkpoint(self.out / "best.pt", {**self.record, "head": self.best_head, "epoch": self.best["epoch"],
                                               "val_miou": self.best["miou"]})
        write_metrics(self.out, self.best_metrics["summary"], self.best_metrics["confusion_matrix"],
                      self.best["epoch"], self.names)

    def repair_best(self) -> None:
        """After a failed write, best.pt/metrics may lag last.pt; rewrite them from last.pt's copy."""
        if self.best_head is None:
            return
        path = self.out / "best.pt"
        current = load_torch_file(path, what="unreadable checkpoint") if path.exists() else None
        if not isinstance(current, dict) or current.get("epoch") != self.best["epoch"] \
                or not (self.out / "metrics.json").exists():
            self.log(f"rewriting best.pt and metrics of epoch {self.best['epoch']} from last.pt")
            self.write_best()

    def patience_exhausted(self, patience: Optional[int], select: str, epoch: int) -> bool:
        return patience is not None and select == "best" and self.best["epoch"] is not None \
            and epoch - self.best["epoch"] >= patience


def resume_amp_dtype(recorded: Optional[str], current: Optional[str], choice: str, device: torch.device,
                     out: Path) -> Optional[torch.dtype]:
    """The autocast dtype a resumed run continues in: the one it recorded (a bf16 run resumed where
    `auto` would now choose fp16 keeps bf16), or a one-line refusal where that dtype cannot run here."""
    names = {"bfloat16": "bf16", "float16": "fp16"}
    if recorded == current:
        return getattr(torch, recorded) if recorded else None
    if choice != "auto" or recorded not in names:
        raise SegError(f"{out}: the run trained under {recorded or 'no'} autocast and --amp-dtype asks for "
                       f"{current}; a resume keeps the precision: drop --amp-dtype or start a new run")
    try:
        return training_amp_dtype(names[recorded], device)
    except SegError as exc:
        raise SegError(f"{out}: the run trained under {recorded} autocast, which this device cannot continue "
                       f"({exc}); resume it on a device that can, or start a new run") from None


def refuse_non_finite(epoch: int, train_loss: float, val_loss: float, head, last_good: Callable[[], str]) -> None:
    """Never checkpoint weights or results that are not finite numbers."""
    bad = []
    if not math.isfinite(train_loss):
        bad.append(f"train loss {train_loss}")
    if not math.isfinite(val_loss):
        bad.append(f"val loss {val_loss}")
    if not all(torch.isfinite(p).all() for p in head.parameters()):
        bad.append("non-finite weights")
    if bad:
        raise SegError(f"epoch {epoch + 1} ended with {' and '.join(bad)}; stopped without saving it. "
                       f"{last_good()} (lower --lr, or check the cache with `seg cache verify`)")
