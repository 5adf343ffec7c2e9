"""A trained run in Python: `seg.load(run)` gives the same Segmenter `seg predict` uses, with
`predict(image)` for class ids and `predict_logits(image)` for scores at the image's own size.

    import seg
    model = seg.load("runs/p3", device="auto")
    labels = model.predict(rgb)          # HxWx3 uint8 RGB array, a path, or a list of either
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from seg.data.augment import Augmenter
from seg.data.decode import read_image
from seg.infer.runs import load_run
from seg.infer.segmenter import Segmenter
from seg.runtime.device import resolve_device
from seg.runtime.errors import SegError

Image = Union[np.ndarray, str, Path]


def load(run_dir: str | Path, device: str = "auto", weights: Optional[str] = None, tta: str = "none",
         mode: str = "resize", tta_scales: Optional[tuple[float, ...]] = None,
         stride: Optional[tuple[int, int]] = None, batch_size: int = 4, precision: str = "auto") -> "Predictor":
    """The run in `run_dir` (its best.pt) with its backbone rebuilt exactly, ready to predict. The
    options are `seg predict`'s, with its defaults. precision: "auto" (the cache's backbone dtype and
    the run's training autocast: what eval from the cache scores), or "fp32", "bf16", "fp16" for
    backbone and head alike; "fp32" labels exactly as the float32 ONNX graph `seg export` writes."""
    dev = resolve_device(device)
    return Predictor(Segmenter(load_run(run_dir, dev), weights, dev, tta_scales, precision), tta, mode, stride,
                     batch_size)


def as_rgb(image: Image) -> np.ndarray:
    """An HxWx3 uint8 RGB array from an array or an image file; anything else is one line."""
    if isinstance(image, (str, Path)):
        return read_image(Path(image))
    if not isinstance(image, np.ndarray):
        raise SegError(f"an image is an HxWx3 uint8 RGB numpy array or a path, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise SegError(f"image array is {image.dtype}; expected uint8 RGB values 0..255 "
                       "(e.g. (x * 255).round().astype(np.uint8) for floats in 0..1)")
    if image.ndim == 2:
        raise SegError(f"image array is grayscale {image.shape}; expected HxWx3 RGB "
                       "(np.repeat(image[..., None], 3, axis=2) makes one)")
    if image.ndim != 3 or image.shape[2] != 3:
        extra = " (RGBA: drop the alpha channel with image[..., :3])" if image.ndim == 3 and image.shape[2] == 4 else ""
        raise SegError(f"image array has shape {image.shape}; expected HxWx3 RGB{extra}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise SegError(f"image array has shape {image.shape}: an empty image has nothing to segment")
    return np.ascontiguousarray(image)


class Predictor:
    """Class ids and scores of images through the run's backbone and head, prepared exactly as
    `seg predict` prepares files (resized to the run's size, or slid over at the original size)."""

    def __init__(self, segmenter: Segmenter, tta: str = "none", mode: str = "resize",
                 stride: Optional[tuple[int, int]] = None, batch_size: int = 4) -> None:
        if mode not in ("resize", "slide"):
            raise SegError(f"mode must be resize or slide, got {mode!r}")
        self.segmenter, self.tta, self.mode, self.stride, self.batch_size = segmenter, tta, mode, stride, batch_size
        self.resize = Augmenter("none", segmenter.run.size)

    @property
    def classes(self):
        """The run's class table: `.names`, `.colors` (RGB), `.palette()`."""
        return self.segmenter.run.class_table

    def predict(self, images: Union[Image, Sequence[Image]]) -> Union[np.ndarray, list[np.ndarray]]:
        """HxW uint8 class ids at each input's own size; a list in, a list out."""
        many = isinstance(images, (list, tuple))
        rgbs = [as_rgb(i) for i in (images if many else [images])]
        labels = []
        for b0 in range(0, len(rgbs), self.batch_size):
            chunk = rgbs[b0:b0 + self.batch_size]
            batch = {"image": torch.stack([torch.from_numpy(self.resize(rgb, None, "", 0)[0]) for rgb in chunk]),
                     "original": chunk}
            maps = self.segmenter.batch_labels(batch, [rgb.shape[:2] for rgb in chunk], self.tta, self.mode,
                                               self.stride, self.batch_size)
            labels += [m.to(torch.uint8).cpu().numpy() for m in maps]
        return labels if many else labels[0]

    def predict_logits(self, image: Image) -> np.ndarray:
        """float32 [K, H, W] at the image's own size: the logits in resize mode without TTA; with TTA
        or in slide mode, the mean softmax over the views (what `predict` takes the argmax of)."""
        rgb = as_rgb(image)
        if self.mode == "slide":
            scores = self.segmenter.slide_scores(torch.from_numpy(rgb), self.tta, self.stride, self.batch_size)
        else:
            small = torch.from_numpy(self.resize(rgb, None, "", 0)[0])[None]
            scores = self.segmenter.scores(small, rgb.shape[:2], self.tta)[0]
        return scores.float().cpu().numpy()
