"""A 12-trial sweep on one cache against the same 12 trials trained one-stage (the frozen backbone
run on every training and validation sample of every epoch), in one run on this machine.

    python benchmarks/sweep_vs_onestage.py --json benchmarks/sweep-2core-cpu.json

The sweep is real (`seg sweep`: TPE, median pruning). The one-stage side is projected from
measurements taken in the same run: the backbone's forward time per image (batch 8, the cache's
precision) times the images every epoch of every trial would have pushed through it, added to the
head's own epoch times, which the trials recorded; pruned trials count the epochs they ran.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def backbone_seconds_per_image(name: str, size: str, n: int = 16, batch: int = 8) -> float:
    from seg.backbones import load_backbone
    from seg.backbones.features import backbone_features, cast_matmul_weights_
    from seg.data.augment import Augmenter
    from seg.data.normalize import normalize
    from seg.data.synthetic import make_scene
    from seg.runtime.device import half_dtype

    cpu = torch.device("cpu")
    model, _ = load_backbone(name, random_init=True, seed=0)
    dtype = half_dtype(cpu)
    cast_matmul_weights_(model, dtype)
    w, h = (int(v) for v in size.split("x"))
    resize = Augmenter("none", (w, h))
    images = torch.from_numpy(np.stack([resize(make_scene(i)[0], None, "", 0)[0] for i in range(batch)]))
    with torch.inference_mode():
        backbone_features(model, normalize(images), [len(model.blocks) - 1], None, cpu, dtype)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n // batch):
            backbone_features(model, normalize(images), [len(model.blocks) - 1], None, cpu, dtype)
    return (time.perf_counter() - t0) / (n // batch * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--size", default="322x182")
    ap.add_argument("--backbone", default="vits14")
    ap.add_argument("--train-images", type=int, default=48)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from seg.data.synthetic import write_dataset
    from seg.experiments.study import SweepOptions, sweep
    from seg.extract_features import ExtractConfig, extract
    from seg.train_head import RunOptions

    work = Path(args.work or tempfile.mkdtemp(prefix="seg-sweep-"))
    data = write_dataset(work / "data", {"train": args.train_images, "val": 12, "test": 0}, seed=3)
    t0 = time.perf_counter()
    extract(ExtractConfig(data=str(data), out=str(work / "cache"), backbone=args.backbone, size=args.size, random_init=True,
                          aug_policy="phase3", aug_seeds=2, splits=("train", "val"), batch_size=8, progress=False),
            log=lambda s: None)
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = sweep(SweepOptions(cache=str(work / "cache"), out=str(work / "sweep"), trials=args.trials,
                                 search=("lr=1e-4:3e-3:log", "focal-gamma=1:3", "head=convnext,upernet"), phase=3,
                                 fixed={"epochs": args.epochs, "warmup_epochs": 1, "patience": 0, "batch_size": 4,
                                        "accum": 1, "backbone": args.backbone, "size": args.size},
                                 run=RunOptions(device="cpu", preload="always"), seed=0), log=print)
    sweep_s = time.perf_counter() - t0
    per_image = backbone_seconds_per_image(args.backbone, args.size)
    head_s, epochs_run = 0.0, 0
    for t in summary["trials"]:
        history = json.loads((work / "sweep" / t["run_dir"] / "history.json").read_text())
        head_s += sum(h["seconds"] for h in history)
        epochs_run += len(history)
    images_per_epoch = args.train_images + 12  # one cached view per train image, then val
    onestage_s = head_s + epochs_run * images_per_epoch * per_image
    rows = {"trials": args.trials, "epochs_per_trial": args.epochs, "epochs_run": epochs_run,
            "pruned": summary["counts"]["pruned"], "extract_s": extract_s, "sweep_wall_s": sweep_s,
            "two_stage_total_s": extract_s + sweep_s, "head_epochs_s": head_s,
            "backbone_s_per_image": per_image, "onestage_projected_s": onestage_s,
            "speedup": onestage_s / (extract_s + sweep_s), "best_val_miou": summary["best"]["value"]}
    for k, v in rows.items():
        print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")
    if args.json:
        path = Path(args.json)
        runs = json.loads(path.read_text())["runs"] if path.is_file() else []
        runs = [r for r in runs if (r["backbone"], r["size"]) != (args.backbone, args.size)]
        runs.append({"backbone": args.backbone, "size": args.size, **rows})
        path.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "runs": runs},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
