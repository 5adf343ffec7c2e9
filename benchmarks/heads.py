"""Per-class IoU (Logs and Rocks above all) of the published UPerNet head
against DINOv2's linear head (1 and 4 layers) and the multi-level upernet-ms head, at equal epochs,
3 head seeds each, with head training speed, on the procedural dataset.

    python benchmarks/heads.py --json benchmarks/heads-2core-cpu.json

Procedural data and a random-weight backbone: this measures the heads' spatial resolution on thin,
rare objects, not DINOv2 features.
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
    ap.add_argument("--train-images", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--size", default="322x182")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="Only the configurations of these heads (e.g. upernet-ms or upernet,pmt).")
    ap.add_argument("--label", default=None, help="Only the configurations whose label holds this (e.g. reduce).")
    args = ap.parse_args()

    from seg.evaluate import EvalOptions, evaluate
    from seg.extract_features import ExtractConfig, extract
    from seg.train.presets import resolve
    from seg.data.synthetic import write_dataset
    from seg.train_head import RunOptions, train

    work = Path(args.work or tempfile.mkdtemp(prefix="seg-heads-"))
    quiet = dict(log=lambda s: None)
    data = write_dataset(work / "data", {"train": args.train_images, "val": 8, "test": 12}, seed=7)
    caches = {}
    only = set(args.only.split(",")) if args.only else None
    for layers in (("2,5,8,11",) if only and not only & {"upernet", "linear"} else ("1", "2,5,8,11")):
        out = work / f"cache-{layers.replace(',', '-')}"
        extract(ExtractConfig(data=str(data), out=str(out), backbone="vits14", size=args.size, random_init=True,
                              aug_policy="phase3", aug_seeds=2, splits=("train", "val", "test"), layers=layers,
                              batch_size=4, progress=False), **quiet)
        caches[layers] = out
    configs = [("upernet (published)", "upernet", "1", 3e-4, {}), ("linear, last layer", "linear", "1", 1e-3, {}),
               ("linear, 4 layers", "linear", "2,5,8,11", 1e-3, {}),
               ("upernet-ms, 4 layers (reduce fusion)", "upernet-ms", "2,5,8,11", 3e-4, {"ms_fusion": "reduce"}),
               ("upernet-ms, 4 layers (full fusion)", "upernet-ms", "2,5,8,11", 3e-4, {"ms_fusion": "full"}),
               # PMT's recipe (lr 2e-4, per-step warmup-cosine, clipping, 100 queries, 6 blocks, annealing)
               # at the others' effective batch of 4 samples per step: batch 16 would leave it 3 steps an epoch
               ("pmt, 4 layers (PMT recipe, batch 2 x accum 2)", "pmt", "2,5,8,11", 2e-4,
                {"batch_size": 2, "accum": 2})]
    if only:
        configs = [c for c in configs if c[1] in only]
    if args.label:
        configs = [c for c in configs if args.label in c[0]]
    results = []
    for label, head, layers, lr, extra in configs:
        for seed in range(args.seeds):
            run = work / f"run-{head}-{layers.replace(',', '-')}-{'-'.join(map(str, extra.values()))}-{seed}"
            cfg = resolve(3, {"backbone": "vits14", "size": args.size, "epochs": args.epochs, "warmup_epochs": 1,
                              "patience": 0, "seed": seed, "head": head, "lr": lr, **extra})
            t0 = time.perf_counter()
            train(cfg, str(caches[layers]), str(run), RunOptions(device="cpu", progress=False, allow_mismatch=True),
                  **quiet)
            history = json.loads((run / "history.json").read_text())
            res = evaluate(EvalOptions(run=str(run), split="test", cache=str(caches[layers]), progress=False), **quiet)
            names = res["class_names"]
            row = {"config": label, "seed": seed, "miou": res["miou"], "seconds": time.perf_counter() - t0,
                   "train_samples_per_s": statistics.median(h["samples_per_s"] for h in history),
                   **{n: res["iou"][names.index(n)] for n in names}}
            results.append(row)
            print(json.dumps({k: row[k] for k in ("config", "seed", "miou", "Logs", "Rocks", "train_samples_per_s")}),
                  flush=True)
    print("\n| head | Logs IoU | Rocks IoU | Ground Clutter IoU | test mIoU | train samples/s |")
    print("|---|---|---|---|---|---|")
    summary = []
    for label, *_rest in configs:
        rows = [r for r in results if r["config"] == label]
        cells = {}
        for key in ("Logs", "Rocks", "Ground Clutter", "miou", "train_samples_per_s"):
            vals = [r[key] for r in rows]
            cells[key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        summary.append({"config": label, **{k: list(v) for k, v in cells.items()}})
        print(f"| {label} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in list(cells.values())[:4])
              + f" | {cells['train_samples_per_s'][0]:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
