"""Self-training on line, as DAFormer does it (Hoyer et al., CVPR 2022; the authors' `dacs.py`), on
cached tokens: a teacher that is an exponential moving average of the student labels each target
batch, and the student learns from a source batch and from the source mixed with the target.

Every micro-batch holds source samples (labelled) and target samples (no labels). The teacher
predicts the target; its argmax is the pseudo-label, and the share of target pixels whose max softmax
reaches `threshold` (0.968) is the weight q of every pseudo-labelled pixel, one number for the batch.
loss = source loss + target_weight x mix loss, where the mix is ClassMix on the token grid
(seg.train.classmix): source pixels weigh 1 and target pixels q, averaged over the mixed pixels that
carry a label. With mix "none" the student reads the target tokens themselves: q x loss on them.
After each optimizer step s (1, 2, ...) the teacher's parameters move to
alpha x teacher + (1 - alpha) x student with alpha = min(1 - 1 / (s + 1), momentum); it starts as a
copy of the student (DAFormer's _init_ema_weights and _update_ema).

Where this differs from DAFormer, and why (DESIGN): the teacher runs in eval mode, its buffers
(BatchNorm statistics) copied from the student at each update; DAFormer's EMA model runs BatchNorm
on the target batch in training mode, but a mask decoder's training mode also masks attention at
random, which a teacher must not do. No colour jitter or blur on the mix (they act on pixels, and the
cache holds tokens). No ignored image rows (DAFormer's Cityscapes configs drop the top 15 and bottom
120 pixels of the pseudo-weight for its ego-vehicle hood; off by default there too).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from seg.heads import head_logits
from seg.train.classmix import IGNORE, class_masks, mix_tokens, mixed_labels, pixels_of, token_mask

MIXES = ("classmix", "none")


@dataclass(frozen=True)
class OnlineSettings:
    split: str                   # the unlabeled split of the cache that the teacher labels
    momentum: float = 0.999      # DAFormer's alpha
    threshold: float = 0.968     # DAFormer's pseudo_threshold
    mix: str = "classmix"        # classmix (on the token grid) | none

    def to_dict(self) -> dict:
        return asdict(self)


class EmaTeacher:
    """The teacher, its step count, and what it saw this epoch (for the per-epoch table and guard)."""

    def __init__(self, settings: OnlineSettings, student: nn.Module, num_classes: int,
                 grid: tuple[int, int]) -> None:
        if settings.mix not in MIXES:
            raise ValueError(f"mix must be one of {', '.join(MIXES)}, got {settings.mix!r}")
        self.settings, self.k, self.grid = settings, num_classes, grid
        self.head = copy.deepcopy(student).eval().requires_grad_(False)
        self.steps = 0  # optimizer steps the student took so far (DAFormer's local_iter)
        self._seen: Optional[Tensor] = None

    def alpha(self, step: int) -> float:
        return min(1.0 - 1.0 / (step + 1), self.settings.momentum)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """After the student's optimizer step."""
        self.steps += 1
        a = self.alpha(self.steps)
        for t, s in zip(self.head.parameters(), student.parameters()):
            t.mul_(a).add_(s.detach().to(t.dtype), alpha=1.0 - a)
        for t, s in zip(self.head.buffers(), student.buffers()):
            t.copy_(s)

    def loss(self, runner, tokens: Tensor, masks: Tensor, n_source: int, epoch: int, step: int) -> Tensor:
        """The micro-batch's loss: its first n_source samples labelled source, the rest target."""
        size = tuple(masks.shape[-2:])
        source, labels, target = tokens[:n_source], masks[:n_source], tokens[n_source:]
        with torch.no_grad():
            conf, pseudo = head_logits(self.head, target, size, runner.amp_dtype, runner.grid).softmax(1).max(1)
            confident = conf >= self.settings.threshold
            q = confident.float().mean()
            self._count(conf, pseudo, confident)
        loss = runner.criterion(runner.head_out(source, size), labels)
        if self.settings.mix == "none":
            return loss + runner.cfg.target_weight * q * runner.criterion(runner.head_out(target, size), pseudo)
        pair = torch.arange(len(target), device=tokens.device) % n_source  # target j mixes with source j
        rng = np.random.default_rng([runner.cfg.seed, epoch, step, 2])
        grid = tuple(tokens.shape[-2:]) if tokens.dim() == 5 else self.grid
        from_source = token_mask(class_masks(labels, rng)[pair], grid)
        mixed = mix_tokens(source[pair], target, from_source)
        src_part, tgt_part = mixed_labels(labels[pair], pseudo, pixels_of(from_source, size))
        out = runner.head_out(mixed, size)
        n_s, n_t = (src_part != IGNORE).sum(), (tgt_part != IGNORE).sum()
        mix = (n_s * runner.criterion(out, src_part) + q * n_t * runner.criterion(out, tgt_part)) / (n_s + n_t).clamp_min(1)
        return loss + runner.cfg.target_weight * mix

    def _count(self, conf: Tensor, pseudo: Tensor, confident: Tensor) -> None:
        """Per class: predicted pixels, their summed confidence; and confident pixels (on the device)."""
        k, flat = self.k, pseudo.flatten()
        seen = torch.cat((torch.bincount(flat, minlength=k).double(),
                          torch.bincount(flat, conf.flatten().double(), k),
                          confident.sum().double().view(1)))
        self._seen = seen if self._seen is None else self._seen + seen

    def epoch_stats(self, reduce=lambda t: t) -> Optional[dict]:
        """What the teacher predicted since the last call (None when nothing): coverage (the share of
        pixels at or over the threshold, the mean pseudo-weight), per-class shares and mean confidence,
        and the pixel-weighted mean confidence. `reduce` sums the counts over ranks."""
        if self._seen is None:
            return None
        seen, self._seen = reduce(self._seen.clone()).cpu().numpy(), None
        k = self.k
        pixels, conf_sum, confident = seen[:k], seen[k:2 * k], seen[2 * k]
        total = pixels.sum()
        return {"coverage": float(confident / total), "shares": (pixels / total).tolist(),
                "teacher_confidence": [float(c / n) if n else None for c, n in zip(conf_sum, pixels)],
                "mean_confidence": float(conf_sum.sum() / total), "pixels": int(total)}

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.steps = int(state["steps"])
