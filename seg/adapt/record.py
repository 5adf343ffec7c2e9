"""What both modes of `seg adapt` share: the output folder's contract, adapt.json (resumed only with
the same settings), and how a model is measured for the guard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from seg.adapt.pseudo_label import split_predictions
from seg.cache import FeatureCache
from seg.infer.runs import load_run
from seg.runtime.atomic import write_json, write_text
from seg.runtime.errors import SegError
from seg.runtime.output import Output
from seg.scoring.metrics import confusion_matrix, summarize

RECORD, TABLE, LOCK = "adapt.json", "adapt.txt", ".seg-adapt.lock"
STEP = re.compile(r"round-[0-9]+|student")  # the folders of the rounds, or of the on-line student
MODES = ("rounds", "online")


def adapt_output(out: Path) -> Output:
    """seg adapt owns adapt.json, adapt.txt and its step folders, once adapt.json vouches for them."""
    try:
        vouched = json.loads((out / RECORD).read_text()).get("mode") in MODES
    except (OSError, ValueError, AttributeError):
        vouched = False
    owns = lambda rel: vouched and (rel in (RECORD, TABLE) or STEP.fullmatch(rel.split("/")[0]) is not None)  # noqa: E731
    return Output(out, "adapt", owns, LOCK, what="adaptation")


def load_state(out: Path, mode: str, settings: dict, fresh: dict) -> dict:
    """adapt.json as left by an earlier start (resume), checked to be the same adaptation; else `fresh`."""
    path = out / RECORD
    if not path.exists():
        return {"mode": mode, "settings": settings, **fresh}
    state = json.loads(path.read_text())
    if state.get("mode") != mode:
        raise SegError(f"{out}: holds an adaptation in {state.get('mode')} mode, not {mode}; choose another --out")
    if state.get("settings") != settings:
        differ = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
        raise SegError(f"{out}: holds an adaptation with other settings (differs in {', '.join(differ)}); "
                       "choose another --out")
    return state


def save_state(out: Path, state: dict, table: Callable[[dict], list[str]]) -> None:
    write_json(out / RECORD, state)
    write_text(out / TABLE, "\n".join(table(state)) + "\n")


def prediction_summary(logits: Iterable[torch.Tensor], k: int) -> dict:
    """Mean confidence (max softmax) and the share of pixels predicted as each class, over batches
    of logits [B, K, H, W]."""
    total, counts = 0.0, None
    for batch in logits:
        conf, pred = batch.softmax(1).max(1)
        total += float(conf.double().sum())
        seen = torch.bincount(pred.flatten(), minlength=k).double()
        counts = seen if counts is None else counts + seen
    pixels = float(counts.sum())
    return {"confidence": total / pixels, "shares": (counts / pixels).tolist()}


def measure(run_dir: str | Path, cache: FeatureCache, target: Optional[str], device: torch.device,
            twin: Optional[str] = None) -> dict:
    """A model as the guard judges it, from one load: its mIoU on the cache's labelled val split
    (seed 0), and with a target split its mean confidence and the share of the pixels predicted as
    each class over every pixel of every cached view of it (with `twin`, under flip TTA, as its
    teacher's pseudo-labels were made)."""
    run = load_run(run_dir, device)
    k = run.class_table.num_classes
    val = cache.split("val")
    start = val.seeds.index(0) * len(val.images)
    cm = torch.zeros(k, k, dtype=torch.int64, device=device)
    for _, logits, masks in split_predictions(run, val, device, 8, samples=range(start, start + len(val.images))):
        cm += confusion_matrix(logits.argmax(1), masks, k)
    seen = {"val_miou": float(summarize(cm, list(run.class_table.names))["miou"])}
    if target is None:
        return seen
    views = split_predictions(run, cache.split(target), device, 8, twin=cache.split(twin) if twin else None)
    return {**seen, **prediction_summary((logits for _, logits, _ in views), k)}
