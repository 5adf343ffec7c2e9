"""Augmented views per image: val and test mIoU of the same head trained on caches holding K = 1, 2,
4 and 8 augmented draws of each train image (phase-2 policy and preset, equal epochs and steps), 3 head
seeds each, with the extraction time and cache size each K costs.

    python benchmarks/aug_seeds.py --json benchmarks/aug-seeds-2core-cpu.json

The published runs drew a fresh augmentation every epoch; a cache holds K draws and each epoch picks
one of them per image. Procedural data and a random-weight backbone: this measures what the number of
distinct views does to a head that can overfit, not DINOv2 features.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-images", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--size", default="322x182")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from seg.evaluate import EvalOptions, evaluate
    from seg.extract_features import ExtractConfig, extract
    from seg.train.presets import resolve
    from seg.data.synthetic import write_dataset
    from seg.train_head import RunOptions, train

    work = Path(args.work or tempfile.mkdtemp(prefix="seg-aug-seeds-"))
    quiet = dict(log=lambda s: None)
    data = write_dataset(work / "data", {"train": args.train_images, "val": 8, "test": 12}, seed=7)
    ks = [int(k) for k in args.ks.split(",")]
    results, caches = [], {}
    for k in ks:
        out = work / f"cache-k{k}"
        t0 = time.perf_counter()
        s = extract(ExtractConfig(data=str(data), out=str(out), backbone="vits14", size=args.size, random_init=True,
                                  aug_policy="phase2", aug_seeds=k, splits=("train", "val", "test"), batch_size=4,
                                  progress=False), **quiet)
        caches[k] = {"seconds": time.perf_counter() - t0, "bytes": s.bytes_on_disk}
        for seed in range(args.seeds):
            run = work / f"run-k{k}-{seed}"
            cfg = resolve(2, {"backbone": "vits14", "size": args.size, "epochs": args.epochs, "patience": 0,
                              "seed": seed})
            train(cfg, str(out), str(run), RunOptions(device="cpu", progress=False), **quiet)
            history = json.loads((run / "history.json").read_text())
            test = evaluate(EvalOptions(run=str(run), split="test", cache=str(out), progress=False), **quiet)
            row = {"k": k, "seed": seed, "val_miou": max(h["val_miou"] for h in history), "test_miou": test["miou"],
                   "final_train_loss": history[-1]["train_loss"]}
            results.append(row)
            print(json.dumps(row), flush=True)
    print("\n| K views per image | val mIoU (best epoch) | test mIoU | final train loss | extraction s | cache MB |")
    print("|---|---|---|---|---|---|")
    summary = []
    for k in ks:
        rows = [r for r in results if r["k"] == k]
        cells = {key: (statistics.mean(r[key] for r in rows),
                       statistics.stdev(r[key] for r in rows) if len(rows) > 1 else 0.0)
                 for key in ("val_miou", "test_miou", "final_train_loss")}
        summary.append({"k": k, **{key: list(v) for key, v in cells.items()}, **caches[k]})
        print(f"| {k} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in cells.values())
              + f" | {caches[k]['seconds']:.1f} | {caches[k]['bytes'] / 1e6:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
