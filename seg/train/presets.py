"""Training configuration and the three published phases (DESIGN.md section 2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

from seg.runtime.errors import SegError


@dataclass(frozen=True)
class TrainConfig:
    phase: Optional[int]
    head: str                    # convnext | upernet (published) | linear (DINOv2's) | upernet-ms (4 layers)
    loss: str                    # ce | weighted_ce | focal_dice (published) | lin_focal_dice (Lin et al.'s focal)
    optimizer: str               # sgd | adamw
    lr: float
    momentum: float              # SGD only
    weight_decay: float
    schedule: str                # none | cosine | warmup_cosine
    warmup_epochs: int           # warmup_cosine only
    eta_min: float               # floor of the cosine schedules
    batch_size: int
    accum: int                   # gradient accumulation steps
    epochs: int
    patience: Optional[int]      # early stopping; None = never
    select: str                  # which weights best.pt holds: best (val mIoU) | final
    amp: bool                    # half-precision autocast (bf16, or fp16 + GradScaler on old GPUs)
    backbone: str                # what the published run used; a cache must match
    size: str
    aug_policy: str              # the published augmentation (a mismatch only warns)
    focal_gamma: float = 2.0
    dice_weight: float = 0.5
    max_class_weight: float = 5.0
    seed: int = 0
    all_seeds: bool = False      # visit every (image, seed) each epoch instead of one seed per image
    sampling: str = "uniform"    # uniform (published) | rare-class (DAFormer's RCS over cached samples)
    rcs_temperature: float = 0.01
    rcs_min_pixels: Optional[int] = None  # None: DAFormer's 3000 px at 1024x512, scaled to the mask area
    tune_blocks: int = 0         # train the last k backbone blocks too (needs a tap cache at block N - k)
    backbone_lr: Optional[float] = None  # their learning rate; None: lr / 10
    layer_decay: float = 1.0     # block i of k gets backbone_lr x layer_decay^(k - 1 - i)
    ms_fusion: Optional[str] = None  # upernet-ms only: reduce (1x1 then 3x3) | full (mmseg's 3x3); None elsewhere

    @property
    def tuned_lr(self) -> float:
        return self.backbone_lr if self.backbone_lr is not None else self.lr / 10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def warmup_note(self) -> Optional[str]:
        """A note when the run ends inside its warmup: the learning rate never reaches the base lr."""
        if self.schedule != "warmup_cosine" or self.epochs >= self.warmup_epochs + 1 or self.warmup_epochs == 0:
            return None
        reached = self.lr * self.lr_factor(self.epochs - 1)
        return (f"NOTE: {self.epochs} epoch(s) end inside the {self.warmup_epochs}-epoch warmup: the learning rate "
                f"only reaches {reached:g} of {self.lr:g} and the cosine never starts; train at least "
                f"{self.warmup_epochs + 1} epochs, or lower --warmup-epochs")

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of the base lr during 0-based `epoch` (the schedule steps once per epoch)."""
        if self.schedule == "none":
            return 1.0
        floor = self.eta_min / self.lr
        if self.schedule == "cosine":  # torch's CosineAnnealingLR with T_max = epochs
            return floor + (1 - floor) * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        if self.schedule == "warmup_cosine":
            w = self.warmup_epochs
            if epoch < w:
                return (epoch + 1) / w
            span = max(1, self.epochs - w)
            return floor + (1 - floor) * (1 + math.cos(math.pi * (epoch - w) / span)) / 2
        raise SegError(f"unknown schedule {self.schedule!r}; choose none, cosine or warmup_cosine")


_COMMON_2 = dict(head="convnext", backbone="vits14", size="476x266", batch_size=2, accum=1, momentum=0.9)

PRESETS: dict[int, TrainConfig] = {
    1: TrainConfig(phase=1, loss="ce", optimizer="sgd", lr=1e-4, weight_decay=0.0, schedule="none",
                   warmup_epochs=0, eta_min=0.0, epochs=10, patience=None, select="final", amp=False,
                   aug_policy="none", **_COMMON_2),
    2: TrainConfig(phase=2, loss="weighted_ce", optimizer="adamw", lr=5e-4, weight_decay=1e-4, schedule="cosine",
                   warmup_epochs=0, eta_min=1e-6, epochs=30, patience=10, select="best", amp=True,
                   aug_policy="phase2", **_COMMON_2),
    # Phase 3's weight decay is not published; 1e-4 as in phase 2 (DESIGN.md).
    3: TrainConfig(phase=3, head="upernet", loss="focal_dice", optimizer="adamw", lr=3e-4, momentum=0.9,
                   weight_decay=1e-4, schedule="warmup_cosine", warmup_epochs=3, eta_min=0.0, batch_size=2,
                   accum=2, epochs=40, patience=12, select="best", amp=True, backbone="vitb14_reg",
                   size="644x364", aug_policy="phase3"),
}

CHOICES = {
    "head": ("convnext", "upernet", "linear", "upernet-ms"),
    "loss": ("ce", "weighted_ce", "focal_dice", "lin_focal_dice"),
    "optimizer": ("sgd", "adamw"),
    "schedule": ("none", "cosine", "warmup_cosine"),
    "select": ("best", "final"),
    "sampling": ("uniform", "rare-class"),
}


def resolve(phase: int, overrides: dict[str, Any], keep_none: bool = False) -> TrainConfig:
    """The phase preset with every non-None override applied and checked; with `keep_none`, None
    values apply too (a config file's "patience": null means never stop early, not the preset's)."""
    if phase not in PRESETS:
        raise SegError(f"--phase must be 1, 2 or 3, got {phase}")
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise SegError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    values = {k: v for k, v in overrides.items() if v is not None or keep_none}
    if (values.get("patience") or 0) < 0:
        raise SegError(f"--patience must be 0 (never stop early) or a number of epochs, got {values['patience']}")
    if values.get("patience") == 0:  # 0 on the command line: never stop early
        values["patience"] = None
    cfg = replace(PRESETS[phase], **values)
    if cfg.head == "upernet-ms":
        cfg = replace(cfg, ms_fusion=cfg.ms_fusion or "reduce")
        if cfg.ms_fusion not in ("reduce", "full"):
            raise SegError(f"--ms-fusion must be reduce or full, got {cfg.ms_fusion!r}")
    elif cfg.ms_fusion is not None:
        raise SegError(f"--ms-fusion applies to the upernet-ms head, not {cfg.head}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise SegError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    for key in ("batch_size", "accum", "epochs"):
        if getattr(cfg, key) < 1:
            raise SegError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(cfg, key)}")
    if cfg.rcs_min_pixels is not None and cfg.rcs_min_pixels < 1:
        raise SegError(f"--rcs-min-pixels must be at least 1, got {cfg.rcs_min_pixels}")
    if cfg.sampling == "rare-class" and cfg.all_seeds:
        raise SegError("--sampling rare-class draws samples by class; it cannot be combined with --all-seeds")
    if cfg.backbone_lr is not None and not (math.isfinite(cfg.backbone_lr) and cfg.backbone_lr > 0):
        raise SegError(f"--backbone-lr must be a finite number > 0, got {cfg.backbone_lr}")
    if not (math.isfinite(cfg.layer_decay) and 0 < cfg.layer_decay <= 1):
        raise SegError(f"--layer-decay must be in (0, 1], got {cfg.layer_decay}")
    if (cfg.backbone_lr is not None or cfg.layer_decay != 1.0) and not cfg.tune_blocks:
        raise SegError("--backbone-lr and --layer-decay apply to tuned blocks: add --tune-blocks k")
    for key in ("warmup_epochs", "seed", "tune_blocks"):
        if getattr(cfg, key) < 0:
            raise SegError(f"--{key.replace('_', '-')} must be 0 or more, got {getattr(cfg, key)}")
    # (name, lowest allowed, is the lowest itself allowed, upper bound exclusive)
    for key, low, inclusive, high in (("lr", 0.0, False, None), ("momentum", 0.0, True, 1.0),
                                      ("weight_decay", 0.0, True, None), ("eta_min", 0.0, True, None),
                                      ("focal_gamma", 0.0, True, None), ("dice_weight", 0.0, True, None),
                                      ("max_class_weight", 0.0, False, None), ("rcs_temperature", 0.0, False, None)):
        v = getattr(cfg, key)
        ok = math.isfinite(v) and (v >= low if inclusive else v > low) and (high is None or v < high)
        if not ok:
            bounds = (f">= {low:g}" if inclusive else f"> {low:g}") + (f" and < {high:g}" if high is not None else "")
            raise SegError(f"--{key.replace('_', '-')} must be a finite number {bounds}, got {v}")
    return cfg


def with_legacy_fields(config: dict) -> dict:
    """A recorded config as this seg reads it: fields added since it was written get the value that
    means what that run did (an upernet-ms run before the cheaper fusion used the full one)."""
    config = dict(config)
    if "ms_fusion" not in config:
        config["ms_fusion"] = "full" if config.get("head") == "upernet-ms" else None
    return config
