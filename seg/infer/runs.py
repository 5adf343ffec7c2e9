"""A trained run on disk: its head, class table, and the exact backbone its cache was built with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from seg.backbones import build_backbone
from seg.backbones.named import BACKBONES, backbone_kwargs
from seg.backbones.tail import BackboneTail
from seg.runtime.checkpoint import check_finite_head, load_torch_file
from seg.data.classes import ClassTable
from seg.runtime.device import run_amp_dtype
from seg.runtime.errors import SegError
from seg.heads import TunedHead, build_head
from seg.train.model import pmt_shape
from seg.train.presets import with_legacy_fields

# Fields of the backbone record that must agree between a run and a cache it is evaluated on.
FEATURE_FIELDS = ("backbone", "weights_sha256", "weights_fingerprint", "size", "layers", "layer_norm",
                  "normalize", "resize", "token_shape", "tap_block")


@dataclass
class Run:
    path: Path
    record: dict                 # what best.pt holds besides the weights
    head: nn.Module
    class_table: ClassTable

    @property
    def backbone(self) -> dict:
        return self.record["backbone"]

    @property
    def size(self) -> tuple[int, int]:
        s = self.backbone["size"]
        return s["width"], s["height"]

    @property
    def tap_block(self) -> Optional[int]:
        """Where the run's tuned blocks start (its head is a TunedHead), or None for a frozen run."""
        return self.backbone.get("tap_block")

    def amp_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        """The head's autocast dtype on `device`: the one it trained in, where the device has it."""
        return run_amp_dtype(bool(self.record["config"]["amp"]), self.record.get("amp_dtype"), device)

    @property
    def levels(self) -> bool:
        """The head is a mask decoder: it reads packed levels, prefix tokens included."""
        return self.record["config"].get("head") == "pmt"

    @property
    def grid(self) -> Optional[tuple[int, int]]:
        """The patch grid (Hp, Wp) tap tokens of the run's size lie on; None for a frozen run."""
        if self.tap_block is None:
            return None
        w, h = self.size
        return h // self.backbone["patch_size"], w // self.backbone["patch_size"]


def load_run(run_dir: str | Path, device: torch.device) -> Run:
    path = Path(run_dir)
    best = path / "best.pt"
    if not best.is_file():
        raise SegError(f"{path}: no best.pt (not a run directory, or training has not finished an epoch)")
    record = load_torch_file(best, what="unreadable checkpoint")
    needed = {"head", "config", "class_table", "in_channels", "backbone"}
    if not isinstance(record, dict) or not needed <= set(record):
        raise SegError(f"{best}: not a seg checkpoint (needs {', '.join(sorted(needed))})")
    table = ClassTable.from_json(record["class_table"], source=str(best))
    check_backbone_record(record["backbone"], best)
    check_finite_head(record["head"], best)
    try:
        head = build_run_head(record, table.num_classes)
        head.load_state_dict(record.pop("head"))
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise SegError(f"{best}: its head weights do not fit its recorded head ({str(exc).splitlines()[0][:160]})") from None
    head.to(device).eval().requires_grad_(False)
    return Run(path, record, head, table)


def check_backbone_record(bb, best: Path) -> None:
    """The backbone record a run keeps (what eval and predict rebuild the features from) must describe a
    backbone seg knows, at a size its patches tile: one line naming best.pt and the field otherwise."""
    def bad(field: str, problem: str) -> SegError:
        return SegError(f"{best}: its backbone record's {field!r} {problem}; the file was edited or damaged: "
                        "retrain the run or restore the file")

    if not isinstance(bb, dict):
        raise bad("backbone", "is missing")
    name = bb.get("backbone")
    if name not in BACKBONES:
        raise bad("backbone", f"names no known backbone ({name!r})")
    kwargs = backbone_kwargs(name)
    patch, depth = kwargs["patch_size"], kwargs["depth"]
    if bb.get("patch_size") != patch:
        raise bad("patch_size", f"is {bb.get('patch_size')!r}, not {name}'s {patch}")
    size = bb.get("size")
    if not (isinstance(size, dict) and all(isinstance(size.get(k), int) and size[k] > 0 and size[k] % patch == 0
                                           for k in ("width", "height"))):
        raise bad("size", f"is {size!r}, not a width and height in multiples of {patch}")
    tap = bb.get("tap_block")
    if tap is not None and not (isinstance(tap, int) and 0 <= tap < depth):
        raise bad("tap_block", f"is {tap!r}, not a block of {name} (0..{depth - 1})")
    layers = bb.get("layers")
    if not (isinstance(layers, list) and all(isinstance(i, int) and 0 <= i < depth for i in layers)
            and (layers or tap is not None)):
        raise bad("layers", f"is {layers!r}, not blocks of {name} (0..{depth - 1})")


def build_run_head(record: dict, num_classes: int) -> nn.Module:
    """The run's head, untrained: for a tuned run, its backbone's tail blocks in front of it (built
    from the architecture alone; best.pt holds the tuned weights)."""
    bb = record["backbone"]
    tap = bb.get("tap_block")
    config = with_legacy_fields(record["config"])
    if tap is None:
        return build_head(config["head"], record["in_channels"], num_classes, layers=bb["token_shape"][0],
                          ms_fusion=config["ms_fusion"], pmt=pmt_shape(config, bb))
    head = build_head(record["config"]["head"], record["in_channels"], num_classes)
    return TunedHead(BackboneTail(build_backbone(bb["backbone"]), tap), head)


def check_cache_compatible(run: Run, manifest: dict, cache_dir: str | Path) -> None:
    """A cache must hold the features the head was trained on, with the same classes."""
    if manifest["class_table"] != run.record["class_table"]:
        raise SegError(f"{cache_dir}: its class table differs from the run's ({run.path}); "
                       "evaluate on a cache extracted with the same --classes")
    diffs = [k for k in FEATURE_FIELDS if manifest.get(k) != run.backbone.get(k)]
    if diffs:
        raise SegError(f"{cache_dir}: built with other features than the run {run.path} was trained on "
                       f"(differs in {', '.join(diffs)}: cache {manifest.get(diffs[0])!r} vs run "
                       f"{run.backbone.get(diffs[0])!r})")
