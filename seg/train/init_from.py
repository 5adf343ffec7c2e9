"""Continuing a finished run: a new run whose head starts from another run's best.pt weights, with a
fresh optimizer and its own LR schedule from epoch 1 (a cosine schedule planned for N epochs cannot
be stretched to M without changing the learning rates of epochs already trained)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from torch import nn

from seg.backbones.named import file_sha256
from seg.runtime.checkpoint import check_finite_head, load_torch_file
from seg.runtime.errors import SegError
from seg.train.init_from_pmt import init_head_from_pmt

# What the old run's features and head must share with the new run's for its weights to mean the same
BACKBONE_FIELDS = ("backbone", "weights_sha256", "size", "layers", "layer_norm", "token_shape", "tap_block")


def same_classes(a: dict, b: dict) -> bool:
    """Two class tables that give every class the same id, name, mask values and colour: they may
    differ only in the values they ignore (a target domain's masks hold other unlabelled values)."""
    def key(table: dict) -> list:
        return [(c["id"], c["name"], sorted(c["values"]), list(c["color"])) for c in table["classes"]]
    return key(a) == key(b)


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
    if not same_classes(old["class_table"], record["class_table"]):
        raise SegError(f"{best}: trained on other classes than this cache's (ids, names or mask values differ); "
                       "--init-from needs the same classes (the values a table ignores may differ)")
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


def starting_point(head: nn.Module, init_from: Optional[str], init_from_pmt: Optional[str],
                   config_source: Optional[dict], saved: Optional[dict], record: dict,
                   log: Callable[[str], None]) -> dict:
    """Where a run's settings and starting weights came from: this run's options (loading the weights
    into `head`), else on resume what the run recorded when it started."""
    saved_origin = saved or {}
    origin = {"config_source": config_source or saved_origin.get("config_source"),
              "init_from": saved_origin.get("init_from")}
    if saved is not None:
        return origin
    if init_from_pmt:
        if record["config"]["head"] != "pmt" or init_from:
            raise SegError("--init-from-pmt starts a pmt head (--head pmt), and replaces --init-from")
        origin["init_from"] = init_head_from_pmt(head, init_from_pmt)
        log(f"decoder initialised from {init_from_pmt} (class head {origin['init_from']['class_head']})")
    elif init_from:
        origin["init_from"] = init_head_from(head, init_from, record)
        log(f"head initialised from {init_from}/best.pt (epoch {origin['init_from']['epoch']}, val "
            f"mIoU {origin['init_from']['val_miou']:.4f}); the optimizer and the LR schedule start again at epoch 1")
    return origin
