"""`seg demo`: the whole pipeline on a generated dataset, through the real commands' code paths."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from seg.backbones import load_backbone
from seg.data.augment import parse_size
from seg.runtime.errors import SegError
from seg.runtime.output import Output
from seg.evaluate import EvalOptions, evaluate
from seg.extract_features import ExtractConfig, extract
from seg.predict import PredictOptions, predict
from seg.train.presets import resolve
from seg.data.synthetic import LAYOUT, write_dataset
from seg.train_head import RunOptions, train


@dataclass
class DemoOptions:
    out: str = "seg-demo"
    train_images: int = 48
    epochs: int = 12
    size: str = "322x182"
    aug_seeds: int = 2
    random_init: bool = False      # skip the attempt to use the official weights
    device: str = "auto"
    progress: bool = True


def official_or_random(random_init: bool, log: Callable[[str], None]) -> bool:
    """True when random weights must be used: the official ViT-S/14 is neither cached nor downloadable."""
    if random_init:
        return True
    try:
        load_backbone("vits14")
        return False
    except SegError as exc:
        log(f"NOTICE: official DINOv2 ViT-S/14 weights unavailable ({str(exc).split(';')[0]}).")
        log("NOTICE: the demo continues with RANDOM backbone weights: the pipeline is the same, the scores are "
            "lower than with DINOv2 features.")
        return True


DEMO_PARTS = ("data", "cache", "run", "predictions")


def demo_output(out: Path) -> Output:
    """The claim on the demo folder: it holds the demo's four parts, each claimed again by the
    command that fills it."""
    return Output(out, "demo", lambda rel: "/" in rel and rel.partition("/")[0] in DEMO_PARTS, ".seg-demo.lock",
                  what="demo")


def run_demo(opts: DemoOptions, log: Callable[[str], None] = print) -> dict:
    out = Path(opts.out)
    parse_size(opts.size, 14)  # a size the backbone cannot take is refused before anything is made
    with demo_output(out):
        if (out / "run" / "last.pt").exists():
            raise SegError(f"{out}: holds a finished demo; choose another --out or delete it")
        return _run_demo(opts, out, log)


def _run_demo(opts: DemoOptions, out: Path, log: Callable[[str], None]) -> dict:
    t0 = time.perf_counter()
    n_eval = max(4, opts.train_images // 4)
    data = out / "data"
    log(f"[1/5] generating a procedural Falcon-layout dataset in {data} "
        f"({opts.train_images} train, {n_eval} val, {n_eval} test; 960x540, uint16 raw masks)")
    write_dataset(data, {"train": opts.train_images, "val": n_eval, "test": n_eval})
    random_init = official_or_random(opts.random_init, log)

    log(f"[2/5] seg extract: vits14 @ {opts.size}, phase3 augmentation x {opts.aug_seeds} seeds")
    summary = extract(ExtractConfig(data=str(data), out=str(out / "cache"), backbone="vits14", size=opts.size,
                                    random_init=random_init, aug_policy="phase3", aug_seeds=opts.aug_seeds,
                                    splits=("train", "val", "test"), batch_size=8, device=opts.device,
                                    progress=opts.progress), log=log)
    for line in summary.lines:
        log("      " + line)

    log(f"[3/5] seg train-head: phase-3 recipe (UPerNet head, focal + 0.5 dice, AdamW, warmup + cosine), "
        f"{opts.epochs} epochs")
    cfg = resolve(3, {"backbone": "vits14", "size": opts.size, "epochs": opts.epochs, "warmup_epochs": 1,
                      "lr": 1e-3, "batch_size": 4, "accum": 1, "patience": 0})
    train(cfg, str(out / "cache"), str(out / "run"), RunOptions(device=opts.device, progress=opts.progress), log=log)

    log("[4/5] seg eval on the test split (from the cache)")
    result = evaluate(EvalOptions(run=str(out / "run"), cache=str(out / "cache"), split="test",
                                  device=opts.device, progress=opts.progress), log=log)

    log("[5/5] seg predict on the test images")
    pred = predict(PredictOptions(run=str(out / "run"), images=[str(data / LAYOUT["test"] / "Color_Images")],
                                  out=str(out / "predictions"), device=opts.device, progress=opts.progress,
                                  overlay_legend=True), log=log)
    seconds = time.perf_counter() - t0
    log("")
    log(f"demo finished in {seconds:.0f} s ({'RANDOM' if random_init else 'official DINOv2'} backbone weights)")
    log(f"  test mIoU {result['miou']:.4f} (chance is about {1 / 10:.2f})")
    log(f"  training curves   {out / 'run' / 'curves.png'}")
    log(f"  per-class IoU     {Path(result['out']) / 'per_class_iou.png'}")
    log(f"  confusion matrix  {Path(result['out']) / 'confusion.png'}")
    log(f"  overlays          {Path(pred['out']) / 'overlay'}  (with a legend strip; and compare/: image | truth | "
        "prediction, titled)")
    log(f"  legend            {Path(pred['out']) / 'legend.png'}  (which colour is which class)")
    return {"miou": result["miou"], "seconds": seconds, "random_init": random_init, "eval": result}
