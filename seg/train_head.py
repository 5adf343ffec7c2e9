"""Stage two: train a segmentation head from cached tokens; the backbone is never run."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from seg import plots
from seg.atomic import write_json, write_text
from seg.cache import FeatureCache, augmented_views
from seg import cache_format as cf
from seg.backbones.tail import BackboneTail
from seg.cache_format import settings_of
from seg.checkpoint import load_torch_file, save_checkpoint
from seg.dirlock import DirLock
from seg.device import half_dtype, resolve_device
from seg.distributed import Dist, all_reduce_sum, on_main, rank_device
from seg.errors import SegError
from seg.heads import TunedHead, build_head, head_logits
from seg.losses import SegLoss, inverse_frequency_weights
from seg.metrics import confusion_matrix, format_table, jsonable, summarize
from seg.presets import PRESETS, TrainConfig
from seg.rare_class_sampling import RareClassSampler, default_min_pixels
from seg.run_dir import LOCK as RUN_LOCK, RUN_FORMAT, check_run_dir, clear_run_dir
from seg.runs import rebuild_backbone
from seg.train_data import PreloadedSplit, StreamedSplit, batches_of, choose_preload, epoch_indices

VAL_BATCH = 8


@dataclass
class RunOptions:
    device: str = "auto"
    preload: str = "auto"           # auto | always | never
    workers: Optional[int] = None   # streaming readers
    resume: bool = False
    allow_mismatch: bool = False
    progress: bool = True
    overwrite: bool = False         # replace a finished seg run in --out
    verify: bool = True             # sha256 of every shard against the manifest before use
    weights: Optional[str] = None   # backbone checkpoint for --tune-blocks (else the recorded file or hub cache)
    checkpointing: bool = False     # --tune-blocks: recompute block activations in backward (less memory)


def cache_fingerprint(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(settings_of(manifest), sort_keys=True).encode()).hexdigest()


def backbone_record(manifest: dict) -> dict:
    """What evaluation on images needs to rebuild exactly the features the head was trained on."""
    keys = ("backbone", "weights_sha256", "weights_source", "random_init_seed", "weights_fingerprint",
            "size", "patch_size", "layers", "layer_norm", "normalize", "resize", "token_shape", "mask_shape",
            "compute_dtype")
    return {**{k: manifest[k] for k in keys}, "tap_block": cf.tap_block(manifest)}


def recommended_layers(depth: int) -> str:
    """Four blocks spread over the depth, ending with the last (ViT-B: 2,5,8,11; ViT-L: 5,11,17,23)."""
    return ",".join(str(depth // 4 * (i + 1) - 1) for i in range(4))


def check_cache_matches(cfg: TrainConfig, manifest: dict, cache: Path, allow_mismatch: bool, log) -> None:
    size = f"{manifest['size']['width']}x{manifest['size']['height']}"
    last_block = [manifest["depth"] - 1]
    mismatches = []
    if (manifest["backbone"], size) != (cfg.backbone, cfg.size):
        mismatches.append(f"cache is {manifest['backbone']} @ {size}, but phase {cfg.phase} is {cfg.backbone} @ {cfg.size}")
    if cf.tap_block(manifest) is None and manifest["layers"] != last_block and cfg.phase in PRESETS \
            and cfg.head == PRESETS[cfg.phase].head:
        mismatches.append(f"cache stores blocks {manifest['layers']}, but phase {cfg.phase} was published on the "
                          f"normed last block {last_block} only")
    if mismatches and not allow_mismatch:
        raise SegError(f"{cache}: {'; '.join(mismatches)}; extract a matching cache or pass --allow-mismatch")
    for msg in mismatches:
        log(f"WARNING: {msg} (allowed by --allow-mismatch)")
    if manifest["augmentation"]["policy"] != cfg.aug_policy:
        log(f"note: cache augmentation is {manifest['augmentation']['policy']!r}; "
            f"phase {cfg.phase} was published with {cfg.aug_policy!r}")


def describe_config(cfg: TrainConfig, extra: dict) -> str:
    items = {**cfg.to_dict(), **extra}
    width = max(len(k) for k in items)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in items.items())


class Trainer:
    def __init__(self, cfg: TrainConfig, cache_dir: str, out_dir: str, opts: RunOptions,
                 log: Callable[[str], None] = print, dist_ctx: Optional[Dist] = None) -> None:
        self.d = dist_ctx or Dist()
        self.cfg, self.opts = cfg, opts
        self.log = log if self.d.is_main else (lambda s: None)
        self.out = Path(out_dir)
        self.cache = FeatureCache(cache_dir)
        m = self.cache.manifest
        for split in ("train", "val"):
            if split not in m["splits"]:
                raise SegError(f"{cache_dir}: training needs a {split!r} split in the cache (it has "
                               f"{', '.join(m['splits'])}); extract with --splits train,val")
        check_cache_matches(cfg, m, Path(cache_dir), opts.allow_mismatch, self.log)
        self.tap = cf.tap_block(m)
        self._check_tuning(Path(cache_dir))
        L, C = cf.head_input(m)
        hp, wp = m["patch_grid"]["height"], m["patch_grid"]["width"]
        self.grid = (hp, wp) if self.tap is not None else None
        if self.tap is None:
            self.log(f"head input: {L * C} channels = {L} layer(s) x {C} from blocks {m['layers']}, grid {wp}x{hp}")
        else:
            self.log(f"tuning blocks {self.tap}..{m['depth'] - 1} and the final norm of {m['backbone']} from the "
                     f"cached stream entering block {self.tap}; head input: {C} channels, grid {wp}x{hp}")
        views = augmented_views(m)
        self.log(f"cache augmentation: {views} augmented view(s) per train image ({m['augmentation']['policy']}); "
                 + ("each epoch draws one of them per image" if views else "every epoch sees the plain resize"))
        if cfg.head in ("convnext", "linear") and hp * wp == 1:
            raise SegError(f"{cache_dir}: the patch grid is 1x1; the {cfg.head} head's BatchNorm needs more than one "
                           "value per channel: extract a larger --size or use --head upernet")
        if cfg.head == "upernet-ms" and self.tap is not None:
            raise SegError(f"{cache_dir}: the upernet-ms head needs 4 layers; a tuned run's head sees the last block only")
        if cfg.head == "upernet-ms" and L < 4:
            raise SegError(f"{cache_dir}: the upernet-ms head needs at least 4 stored layers, the cache has {L} "
                           f"(blocks {m['layers']}); extract with e.g. --layers {recommended_layers(m['depth'])}")
        self.device = resolve_device(rank_device(self.d, opts.device))
        self.table = self.cache.class_table
        self.names = list(self.table.names)
        self.k = self.table.num_classes
        self.train_split, self.val_split = self.cache.split("train"), self.cache.split("val")
        if opts.verify:
            t0 = time.perf_counter()
            n, size = self.cache.check_shards(["train", "val"])
            self.log(f"integrity: {n} shards ({size / 1e9:.2f} GB) match the manifest's sha256 "
                     f"({time.perf_counter() - t0:.1f} s; --no-verify skips this)")
        else:
            self.log("integrity: shard checksums NOT checked (--no-verify)")
        self.amp_dtype = half_dtype(self.device) if cfg.amp else None
        self.train_counts = self.cache.class_counts("train")  # [samples, classes]
        self.sampler = None
        if cfg.sampling == "rare-class":
            min_pixels = cfg.rcs_min_pixels or default_min_pixels(tuple(m["mask_shape"]))
            self.sampler = RareClassSampler(self.train_counts, cfg.rcs_temperature, min_pixels)
            self.log("rare-class sampling (T {:g}, >= {} px): P(class) = ".format(cfg.rcs_temperature, min_pixels)
                     + ", ".join(f"{n} {p:.3f}" for n, p in zip(self.names, self.sampler.probs)))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _check_tuning(self, cache_dir: Path) -> None:
        """--tune-blocks k needs a tap cache at block N - k; a tap cache needs --tune-blocks."""
        k, m = self.cfg.tune_blocks, self.cache.manifest
        depth = m["depth"]
        if self.tap is None and k:
            if k > depth:
                raise SegError(f"--tune-blocks {k}: {m['backbone']} has {depth} blocks")
            raise SegError(f"{cache_dir}: --tune-blocks {k} needs a tap cache of the stream entering block "
                           f"{depth - k}: extract with `seg extract --tap-block {depth - k}`")
        if self.tap is not None and k != depth - self.tap:
            raise SegError(f"{cache_dir}: holds the stream entering block {self.tap} of {depth}, so it trains "
                           f"blocks {self.tap}..{depth - 1}: pass --tune-blocks {depth - self.tap}"
                           + (f" (not {k})" if k else ""))

    # -- setup -----------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # same seed on every rank: identical initial weights
        head = build_head(cfg.head, self.cache.in_channels, self.k, layers=self.cache.head_layers)
        if self.tap is not None:
            # Exactly the weights the cache recorded (sha256 and tensor fingerprint checked).
            backbone = rebuild_backbone(backbone_record(self.cache.manifest), self.opts.weights, torch.device("cpu"))
            tail = BackboneTail(backbone, self.tap)
            tail.requires_grad_(True)
            tail.checkpointing = self.opts.checkpointing
            head = TunedHead(tail, head)
        self.head = head.to(self.device)
        self.model = self.head
        if self.d.active:
            if self.device.type == "cuda":  # per-rank BatchNorm statistics would differ from one process
                self.head = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.head)
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.head, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        weights = None
        if cfg.loss != "ce":
            counts = torch.from_numpy(self.train_counts.sum(0))
            weights = inverse_frequency_weights(counts, cfg.max_class_weight)
            self.class_weights = weights.tolist()
        else:
            self.class_weights = None
        self.criterion = SegLoss(cfg.loss, weights, cfg.focal_gamma, cfg.dice_weight).to(self.device)
        params = self._param_groups()
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cfg.lr_factor)

    def _param_groups(self) -> list[dict]:
        """The head at lr; tuned block i of k at backbone_lr x layer_decay^(k - 1 - i), the final norm
        at backbone_lr. The schedule scales every group by the same factor."""
        cfg = self.cfg
        if self.tap is None:
            return [{"params": list(self.head.parameters()), "lr": cfg.lr}]
        tail = self.head.tail
        k = len(tail.blocks)
        return ([{"params": list(self.head.head.parameters()), "lr": cfg.lr}]
                + [{"params": list(blk.parameters()), "lr": cfg.tuned_lr * cfg.layer_decay ** (k - 1 - i)}
                   for i, blk in enumerate(tail.blocks)]
                + [{"params": list(tail.norm.parameters()), "lr": cfg.tuned_lr}])

    def _sources(self):
        preload, why = choose_preload(self.opts.preload, [self.train_split, self.val_split], self.device)
        self.log(why)
        if preload:
            t0 = time.perf_counter()
            src = PreloadedSplit(self.train_split, self.device), PreloadedSplit(self.val_split, self.device)
            self.log(f"preloaded {len(self.train_split) + len(self.val_split)} samples in {time.perf_counter() - t0:.1f} s")
            return src
        return (StreamedSplit(self.train_split, self.device, self.opts.workers),
                StreamedSplit(self.val_split, self.device, self.opts.workers))

    def _run_record(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "class_table": self.table.to_json(),
            "cache": str(self.cache.path.resolve()),
            "cache_fingerprint": cache_fingerprint(self.cache.manifest),
            "backbone": backbone_record(self.cache.manifest),
            "in_channels": self.cache.in_channels,
            "class_weights": self.class_weights,
        }

    # -- one epoch -------------------------------------------------------------------------
    def _forward_loss(self, tokens: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head_logits(self.model, tokens, tuple(masks.shape[-2:]), self.amp_dtype is not None, self.grid)
        return logits, self.criterion(logits, masks)

    def epoch_draw(self, epoch: int) -> np.ndarray:
        """The epoch's samples, in order: a pure function of (seed, epoch), the same on every rank."""
        cfg = self.cfg
        if self.sampler is not None:
            return self.sampler.draw(len(self.train_split.images), epoch, cfg.seed)[0]
        return epoch_indices(len(self.train_split.images), len(self.train_split.seeds), epoch, cfg.seed, cfg.all_seeds)

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of the epoch. Under DDP the epoch's draw is the one-process draw,
        padded by wrap-around to whole global batches, and each global batch of batch_size x world
        is cut into one slice per rank."""
        cfg, d = self.cfg, self.d
        idx = self.epoch_draw(epoch)
        if not d.active:
            return batches_of(idx, cfg.batch_size)
        global_batch = cfg.batch_size * d.world
        pad = (-len(idx)) % global_batch
        idx = np.concatenate([idx, np.resize(idx, pad)]) if pad else idx
        return [g[d.rank * cfg.batch_size:(d.rank + 1) * cfg.batch_size] for g in batches_of(idx, global_batch)]

    def train_epoch(self, source, epoch: int) -> tuple[float, float]:
        cfg = self.cfg
        self.model.train()
        batches = self.rank_batches(epoch)
        n_samples = sum(len(b) for b in batches)
        total, count, t0 = 0.0, 0, time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        bar = tqdm(total=n_samples, unit="sample", desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (self.opts.progress and self.d.is_main), dynamic_ncols=True)
        for step, (tokens, masks) in enumerate(source.batches(batches)):
            _, loss = self._forward_loss(tokens, masks)
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
            if all_reduce_sum(self.d, bad).item() > 0:  # every rank stops together, none waits forever
                bar.close()
                raise SegError(f"train loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopped. "
                               f"{self._last_good()} (lower --lr, or check the cache with `seg cache verify`)")
            self.scaler.scale(loss / cfg.accum).backward()
            # As published: step on every accum-th batch only. A last group of fewer than accum
            # batches adds its gradients, but zero_grad at the next epoch's start discards them.
            if (step + 1) % cfg.accum == 0:
                self.scaler.step(self.opt)
                self.scaler.update()
                self.opt.zero_grad(set_to_none=True)
            total += loss.item() * len(tokens)
            count += len(tokens)
            bar.update(len(tokens))
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        seconds = time.perf_counter() - t0
        sums = all_reduce_sum(self.d, torch.tensor([total, float(count)], dtype=torch.float64, device=self.device))
        total, count = sums.tolist()
        return total / max(count, 1), count / seconds if seconds > 0 else 0.0

    @torch.no_grad()
    def validate(self, source) -> tuple[float, torch.Tensor]:
        self.model.eval()
        cm = torch.zeros(self.k, self.k, dtype=torch.int64, device=self.device)
        total, count = 0.0, 0
        mine = np.array_split(np.arange(len(self.val_split)), self.d.world)[self.d.rank]
        for tokens, masks in source.batches(batches_of(mine, VAL_BATCH)):
            logits, loss = self._forward_loss(tokens, masks)
            total += loss.item() * len(tokens)
            count += len(tokens)
            cm += confusion_matrix(logits.argmax(1), masks, self.k)
        all_reduce_sum(self.d, cm)  # one confusion matrix over the whole split, never per rank
        sums = all_reduce_sum(self.d, torch.tensor([total, float(count)], dtype=torch.float64, device=self.device))
        return sums[0].item() / max(sums[1].item(), 1), cm

    # -- the run ---------------------------------------------------------------------------
    def _last_good(self) -> str:
        """Words naming the last checkpoint that is truly good (only finite ones are ever written)."""
        last = self.out / "last.pt"
        if last.exists():
            return f"The last good checkpoint is {last} (epoch {self._saved_epoch}); --resume continues from it."
        return "No checkpoint was written: no epoch finished with finite results."

    def _load_state(self) -> Optional[dict]:
        """last.pt of the run in --out (after --resume), checked against this run's settings."""
        cfg, out = self.cfg, self.out
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
        if state["config"] != cfg.to_dict():
            diffs = [k for k in cfg.to_dict() if state["config"].get(k) != cfg.to_dict()[k]]
            raise SegError(f"{out}: --resume with other settings than the run's (differs in {', '.join(diffs)})")
        if state["cache_fingerprint"] != cache_fingerprint(self.cache.manifest):
            raise SegError(f"{out}: --resume with another cache than the run was trained on")
        return state

    def run(self) -> dict:
        out = self.out
        lock = DirLock(out, RUN_LOCK, "training run")

        def claim() -> str:
            mode = check_run_dir(out, self.cache.path, self.opts.resume, self.opts.overwrite)
            out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            if mode == "replace":
                clear_run_dir(out, self.log)
            return mode

        try:
            mode = on_main(self.d, claim)
            return self._run(mode == "resume")
        finally:
            lock.release()

    def _run(self, resume: bool) -> dict:
        cfg, out, main = self.cfg, self.out, self.d.is_main
        state = self._load_state() if resume else None
        self._build()
        record = self._run_record()
        start_epoch, history, best = 0, [], {"miou": -1.0, "epoch": None}
        best_head, best_metrics = None, None
        self._saved_epoch = None
        if state is not None:
            self.head.load_state_dict(state["head"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng_cpu"])
            start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
            best_head, best_metrics = state["best_head"], state["best_metrics"]
            self._saved_epoch = state["epoch"] + 1
            if main:
                self._repair_best(record, best, best_head, best_metrics)
            self.log(f"resuming {out} at epoch {start_epoch + 1}/{cfg.epochs}")
        eff = cfg.batch_size * cfg.accum * self.d.world
        self.log("training config (phase preset + overrides):\n" + describe_config(
            cfg, {"effective_batch": f"{eff} (batch {cfg.batch_size} x world {self.d.world} x accum {cfg.accum})"
                  if self.d.active else eff, "device": self.device.type,
                  "amp_dtype": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "off",
                  "in_channels": self.cache.in_channels, "train_samples/epoch":
                  len(self.train_split) if cfg.all_seeds else len(self.train_split.images)}))
        if main:
            write_json(out / "config.json", jsonable({"format": RUN_FORMAT, **record, "effective_batch": eff,
                                                      "world_size": self.d.world}))
        train_src, val_src = self._sources()
        stopped_early = False
        for epoch in range(start_epoch, cfg.epochs):
            if self._patience_exhausted(best, epoch):
                stopped_early = True
                break
            t0 = time.perf_counter()
            lr = self.opt.param_groups[0]["lr"]
            train_loss, sps = self.train_epoch(train_src, epoch)
            val_loss, cm = self.validate(val_src)
            self._refuse_non_finite(epoch, train_loss, val_loss)
            self.sched.step()
            summary = summarize(cm, self.names)
            drawn = (self.train_counts[self.epoch_draw(epoch)] > 0).sum(0)  # drawn samples holding each class
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss, "val_miou": summary["miou"],
                   "lr": lr, "seconds": time.perf_counter() - t0, "samples_per_s": sps,
                   **{f"iou_{n}": v for n, v in zip(self.names, summary["iou"])},
                   **{f"drawn_{n}": int(c) for n, c in zip(self.names, drawn)}}
            history.append(row)
            improved = summary["miou"] > best["miou"] or cfg.select == "final"
            if improved:
                best = {"miou": summary["miou"], "epoch": epoch + 1}
                best_head = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
                best_metrics = {"summary": summary, "confusion_matrix": cm.cpu().tolist()}
            if main:
                # last.pt first: it holds everything (the best weights and metrics too), so a failed
                # write of anything after it is repaired by --resume.
                save_checkpoint(out / "last.pt", {
                    **record, "head": self.head.state_dict(), "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                    "rng_cpu": torch.get_rng_state(), "epoch": epoch, "history": history, "best": best,
                    "best_head": best_head, "best_metrics": best_metrics})
                self._saved_epoch = epoch + 1
                if improved:
                    self._write_best(record, best, best_head, best_metrics)
                self._write_history(history)
            self.log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                     f"val mIoU {summary['miou']:.4f}{' *' if improved else ''}  lr {lr:.3g}  "
                     f"{sps:.1f} samples/s  {row['seconds']:.1f} s")
        if stopped_early:
            self.log(f"early stop: no val mIoU gain for {cfg.patience} epochs (best {best['miou']:.4f} at epoch {best['epoch']})")
        if history and main:
            plots.curves(history, out / "curves.png")
        metrics_path = out / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if main and metrics_path.exists() else {}
        return metrics

    def _refuse_non_finite(self, epoch: int, train_loss: float, val_loss: float) -> None:
        """Never checkpoint weights or results that are not finite numbers."""
        bad = []
        if not math.isfinite(train_loss):
            bad.append(f"train loss {train_loss}")
        if not math.isfinite(val_loss):
            bad.append(f"val loss {val_loss}")
        if not all(torch.isfinite(p).all() for p in self.head.parameters()):
            bad.append("non-finite weights")
        if bad:
            raise SegError(f"epoch {epoch + 1} ended with {' and '.join(bad)}; stopped without saving it. "
                           f"{self._last_good()} (lower --lr, or check the cache with `seg cache verify`)")

    def _write_best(self, record: dict, best: dict, best_head: dict, best_metrics: dict) -> None:
        save_checkpoint(self.out / "best.pt", {**record, "head": best_head, "epoch": best["epoch"],
                                               "val_miou": best["miou"]})
        self._write_metrics(best_metrics["summary"], best_metrics["confusion_matrix"], best["epoch"])

    def _repair_best(self, record: dict, best: dict, best_head: Optional[dict], best_metrics: Optional[dict]) -> None:
        """After a failed write, best.pt/metrics may lag last.pt; rewrite them from last.pt's copy."""
        if best_head is None:
            return
        path = self.out / "best.pt"
        current = load_torch_file(path, what="unreadable checkpoint") if path.exists() else None
        if not isinstance(current, dict) or current.get("epoch") != best["epoch"] \
                or not (self.out / "metrics.json").exists():
            self.log(f"rewriting best.pt and metrics of epoch {best['epoch']} from last.pt")
            self._write_best(record, best, best_head, best_metrics)

    def _patience_exhausted(self, best: dict, epoch: int) -> bool:
        p = self.cfg.patience
        return p is not None and self.cfg.select == "best" and best["epoch"] is not None and epoch - best["epoch"] >= p

    def _write_history(self, history: list[dict]) -> None:
        write_json(self.out / "history.json", jsonable(history))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        write_text(self.out / "history.csv", buf.getvalue())

    def _write_metrics(self, summary: dict, cm: list, epoch: int) -> None:
        metrics = {"epoch": epoch, "split": "val", **summary, "confusion_matrix": cm}
        write_json(self.out / "metrics.json", jsonable(metrics))
        write_text(self.out / "metrics.txt", f"best epoch {epoch} (val)\n" + format_table(summary) + "\n")
        plots.per_class_iou(summary["iou"], self.names, self.out / "per_class_iou.png",
                            title=f"val per-class IoU, epoch {epoch}")


def train(cfg: TrainConfig, cache_dir: str, out_dir: str, opts: Optional[RunOptions] = None,
          log: Callable[[str], None] = print, dist_ctx: Optional[Dist] = None) -> dict:
    return Trainer(cfg, cache_dir, out_dir, opts or RunOptions(), log, dist_ctx).run()
