"""Training configuration and the three published phases (DESIGN.md section 2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

from seg.runtime.errors import SegError


@dataclass(frozen=True)
class TrainConfig:
    phase: Optional[int]
    head: str                    # convnext | upernet (published) | linear (DINOv2's) | upernet-ms (4 layers) | pmt
    loss: str                    # ce | weighted_ce | focal_dice (published) | lin_focal_dice | mask_classification (pmt)
    optimizer: str               # sgd | adamw
    lr: float
    momentum: float              # SGD only
    weight_decay: float
    schedule: str                # none | cosine | warmup_cosine (per epoch) | step_warmup_cosine (per step, PMT's)
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
    grad_clip: Optional[float] = None  # clip the gradients' global norm to this (PMT: 0.01); None: never
    warmup_fraction: Optional[float] = None  # step_warmup_cosine only: share of all steps that warm up
    # The pmt head only (None elsewhere): PMT's queries, decoder blocks, masked attention (annealed) and
    # the points its loss samples per mask
    queries: Optional[int] = None
    decoder_blocks: Optional[int] = None
    masked_attention: Optional[bool] = None
    mask_points: Optional[int] = None
    # With pseudo-labelled target samples (train-head --target): their share of each batch and the
    # weight of their loss; None without a target
    target_ratio: Optional[float] = None
    target_weight: Optional[float] = None

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

    @property
    def per_step(self) -> bool:
        """The schedule moves every optimizer step (PMT's), not every epoch."""
        return self.schedule == "step_warmup_cosine"

    def step_lr_factor(self, step: int, total_steps: int) -> float:
        """PMT's WarmupCosineSchedule as a multiplier of the base lr at optimizer step `step` of
        `total_steps`: linear from 0 over the warmup, then cosine to eta_min."""
        warmup = round((self.warmup_fraction or 0.0) * total_steps)
        if warmup > 0 and step < warmup:
            return step / warmup
        floor = self.eta_min / self.lr
        span = max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * max(0, step - warmup) / span))

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of the base lr during 0-based `epoch` (the schedule steps once per epoch)."""
        if self.schedule == "none" or self.per_step:
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

# PMT's ADE20K semantic recipe (tue-mps/pmt image/configs/ade20k/semantic/pmt_l_512.yaml, main.py and
# mask_classification_semantic.py): AdamW 2e-4, weight decay 0.05, 6000 of 20224 steps (16 epochs of
# batch 16) of linear warmup then cosine to 1e-9 per step, gradient norm clipped at 0.01, 16-bit mixed
# precision, 100 queries, 6 decoder blocks, masked attention annealed, 12544 loss points; the final
# weights are the model (no early stopping). `--head pmt` starts from it; every field overrides.
PMT_RECIPE = dict(head="pmt", loss="mask_classification", optimizer="adamw", lr=2e-4, weight_decay=0.05,
                  schedule="step_warmup_cosine", warmup_epochs=0, warmup_fraction=6000 / 20224, eta_min=1e-9,
                  batch_size=16, accum=1, epochs=16, patience=None, select="final", amp=True, grad_clip=0.01,
                  queries=100, decoder_blocks=6, masked_attention=True, mask_points=12544)
PMT_ONLY = ("queries", "decoder_blocks", "masked_attention", "mask_points")
# A run with pseudo-labelled target samples (train-head --target, seg adapt's students), unless told otherwise
TARGET_DEFAULTS = {"target_ratio": 0.5, "target_weight": 1.0}

CHOICES = {
    "head": ("convnext", "upernet", "linear", "upernet-ms", "pmt"),
    "loss": ("ce", "weighted_ce", "focal_dice", "lin_focal_dice", "mask_classification"),
    "optimizer": ("sgd", "adamw"),
    "schedule": ("none", "cosine", "warmup_cosine", "step_warmup_cosine"),
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
    base = PRESETS[phase]
    if values.get("head") == "pmt":
        base = replace(base, **PMT_RECIPE)
    cfg = replace(base, **values)
    if cfg.head == "pmt" and not cfg.per_step and "warmup_fraction" not in values:
        cfg = replace(cfg, warmup_fraction=None)  # another --schedule replaces the recipe's per-step one
    check_pmt(cfg)
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
    if not (math.isfinite(cfg.layer_decay) and 0 < cfg.layer_decay <= 1):
        raise SegError(f"--layer-decay must be in (0, 1], got {cfg.layer_decay}")
    if (cfg.backbone_lr is not None or cfg.layer_decay != 1.0) and not cfg.tune_blocks:
        raise SegError("--backbone-lr and --layer-decay apply to tuned blocks: add --tune-blocks k")
    for key in ("warmup_epochs", "seed", "tune_blocks"):
        if getattr(cfg, key) < 0:
            raise SegError(f"--{key.replace('_', '-')} must be 0 or more, got {getattr(cfg, key)}")
    # (name, lowest allowed, is the lowest itself allowed, upper bound exclusive); an optional setting
    # that is None (off) is not checked
    for key, low, inclusive, high in (("lr", 0.0, False, None), ("momentum", 0.0, True, 1.0),
                                      ("weight_decay", 0.0, True, None), ("eta_min", 0.0, True, None),
                                      ("focal_gamma", 0.0, True, None), ("dice_weight", 0.0, True, None),
                                      ("max_class_weight", 0.0, False, None), ("rcs_temperature", 0.0, False, None),
                                      ("backbone_lr", 0.0, False, None), ("grad_clip", 0.0, False, None),
                                      ("warmup_fraction", 0.0, True, 1.0), ("target_ratio", 0.0, False, 1.0),
                                      ("target_weight", 0.0, True, None)):
        v = getattr(cfg, key)
        if v is None:
            continue
        ok = math.isfinite(v) and (v >= low if inclusive else v > low) and (high is None or v < high)
        if not ok:
            bounds = (f">= {low:g}" if inclusive else f"> {low:g}") + (f" and < {high:g}" if high is not None else "")
            raise SegError(f"--{key.replace('_', '-')} must be a finite number {bounds}, got {v}")
    return cfg


def check_pmt(cfg: TrainConfig) -> None:
    """The mask decoder's settings belong to the pmt head, its loss to it alone, and are in range."""
    pmt = cfg.head == "pmt"
    if pmt != (cfg.loss == "mask_classification"):
        raise SegError("the pmt head trains with --loss mask_classification, and only it does"
                       + (f" (got --loss {cfg.loss})" if pmt else f" (got --head {cfg.head})"))
    for key in PMT_ONLY:
        if not pmt and getattr(cfg, key) is not None:
            raise SegError(f"--{key.replace('_', '-')} applies to the pmt head, not {cfg.head}")
        if pmt and key != "masked_attention" and not (isinstance(getattr(cfg, key), int) and getattr(cfg, key) >= 1):
            raise SegError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(cfg, key)}")
    if cfg.per_step != (cfg.warmup_fraction is not None):
        raise SegError("--warmup-fraction goes with --schedule step_warmup_cosine (a share of all steps); "
                       "the per-epoch schedules take --warmup-epochs")


def with_legacy_fields(config: dict) -> dict:
    """A recorded config as this seg reads it: fields added since it was written get the value that
    means what that run did (an upernet-ms run before the cheaper fusion used the full one)."""
    config = dict(config)
    if "ms_fusion" not in config:
        config["ms_fusion"] = "full" if config.get("head") == "upernet-ms" else None
    for key in ("grad_clip", "warmup_fraction", "target_ratio", "target_weight", *PMT_ONLY):  # off before them
        config.setdefault(key, None)
    return config
