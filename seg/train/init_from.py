"""Continuing a finished run: a new run whose head starts from another run's best.pt weights, with a
fresh optimizer and its own LR schedule from epoch 1 (a cosine schedule planned for N epochs cannot
be stretched to M without changing the learning rates of epochs already trained)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from seg.backbones.named import file_sha256
from seg.runtime.checkpoint import check_finite_head, load_torch_file
from seg.runtime.errors import SegError

# What the old run's features and head must share with the new run's for its weights to mean the same
BACKBONE_FIELDS = ("backbone", "weights_sha256", "size", "layers", "layer_norm", "token_shape", "tap_block")


def init_head_from(head: nn.Module, run_dir: str | Path, record: dict) -> dict:
    """Load `run_dir`/best.pt's head weights into `head` after checking they were trained on the same
    features and classes with the same head; `record` is the new run's record. Returns what the new
    run records of its origin."""
    best = Path(run_dir) / "best.pt"
    if not best.is_file():
        raise SegError(f"{run_dir}: no best.pt to initialise from (--init-from takes a run folder)")
    old = load_torch_file(best, what="unreadable checkpoint; cannot initialise from it")
    if not isinstance(old, dict) or not {"head", "config", "backbone", "class_table"} <= set(old):
        raise SegError(f"{best}: not a seg run checkpoint")
    check_finite_head(old["head"], best)
    if old["class_table"] != record["class_table"]:
        raise SegError(f"{best}: trained on other classes than this cache's; --init-from needs the same class table")
    for key in BACKBONE_FIELDS:
        if old["backbone"].get(key) != record["backbone"].get(key):
            raise SegError(f"{best}: trained on other features (differs in {key}: {old['backbone'].get(key)!r} vs "
                           f"{record['backbone'].get(key)!r}); --init-from needs a cache of the same features")
    for key in ("head", "ms_fusion"):
        if old["config"].get(key) != record["config"].get(key):
            raise SegError(f"{best}: a {old['config'].get(key)} {key.replace('_', ' ')}, this run builds "
                           f"{record['config'].get(key)}; pass --{key.replace('_', '-')} {old['config'].get(key)}")
    try:
        head.load_state_dict(old["head"])
    except RuntimeError as exc:
        raise SegError(f"{best}: its head weights do not fit this run's head ({str(exc).splitlines()[0][:160]})") from None
    return {"run": str(Path(run_dir).resolve()), "best_pt_sha256": file_sha256(best),
            "epoch": old.get("epoch"), "val_miou": old.get("val_miou")}
