"""Backbone + head on images, prepared exactly as the cache was (resize, normalise, half
precision, float16 tokens), with optional test-time augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from seg.data.augment import Augmenter
from seg.data.decode import MaskDecoder, read_pair
from seg.runtime.device import recorded_dtype
from seg.backbones.features import backbone_features, cast_matmul_weights_
from seg.runtime.errors import SegError
from seg.heads import head_logits
from seg.data.normalize import normalize
from seg.backbones.rebuild import rebuild_backbone
from seg.infer.runs import Run
from seg.infer.sliding_window import default_stride, slide_logits

TTA_MODES = ("none", "flip", "flip+scales")
TTA_SCALES = (0.75, 1.0, 1.25)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Segmenter:
    def __init__(self, run: Run, weights: Optional[str], device: torch.device,
                 scales: Optional[tuple[float, ...]] = None, precision: str = "auto") -> None:
        """precision: "auto" computes the backbone in the cache's recorded dtype and the head in its
        training autocast (image-based scores then match cache-based ones); "fp32", "bf16" or "fp16"
        compute both in that dtype ("fp32": the exported float32 graph's computation). The tokens
        between them are rounded to float16 in every case, as the cache stores them."""
        if precision != "auto" and precision not in PRECISIONS:
            raise SegError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        self.run, self.device, self.precision = run, device, precision
        self.scales = tuple(scales) if scales else TTA_SCALES  # of the flip+scales TTA
        self.backbone = rebuild_backbone(run.backbone, weights, device)
        self.layers = run.backbone["layers"]
        if precision == "auto":
            self.compute_dtype = recorded_dtype(run.backbone["compute_dtype"], device)
            self.amp = run.amp_dtype(device)  # the head's training autocast, where the device has it
        else:
            self.compute_dtype = PRECISIONS[precision]
            self.amp = None if precision == "fp32" else self.compute_dtype
        cast_matmul_weights_(self.backbone, self.compute_dtype)
        self.patch = run.backbone["patch_size"]

    @torch.inference_mode()
    def tokens(self, x: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> float16 tokens, as the cache stores them: [B, L, C, Hp, Wp],
        for a tuned run the stream entering its first tuned block [B, T, C], for a mask decoder the
        layers with their prefix tokens packed into levels [B, L, P + N, C]."""
        return backbone_features(self.backbone, x, self.layers, self.run.tap_block, self.device,
                                 self.compute_dtype, levels=self.run.levels).to(torch.float16)

    def logits(self, x: Tensor, out_size: tuple[int, int]) -> Tensor:
        """Normalised images -> float32 logits at out_size, through the cache's tokens."""
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        return head_logits(self.run.head, self.tokens(x), out_size, self.amp, grid)

    def _views(self, x: Tensor, tta: str, rescale, logits_of) -> Tensor:
        """logits_of(x) without TTA; otherwise the mean softmax over the flipped (and rescaled) views
        of x, each view's logits_of brought back to x's frame."""
        if tta not in TTA_MODES:
            raise SegError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        if tta == "none":
            return logits_of(x)
        total, views = None, 0
        for scale in (self.scales if tta == "flip+scales" else (1.0,)):
            xs = x if scale == 1.0 else rescale(x, scale)
            for flip in (False, True):
                probs = logits_of(xs.flip(-1) if flip else xs).softmax(1)
                probs = probs.flip(-1) if flip else probs
                total = probs if total is None else total + probs
                views += 1
        return total / views

    @torch.inference_mode()
    def scores(self, images: Tensor, out_size: tuple[int, int], tta: str = "none") -> Tensor:
        """uint8 images [B, h, w, 3] at the run's input size -> [B, K, H, W] float32 scores
        (logits without TTA; mean softmax over the TTA views otherwise)."""
        return self._views(normalize(images.to(self.device)), tta, self._rescale,
                           lambda v: self.logits(v, out_size))

    def label_maps(self, images: Tensor, sizes: list[tuple[int, int]], tta: str = "none") -> list[Tensor]:
        """Class-id maps (on the device), one per image at its own (H, W); one backbone pass when
        all sizes agree (the usual case), one per image otherwise."""
        if len(set(sizes)) == 1:
            return list(self.scores(images, sizes[0], tta).argmax(1))
        return [self.scores(images[i:i + 1], size, tta).argmax(1)[0] for i, size in enumerate(sizes)]

    @torch.inference_mode()
    def slide_scores(self, image: Tensor, tta: str = "none", stride: Optional[tuple[int, int]] = None,
                     batch: int = 4) -> Tensor:
        """One uint8 image [H, W, 3] at any size (the original frame) -> mean softmax [K, H, W] over
        the TTA views, each view scored by windows of the training size slid over the (rescaled) image."""
        w, h = self.run.size
        stride = stride or default_stride((h, w))
        x = normalize(image[None].to(self.device))
        size = tuple(x.shape[-2:])

        def view_logits(v: Tensor) -> Tensor:
            logits = slide_logits(v, (h, w), stride, lambda crops: self.logits(crops, (h, w)), batch)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            return logits

        def rescale(v: Tensor, scale: float) -> Tensor:
            return F.interpolate(v, scale_factor=scale, mode="bilinear", align_corners=False)

        scores = self._views(x, tta, rescale, view_logits)
        return (scores.softmax(1) if tta == "none" else scores)[0]

    def batch_labels(self, batch: dict, sizes: list[tuple[int, int]], tta: str = "none", mode: str = "resize",
                     stride: Optional[tuple[int, int]] = None, window_batch: int = 4) -> list[Tensor]:
        """Class-id maps of a collated batch: from its resized images at `sizes` ("resize"), or from
        windows slid over its original frames, at their own size ("slide")."""
        if mode == "slide":
            return [self.slide_scores(torch.from_numpy(o), tta, stride, window_batch).argmax(0)
                    for o in batch["original"]]
        return self.label_maps(batch["image"], sizes, tta)

    def _rescale(self, x: Tensor, scale: float) -> Tensor:
        h, w = x.shape[-2:]
        size = (max(self.patch, round(h * scale / self.patch) * self.patch),
                max(self.patch, round(w * scale / self.patch) * self.patch))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ImageFolderSamples(Dataset):
    """Images (and their masks when known) prepared for a run: resized image, and the mask either
    at the run's size (nearest) or at the original size.

    With `optional_masks`, a mask that cannot be used costs only that mask ("mask_error"), not the
    image; otherwise it is the sample's "error". Errors travel as text: raised in a worker, an
    exception would come back wrapped in a traceback."""

    def __init__(self, images: list[Path], masks: list[Optional[Path]], size: tuple[int, int],
                 decoder: Optional[MaskDecoder], full_res_masks: bool = False, optional_masks: bool = False) -> None:
        self.images, self.masks, self.decoder, self.full_res = images, masks, decoder, full_res_masks
        self.optional_masks = optional_masks
        self.resize = Augmenter("none", size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        mask_error = None
        try:
            image, mask = read_pair(self.images[i], self.masks[i], self.decoder)
        except SegError as exc:
            if not (self.optional_masks and self.masks[i] is not None):
                return {"index": i, "error": str(exc)}
            try:  # was it the image or only its optional mask?
                image, mask = read_pair(self.images[i], None, None)
            except SegError as exc2:
                return {"index": i, "error": str(exc2)}
            mask_error = str(exc)
        small, small_mask = self.resize(image, None if self.full_res else mask, self.images[i].name, 0)
        return {"index": i, "image": torch.from_numpy(small), "original": image,
                "mask": (mask if self.full_res else small_mask), "mask_error": mask_error}


def collate_samples(batch: list[dict]) -> dict:
    """The readable samples of a batch, plus (index, error text) of the unreadable ones."""
    good = [b for b in batch if "error" not in b]
    return {"errors": [(b["index"], b["error"]) for b in batch if "error" in b],
            "index": [b["index"] for b in good],
            "image": torch.stack([b["image"] for b in good]) if good else None,
            "original": [b["original"] for b in good], "mask": [b["mask"] for b in good],
            "mask_error": [b["mask_error"] for b in good]}
