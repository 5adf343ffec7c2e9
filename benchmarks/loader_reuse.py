"""Streaming from the shards: one set of reader processes for the whole run against a DataLoader
built again every epoch (as before), under each multiprocessing start method (Linux defaults to
fork up to Python 3.13 and to forkserver from 3.14; spawn is what macOS and Windows use).

    python benchmarks/loader_reuse.py --json benchmarks/loader-reuse-2core-cpu.json

Reads only (no training step), so the figure is the loader's own cost per epoch: vitb14_reg @
644x364 token rows (1.84 MB each), warm page cache, batch 8, 2 reader processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def epochs_seconds(split, reuse: bool, epochs: int, workers: int, batch: int) -> list[float]:
    from seg.train.sources import StreamedSplit, batches_of, epoch_indices

    one = StreamedSplit(split, torch.device("cpu"), workers=workers)
    times = []
    for epoch in range(epochs):
        src = one if reuse else StreamedSplit(split, torch.device("cpu"), workers=workers)
        idx = epoch_indices(len(split.images), len(split.seeds), epoch, 0)
        t = time.perf_counter()
        for _ in src.batches(batches_of(idx, batch)):
            pass
        times.append(time.perf_counter() - t)
        if not reuse:
            src.close()
    one.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_pipeline import machine, random_token_cache
    from seg.cache import FeatureCache

    work = Path(tempfile.mkdtemp(prefix="seg-loader-"))
    cache = random_token_cache(work / "c", "vitb14_reg", "644x364", args.samples, 2)
    fc = FeatureCache(cache)
    fc.check_shards(["train"])  # as training does first
    split = fc.split("train")
    epochs_seconds(split, True, 1, 0, args.batch)  # warm the page cache
    rows = {}
    for method in ("fork", "forkserver", "spawn"):
        multiprocessing.set_start_method(method, force=True)
        for reuse in (False, True):
            t = epochs_seconds(split, reuse, args.epochs, args.workers, args.batch)
            name = f"{method}, {'one loader' if reuse else 'a loader per epoch'}"
            rows[name] = {"first_epoch_s": t[0], "later_epoch_median_s": statistics.median(t[1:]),
                          "total_s": sum(t)}
            print(f"{name:34s} first epoch {t[0]:.3f} s   later epochs median {statistics.median(t[1:]):.3f} s   "
                  f"{args.epochs} epochs {sum(t):.2f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
