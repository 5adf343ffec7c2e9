"""Logs and Rocks IoU with uniform vs rare-class sampling, without and with
copy-paste, at equal epochs, 3 head seeds each, on the procedural dataset.

    python benchmarks/rare_classes.py --json benchmarks/rare-classes-2core-cpu.json

Procedural data and a random-weight backbone: this measures what the data-level methods do for a
head on rare, thin classes, not what they do for DINOv2 features on the real dataset.
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
    ap.add_argument("--train-images", type=int, default=48, help="generated train images")
    ap.add_argument("--epochs", type=int, default=12, help="head training epochs per run")
    ap.add_argument("--seeds", type=int, default=3, help="head seeds per configuration")
    ap.add_argument("--size", default="322x182", help="backbone input size")
    ap.add_argument("--aug-seeds", type=int, default=2, help="cached augmented draws per train image")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    from seg.evaluate import EvalOptions, evaluate
    from seg.extract_features import ExtractConfig, extract
    from seg.train.presets import resolve
    from seg.data.synthetic import write_dataset
    from seg.train_head import RunOptions, train

    work = Path(args.work or tempfile.mkdtemp(prefix="seg-rare-"))
    quiet = dict(log=lambda s: None)
    data = write_dataset(work / "data", {"train": args.train_images, "val": 8, "test": 12}, seed=7)
    caches = {}
    for name, paste in (("plain", None), ("copy-paste", "auto")):
        out = work / f"cache-{name}"
        t0 = time.perf_counter()
        extract(ExtractConfig(data=str(data), out=str(out), backbone="vits14", size=args.size, random_init=True,
                              aug_policy="phase3", aug_seeds=args.aug_seeds, splits=("train", "val", "test"),
                              batch_size=4, copy_paste=paste, progress=False), **quiet)
        caches[name] = out
        print(f"extracted {name} cache in {time.perf_counter() - t0:.0f} s", flush=True)
    manifest = json.loads((caches["copy-paste"] / "manifest.json").read_text())
    pasted = manifest["augmentation"]["copy_paste"]["class_names"]

    results = []
    for cache_name, sampling in (("plain", "uniform"), ("plain", "rare-class"), ("copy-paste", "uniform"),
                                 ("copy-paste", "rare-class")):
        for seed in range(args.seeds):
            run = work / f"run-{cache_name}-{sampling}-{seed}"
            cfg = resolve(3, {"backbone": "vits14", "size": args.size, "epochs": args.epochs, "warmup_epochs": 1,
                              "patience": 0, "seed": seed, "sampling": sampling})
            t0 = time.perf_counter()
            train(cfg, str(caches[cache_name]), str(run), RunOptions(device="cpu", progress=False), **quiet)
            res = evaluate(EvalOptions(run=str(run), split="test", cache=str(caches[cache_name]), progress=False),
                           **quiet)
            names = res["class_names"]
            row = {"cache": cache_name, "sampling": sampling, "seed": seed, "miou": res["miou"],
                   "seconds": time.perf_counter() - t0,
                   **{n: res["iou"][names.index(n)] for n in ("Logs", "Rocks")}}
            results.append(row)
            print(json.dumps(row), flush=True)

    print(f"\ncopy-paste classes (auto: under 1 % of train pixels): {', '.join(pasted)}")
    print("| cache | sampling | Logs IoU | Rocks IoU | test mIoU |")
    print("|---|---|---|---|---|")
    summary = []
    for cache_name, sampling in dict.fromkeys((r["cache"], r["sampling"]) for r in results):
        rows = [r for r in results if (r["cache"], r["sampling"]) == (cache_name, sampling)]
        cells = {}
        for key in ("Logs", "Rocks", "miou"):
            vals = [r[key] for r in rows]
            cells[key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        summary.append({"cache": cache_name, "sampling": sampling, **{k: list(v) for k, v in cells.items()}})
        print(f"| {cache_name} | {sampling} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"pasted_classes": pasted, "args": vars(args), "runs": results,
                                               "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
