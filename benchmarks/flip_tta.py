"""Does the teacher's flip TTA (`extract --flip-views`, `pseudo-label --tta flip`) make better
pseudo-labels? The shifted synthetic deserts of adapt_shift.py: a source model per seed labels each
target's 24 unlabeled images with and without the mirrored views, and the labels of the plain views
(seed 0) are scored against the held-back true masks: at portion 0.5 (CBST's default) the coverage
and the accuracy of the kept labels, at portion 1 (every pixel kept) the labels' mIoU.

    python benchmarks/flip_tta.py --json benchmarks/flip-tta-2core-cpu.json

Random-weight ViT-S/14 features, as in adapt_shift.py: the method's effect on a weak teacher.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt_shift import SIZE, write_target  # noqa: E402  (the same targets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from seg.adapt.pseudo_label import PseudoOptions, pseudo_label
    from seg.data.classes import default_class_table
    from seg.data.decode import MaskDecoder
    from seg.data.synthetic import write_dataset
    from seg.extract_features import ExtractConfig, extract
    from seg.scoring.metrics import confusion_matrix, summarize
    from seg.train.presets import resolve
    from seg.train_head import RunOptions, train

    import torch

    quiet = dict(log=lambda s: None)
    work = Path(args.work or tempfile.mkdtemp(prefix="seg-flip-"))
    common = dict(backbone="vits14", size=SIZE, random_init=True, aug_policy="phase3", aug_seeds=2, batch_size=8,
                  progress=False)
    src = write_dataset(work / "source", {"train": 40, "val": 8}, seed=7)
    cache = work / "cache"
    extract(ExtractConfig(data=str(src), out=str(cache), **common), **quiet)
    truth = {}
    table = default_class_table()
    decoder = MaskDecoder.of(table)
    w, h = (int(v) for v in SIZE.split("x"))
    for kind in ("light", "blur"):
        root = write_target(work / f"target-{kind}", kind, {"train": 24})
        base = root / "Offroad_Segmentation_Training_Dataset" / "train"
        extract(ExtractConfig(data=str(src), out=str(cache), unlabeled=(f"{kind}={base / 'Color_Images'}",),
                              flip_views=True, **common), **quiet)
        names = json.loads((cache / "manifest.json").read_text())["splits"][kind]["images"]
        truth[kind] = np.stack([cv2.resize(decoder.read(base / "Segmentation" / n), (w, h),
                                           interpolation=cv2.INTER_NEAREST) for n in names])

    def score(folder: Path, kind: str) -> dict:
        record = json.loads((folder / "pseudo.json").read_text())
        labels = np.load(folder / "masks.npy")[:len(truth[kind])]  # seed 0: the plain views, in image order
        kept = labels != 255
        scored = kept & (truth[kind] != 255)  # a pixel the truth ignores scores nothing
        cm = confusion_matrix(torch.from_numpy(labels[scored]).long(), torch.from_numpy(truth[kind][scored]).long(),
                              table.num_classes)
        return {"coverage": float(kept.mean()), "accuracy": float((labels[scored] == truth[kind][scored]).mean()),
                "miou": float(summarize(cm, list(table.names))["miou"]), "method": record["method"]["tta"]}

    rows = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        run = work / f"seed{seed}" / "source"
        train(resolve(2, {"epochs": args.epochs, "patience": 0, "seed": seed}), str(cache), str(run),
              RunOptions(device="cpu", progress=False), **quiet)
        for kind in truth:
            for portion in (0.5, 1.0):
                row = {"seed": seed, "target": kind, "portion": portion}
                for tta in ("none", "flip"):
                    out = work / f"seed{seed}" / f"{kind}-{portion}-{tta}"
                    pseudo_label(PseudoOptions(run=str(run), cache=str(cache), split=kind, out=str(out),
                                               portion=portion, device="cpu", progress=False, tta=tta), **quiet)
                    row[tta] = score(out, kind)
                rows.append(row)
                print(json.dumps(row), flush=True)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    def ms(values):
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"

    print("\n| target | portion | measure | no TTA | flip TTA | difference (flip - none), per seed |")
    print("|---|---|---|---|---|---|")
    for kind in truth:
        for portion, measures in ((0.5, ("coverage", "accuracy")), (1.0, ("miou",))):
            mine = [r for r in rows if r["target"] == kind and r["portion"] == portion]
            for m in measures:
                a, b = [r["none"][m] for r in mine], [r["flip"][m] for r in mine]
                print(f"| {kind} | {portion:g} | {m} | {ms(a)} | {ms(b)} | "
                      + ", ".join(f"{y - x:+.3f}" for x, y in zip(a, b)) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
