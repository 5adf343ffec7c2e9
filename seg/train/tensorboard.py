"""TensorBoard logging of a training run (`--tensorboard`): losses, learning rate, val mIoU and
per-class IoU every epoch, the confusion matrix, and prediction overlays of a few fixed val samples.
Optional: it needs the `tensorboard` package (`pip install 'seg[tensorboard]'`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from seg.runtime.errors import SegError

TB_DIR = "tensorboard"
OVERLAY_SAMPLES = 4


def open_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SegError("--tensorboard needs the tensorboard package: pip install 'seg[tensorboard]'") from None
    return SummaryWriter(log_dir=str(out / TB_DIR))


class TensorBoardLog:
    """One writer per run, under RUN/tensorboard; `epoch` adds everything of one finished epoch."""

    def __init__(self, out: Path, names: list[str], colors: list, val_split, head_logits_fn) -> None:
        self.writer = open_writer(out)
        self.names, self.palette = names, np.asarray(colors, np.uint8)
        self.val_split, self.logits_of = val_split, head_logits_fn
        n = len(val_split)
        self.samples = np.unique(np.linspace(0, n - 1, min(OVERLAY_SAMPLES, n)).astype(int)) if n else np.array([], int)
        self._images: Optional[list[Optional[np.ndarray]]] = None

    def epoch(self, epoch: int, row: dict, cm: torch.Tensor) -> None:
        w, step = self.writer, epoch + 1
        w.add_scalar("loss/train", row["train_loss"], step)
        w.add_scalar("loss/val", row["val_loss"], step)
        w.add_scalar("lr", row["lr"], step)
        w.add_scalar("val/mIoU", row["val_miou"], step)
        for name in self.names:
            value = row.get(f"iou_{name}")
            if value is not None and np.isfinite(value):
                w.add_scalar(f"val_iou/{name}", value, step)
        w.add_figure("val/confusion_matrix", self._confusion_figure(cm.cpu().numpy()), step)
        if len(self.samples):
            w.add_images("val/prediction_overlays", self._overlays(), step, dataformats="NHWC")
        w.flush()

    def close(self) -> None:
        self.writer.close()

    def _confusion_figure(self, cm: np.ndarray):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.imshow(rows, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(self.names)), self.names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(self.names)), self.names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth (rows sum to 1)")
        fig.tight_layout()
        return fig

    def _overlays(self) -> np.ndarray:
        """[n, H, 2W, 3] uint8: ground truth | prediction, each blended over the source image where
        the dataset is still at the path the cache recorded, else on grey."""
        masks = self.val_split.read_rows(self.samples)[1]
        with torch.no_grad():
            pred = self.logits_of(self.samples, masks.shape[-2:]).argmax(1).cpu().numpy()
        images = self._source_images(masks.shape[-2:])
        out = []
        for i in range(len(self.samples)):
            base = images[i] if images[i] is not None else np.full((*masks.shape[-2:], 3), 128, np.uint8)
            panels = [self._blend(base, masks[i]), self._blend(base, pred[i])]
            out.append(np.concatenate(panels, axis=1))
        return np.stack(out)

    def _blend(self, image: np.ndarray, ids: np.ndarray) -> np.ndarray:
        color = self.palette[np.minimum(ids, len(self.palette) - 1)]
        color[ids == 255] = image[ids == 255]
        return ((image.astype(np.uint16) + color) // 2).astype(np.uint8)

    def _source_images(self, size) -> list[Optional[np.ndarray]]:
        if self._images is None:
            from seg.cache import format as cf
            from seg.data.augment import Augmenter
            from seg.data.decode import read_image

            m = self.val_split.manifest
            data_dir = m["splits"][self.val_split.name]["data_dir"]
            self._images = []
            resize = Augmenter("none", (size[1], size[0]))
            for k in self.samples:
                name, _ = self.val_split.sample_info(int(k))
                path = cf.source_files(cf.layout_of(m), data_dir, self.val_split.name, name)[0]
                try:
                    # resized as the cache's masks were (its resize-only augmenter)
                    self._images.append(resize(read_image(path), None, name, 0)[0])
                except (SegError, OSError):
                    self._images.append(None)
        return self._images
