"""Stage two: train a segmentation head from cached tokens; the backbone is never run.

`Trainer` puts the pieces of `seg.train` together: it checks the cache, builds the head, loss and
optimizer (`model`), runs epochs and validation (`epochs`), keeps checkpoints and resumes
(`run_state`), and writes the reports (`reports`)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from seg.cache import FeatureCache
from seg.cache import format as cf
from seg.runtime.device import deterministic_mode, environment, resolve_device, training_amp_dtype
from seg.runtime.distributed import Dist, on_main, rank_device
from seg.runtime.errors import SegError
from seg.runtime.run_dir import RUN_FORMAT, check_run_dir, clear_run_dir, run_output
from seg.runtime.atomic import write_json
from seg.scoring import plots
from seg.scoring.metrics import jsonable, summarize
from seg.train.cache_checks import (backbone_record, cache_fingerprint, check_cache_matches, check_head_fits,
                                    check_integrity, check_splits, check_tuning)
from seg.train.ema_teacher import EmaTeacher, OnlineSettings
from seg.train.epochs import EpochRunner
from seg.train.model import build_criterion, build_head_for, build_optimizer, wrap_distributed
from seg.train.presets import TrainConfig
from seg.train.rank_batching import rank_batching
from seg.train.reports import describe_config, write_history
from seg.train.run_state import RunState, refuse_non_finite, resume_amp_dtype
from seg.train.step_hooks import step_hook, steps_per_epoch
from seg.train.init_from import starting_point
from seg.train.run_setup import (choose_sources, describe_input, measure_step, rare_class_sampler, target_setup,
                                 tensorboard_log)


@dataclass
class RunOptions:
    device: str = "auto"
    preload: str = "auto"           # auto | always | never
    workers: Optional[int] = None   # streaming readers
    resume: bool = False
    allow_mismatch: bool = False    # accepted for old scripts; a mismatch is a note unless strict_preset
    progress: bool = True
    overwrite: bool = False         # replace a finished seg run in --out
    strict_preset: bool = False     # refuse a cache whose backbone/size/layers differ from the phase's
    verify: bool = True             # sha256 of every shard against the manifest before use
    weights: Optional[str] = None   # backbone checkpoint for --tune-blocks (else the recorded file or hub cache)
    checkpointing: bool = False     # --tune-blocks: recompute block activations in backward (less memory)
    amp_dtype: str = "auto"         # auto (fp16 + GradScaler on a GPU, bf16 on a CPU) | bf16 | fp16
    scale_batch: bool = False       # torchrun: every rank takes the whole batch (global = batch x accum x world)
    tensorboard: bool = False       # log scalars, confusion matrix and overlays under RUN/tensorboard
    init_from: Optional[str] = None  # a finished run whose best.pt weights the head starts from
    init_from_pmt: Optional[str] = None  # a published PMT checkpoint whose decoder a pmt head starts from
    target: Optional[str] = None    # pseudo-labels (`seg pseudo-label`) of a split of the cache, mixed into batches
    config_source: Optional[dict] = None  # where the settings came from (--config FILE): recorded
    on_epoch: Optional[Callable[[int, dict], None]] = None  # called after each saved epoch (sweeps prune here)
    # called after each epoch's validation, before it is kept: a reason (str) stops the run without
    # saving that epoch (seg adapt's guard); gets (epoch, its history row, the trainer)
    accept_epoch: Optional[Callable[[int, dict, "Trainer"], Optional[str]]] = None
    online: Optional[OnlineSettings] = None  # an EMA teacher labels this unlabeled split on line (seg adapt)
    deterministic: bool = False     # bit-repeatable steps on one GPU (torch's deterministic mode; slower)


class Trainer:
    def __init__(self, cfg: TrainConfig, cache_dir: str, out_dir: str, opts: RunOptions,
                 log: Callable[[str], None] = print, dist_ctx: Optional[Dist] = None) -> None:
        self.d = dist_ctx or Dist()
        self.cfg, self.opts = cfg, opts
        self.log = log if self.d.is_main else (lambda s: None)
        self.out = Path(out_dir)
        self.cache = FeatureCache(cache_dir)
        m, where = self.cache.manifest, Path(cache_dir)
        check_splits(m, where)
        check_cache_matches(cfg, m, where, opts.strict_preset and not opts.allow_mismatch, self.log)
        check_tuning(cfg, m, where)
        self.tap = cf.tap_block(m)
        self.levels = cfg.head == "pmt"  # a mask decoder reads whole token sequences, prefix tokens included
        describe_input(self.cache.manifest, self.tap, self.log)
        check_head_fits(cfg, m, where)
        self.device = resolve_device(rank_device(self.d, opts.device))
        self.names = list(self.cache.class_table.names)
        self.train_split, self.val_split = self.cache.split("train"), self.cache.split("val")
        check_integrity(self.cache, self.d, self.opts.verify, self.log)
        self.amp_dtype = training_amp_dtype(opts.amp_dtype, self.device) if cfg.amp else None
        if self.amp_dtype is not None:
            self.log(f"autocast: {self.amp_name}" + (" with a GradScaler (as the published phase-2/3 scripts on a GPU)"
                                                    if self.amp_dtype == torch.float16 else "")
                     + ("" if opts.amp_dtype != "auto" else "; --amp-dtype bf16|fp16 chooses"))
        self.environment = environment(self.device)
        if opts.deterministic:
            self.log("deterministic: torch's deterministic algorithms, cuDNN's without autotuning, matrix upsampling "
                     "and pooling in the head (slower; steps repeat bit for bit on one GPU)")
        self.train_counts = self.cache.class_counts("train", persist=self.d.is_main)  # [samples, classes]
        self.sampler = rare_class_sampler(cfg, self.cache.manifest, self.train_counts, self.names, self.log)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = RunState(self.out, self.names, self.log)
        self.rank_batch, self.rank_accum = rank_batching(cfg.batch_size, cfg.accum, self.d.world, opts.scale_batch)
        self.target, self.target_batch, self.target_record = target_setup(cfg, opts.target, self.cache,
                                                                          self.rank_batch, self.log, opts.online)

    @property
    def amp_name(self) -> Optional[str]:
        """'bfloat16' or 'float16' (the autocast dtype), None without AMP."""
        return str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else None

    def _build(self) -> None:
        cfg = self.cfg
        head = build_head_for(cfg, self.cache, len(self.names), self.opts.weights, self.opts.checkpointing)
        self.head, self.model = wrap_distributed(head.to(self.device), self.device, self.d)
        self.criterion, self.class_weights = build_criterion(cfg, self.train_counts, self.device)
        samples = len(self.train_split) if cfg.all_seeds else len(self.train_split.images)
        per_epoch = steps_per_epoch(samples, self.rank_batch - self.target_batch, self.d.world, self.rank_accum)
        self.opt, self.sched = build_optimizer(cfg, self.head, cfg.epochs * per_epoch)
        self.grid = grid = (self.cache.manifest["patch_grid"]["height"], self.cache.manifest["patch_grid"]["width"])
        self.epochs = EpochRunner(cfg, self.model, self.head, self.criterion, self.opt, self.sched, self.scaler,
                                  self.device, self.amp_dtype, grid if self.tap is not None else None, self.train_split,
                                  self.val_split, len(self.names), self.d, self.sampler, self.opts.progress,
                                  self.state.last_good, self.rank_batch, self.rank_accum,
                                  step_hook(cfg, self.head, self.sched, per_epoch), self.target, self.target_batch)

    def _sources(self):
        """The train, val and target sources: preloaded on the device when they fit, else streamed (run_setup)."""
        return choose_sources(self.opts, self.head, self.opt, self.train_split, self.val_split, self.device,
                              lambda: measure_step(self.train_split, self.head, self.epochs, self.rank_batch,
                                                   self.device, self.levels), self.log, self.levels, self.target)

    def _run_record(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "class_table": self.cache.class_table.to_json(),
            "cache": str(self.cache.path.resolve()),
            "cache_fingerprint": cache_fingerprint(self.cache.manifest),
            "backbone": backbone_record(self.cache.manifest),
            "in_channels": self.cache.in_channels,
            "class_weights": self.class_weights,
            # the autocast dtype this run trains in: a resume elsewhere must keep it (fp16 needs a GradScaler)
            "amp_dtype": self.amp_name,
            "deterministic": self.opts.deterministic,
            "environment": self.environment,
            **({"target": self.target_record} if self.target_record else {}),
        }

    def run(self) -> dict:
        out = self.out
        lock = run_output(out)

        def claim() -> str:
            mode = check_run_dir(out, self.cache.path, self.opts.resume, self.opts.overwrite)
            lock.claim()
            if mode == "replace":
                clear_run_dir(out, self.log)
            return mode

        try:
            mode = on_main(self.d, claim)
            with deterministic_mode(self.opts.deterministic):
                return self._run(mode == "resume")
        finally:
            lock.release(failed=sys.exc_info()[0] is not None)

    def _start(self, resume: bool) -> None:
        """Build everything, restore last.pt on --resume, write config.json and say what runs."""
        cfg, st = self.cfg, self.state
        saved = st.load_for_resume(cfg.to_dict(), cache_fingerprint(self.cache.manifest)) if resume else None
        if saved is not None:
            dtype = resume_amp_dtype(saved.get("amp_dtype", self.amp_name), self.amp_name, self.opts.amp_dtype,
                                     self.device, self.out)  # older runs recorded none: kept as chosen
            if dtype != self.amp_dtype:
                self.amp_dtype = dtype
                self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
                self.log(f"autocast: {self.amp_name}, as the run recorded")
        self._build()
        st.record = self._run_record()
        origin = starting_point(self.head, self.opts.init_from, self.opts.init_from_pmt, self.opts.config_source,
                                saved, st.record, self.log)
        st.record.update({k: v for k, v in origin.items() if v})
        if saved is not None:
            st.restore(saved, self.head, self.opt, self.sched, self.scaler, self.d.is_main)
            self.log(f"resuming {self.out} at epoch {st.start_epoch + 1}/{cfg.epochs}")
        if self.opts.online is not None:  # the teacher starts as the student, or as last.pt left it
            self.epochs.teacher = EmaTeacher(self.opts.online, self.head, len(self.names), self.grid)
            if saved is not None:
                if "ema_teacher" not in saved:
                    raise SegError(f"{self.out}: last.pt holds no EMA teacher (not an on-line student's run); "
                                   "cannot resume")
                self.epochs.teacher.load_state_dict(saved["ema_teacher"])
        eff = self.rank_batch * self.rank_accum * self.d.world
        if cfg.warmup_note():
            self.log(cfg.warmup_note())
        self.log("training config (phase preset + overrides):\n" + describe_config(
            cfg, {"effective_batch": f"{eff} per step = per-rank batch {self.rank_batch} x world {self.d.world} x "
                  f"accum {self.rank_accum}" + (" (--scale-batch)" if self.opts.scale_batch else
                                                f" (the preset's {cfg.batch_size} x accum {cfg.accum})")
                  if self.d.active else eff, "device": self.device.type,
                  "amp_dtype": self.amp_name or "off",
                  "in_channels": self.cache.in_channels, "train_samples/epoch":
                  len(self.train_split) if cfg.all_seeds else len(self.train_split.images)}))
        if self.d.is_main:
            write_json(self.out / "config.json", jsonable({"format": RUN_FORMAT, **st.record, "effective_batch": eff,
                                                           "world_size": self.d.world}))

    def _run(self, resume: bool) -> dict:
        self._start(resume)
        sources = self._sources()
        try:
            stopped_early = self._epochs(*sources)
        finally:  # reader processes and preloaded device memory go now, not when collected
            for s in filter(None, sources):
                s.close()
        cfg, out, main, st = self.cfg, self.out, self.d.is_main, self.state
        if stopped_early:
            self.log(f"early stop: no val mIoU gain for {cfg.patience} epochs "
                     f"(best {st.best['miou']:.4f} at epoch {st.best['epoch']})")
        if st.history and main:
            plots.curves(st.history, out / "curves.png")
        metrics_path = out / "metrics.json"
        return json.loads(metrics_path.read_text()) if main and metrics_path.exists() else {}

    def _epochs(self, train_src, val_src, target_src) -> bool:
        """Trains the remaining epochs; True when early stopping ended them."""
        cfg, out, main, st = self.cfg, self.out, self.d.is_main, self.state
        stopped_early, spent = False, []
        tb = tensorboard_log(self.out, self.cache, self.val_split, self.head, self.amp_dtype, self.epochs.grid,
                             self.device, self.log, self.levels) if main and self.opts.tensorboard else None
        for epoch in range(st.start_epoch, cfg.epochs):
            if st.patience_exhausted(cfg.patience, cfg.select, epoch):
                stopped_early = True
                break
            t0 = time.perf_counter()
            lr = self.opt.param_groups[0]["lr"]
            train_loss, sps = self.epochs.train_epoch(train_src, epoch, target_src)
            val_loss, cm = self.epochs.validate(val_src)
            refuse_non_finite(epoch, train_loss, val_loss, self.head, self.state.last_good)
            if not cfg.per_step:  # a per-step schedule moved with every optimizer step (step_hooks)
                self.sched.step()
            summary = summarize(cm, self.names)
            drawn = (self.train_counts[self.epochs.epoch_draw(epoch)] > 0).sum(0)  # drawn samples holding each class
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_miou": summary["miou"],
                   "lr": lr, "seconds": time.perf_counter() - t0, "samples_per_s": sps,
                   **{f"iou_{n}": v for n, v in zip(self.names, summary["iou"])},
                   **{f"drawn_{n}": int(c) for n, c in zip(self.names, drawn)}}
            if self.opts.accept_epoch is not None and (why := self.opts.accept_epoch(epoch, row, self)):
                self.log(f"epoch {epoch + 1} not kept: {why}")
                break
            improved = st.record_epoch(row, summary["miou"], cfg.select, self.head, summary, cm)
            if main:
                st.save(epoch, self.head, self.opt, self.sched, self.scaler, improved,
                        {"ema_teacher": self.epochs.teacher.state_dict()} if self.epochs.teacher else None)
                write_history(out, st.history)
                if tb is not None:
                    tb.epoch(epoch, row, cm)
            spent.append(row["seconds"])
            left = (cfg.epochs - epoch - 1) * sum(spent) / len(spent)  # at most: early stopping ends sooner
            self.log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                     f"val mIoU {summary['miou']:.4f}{' *' if improved else ''}  lr {lr:.3g}  "
                     f"{sps:.1f} samples/s  {row['seconds']:.1f} s  run ETA {_duration(left)}")
            if main and self.opts.on_epoch is not None:
                self.opts.on_epoch(epoch, row)  # after the checkpoint: a sweep that prunes here keeps it
        if tb is not None:
            tb.close()
        return stopped_early


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg: TrainConfig, cache_dir: str, out_dir: str, opts: Optional[RunOptions] = None,
          log: Callable[[str], None] = print, dist_ctx: Optional[Dist] = None) -> dict:
    return Trainer(cfg, cache_dir, out_dir, opts or RunOptions(), log, dist_ctx).run()
