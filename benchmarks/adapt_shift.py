"""Self-training on shifted synthetic deserts: does `seg adapt` help, and does its guard keep it from
hurting? A synthetic source desert; two target deserts, each with another look AND another class mix
(Rocks common, as in the Falcon test desert): "light" (warm colour cast, brighter, gamma) and "blur"
(Gaussian blur and sensor noise). Their true masks are held back for scoring only.

Per seed (3): a source-only model (phase-2 recipe); `seg adapt` on each target in both modes, guarded
and with the guard off (rounds: each round's student; online: the student after each epoch); an
oracle trained on the target's labels. Target mIoU on held-out labelled target images, from the cache.

    python benchmarks/adapt_shift.py --json benchmarks/adapt-shift-2core-cpu.json

Random-weight ViT-S/14 features (no weights can be downloaded here): they carry colour and texture,
not meaning, so this measures the method's mechanics and its guard, not what DINOv2 features give.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

SIZE = "224x126"
ROCKS_COMMON = [(100, 3, 90), (200, 3, 60), (300, 3, 80), (500, 3, 50), (550, 2, 40), (800, 8, 110),
                (600, 2, 18), (0, 1, 50)]


def shifted(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from seg.data import synthetic

    image, raw = synthetic.make_scene(seed, objects=ROCKS_COMMON)
    x = image.astype(np.float32)
    if kind == "light":
        x = 255 * ((x * np.array([1.15, 1.0, 0.78]) + 18).clip(0, 255) / 255) ** 0.8
    else:
        x = cv2.GaussianBlur(x, (7, 7), 2.0) + np.random.default_rng(seed).normal(0, 12, x.shape)
    return x.clip(0, 255).astype(np.uint8), raw


def write_target(root: Path, kind: str, counts: dict[str, int]) -> Path:
    for s_i, (split, n) in enumerate(counts.items()):
        base = root / "Offroad_Segmentation_Training_Dataset" / split
        (base / "Color_Images").mkdir(parents=True, exist_ok=True)
        (base / "Segmentation").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, raw = shifted(kind, 900000 + s_i * 1000 + i)
            cv2.imwrite(str(base / "Color_Images" / f"{kind}_{i:05d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(base / "Segmentation" / f"{kind}_{i:05d}.png"), raw)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mix", default="classmix", help="the online mode's mix: classmix | none")
    ap.add_argument("--skip-rounds", action="store_true", help="only the online mode (and source-only, oracle)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from seg.adapt.guard import GuardSettings
    from seg.adapt.rounds import AdaptOptions, adapt
    from seg.data.synthetic import write_dataset
    from seg.evaluate import EvalOptions, evaluate
    from seg.extract_features import ExtractConfig, extract
    from seg.train.presets import resolve
    from seg.train_head import RunOptions, train

    quiet = dict(log=lambda s: None)
    work = Path(args.work or tempfile.mkdtemp(prefix="seg-adapt-"))
    common = dict(backbone="vits14", size=SIZE, random_init=True, aug_policy="phase3", aug_seeds=2,
                  batch_size=8, progress=False)
    src = write_dataset(work / "source", {"train": 40, "val": 8}, seed=7)
    cache = work / "cache"
    extract(ExtractConfig(data=str(src), out=str(cache), **common), **quiet)
    targets = {}
    for kind in ("light", "blur"):
        root = write_target(work / f"target-{kind}", kind, {"train": 24, "val": 12})
        folder = root / "Offroad_Segmentation_Training_Dataset" / "train" / "Color_Images"
        extract(ExtractConfig(data=str(src), out=str(cache), unlabeled=(f"{kind}={folder}",), **common), **quiet)
        labelled = work / f"cache-{kind}"  # the target's labels: the oracle's train split, the scoring val split
        extract(ExtractConfig(data=str(root), out=str(labelled), **common), **quiet)
        targets[kind] = labelled

    def score(run: Path, kind: str, tag: str = "") -> float:
        return evaluate(EvalOptions(run=str(run), split="val", cache=str(targets[kind]), progress=False,
                                    out=str(work / "scores" / f"{run.parent.name}-{run.name}-{kind}{tag}")),
                        **quiet)["miou"]

    def rounds_of(source: Path, seed: int, kind: str) -> dict:
        """seg adapt's rounds, guarded, and the same rounds with the guard off: what each round does to
        the target when nothing stops it."""
        state = adapt(AdaptOptions(run=str(source), cache=str(cache), target=kind, out=str(work / f"seed{seed}" /
                                   f"adapt-{kind}"), rounds=args.rounds, student={"seed": seed},
                                   run_options=RunOptions(device="cpu"), progress=False), **quiet)
        free = adapt(AdaptOptions(run=str(source), cache=str(cache), target=kind, out=str(work / f"seed{seed}" /
                                  f"unguarded-{kind}"), rounds=args.rounds, student={"seed": seed}, guard=off,
                                  run_options=RunOptions(device="cpu"), progress=False), **quiet)
        return {"rounds": [{"round": r["round"], "passed": r["passed"], "guard": r["guard"], "coverage": r["coverage"],
                            "kept_label_accuracy": r["kept_label_accuracy"], "val_miou": r.get("val_miou"),
                            "target_miou": score(Path(r["student"]), kind) if r.get("student") else None}
                           for r in state["rounds"]],
                "adapt_final": score(Path(state["final"]["model"]), kind), "final_why": state["final"]["why"],
                "unguarded": [score(Path(r["student"]), kind) for r in free["rounds"]]}

    rows = []
    off = GuardSettings(collapse_fraction=0.0, swallow_share=1.0, val_drop=1e9, shift_factor=1e9)
    recipe = {"epochs": args.epochs, "patience": 0}
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        source = work / f"seed{seed}" / "source-only"
        train(resolve(2, {**recipe, "seed": seed}), str(cache), str(source), RunOptions(device="cpu", progress=False),
              **quiet)
        # the control: the source model trained as long again on the source alone, as every student is
        longer = work / f"seed{seed}" / "source-longer"
        train(resolve(2, {**recipe, "seed": seed}), str(cache), str(longer),
              RunOptions(device="cpu", progress=False, init_from=str(source)), **quiet)
        for kind in targets:
            row = {"seed": seed, "target": kind, "source_only": score(source, kind),
                   "source_longer": score(longer, kind)}
            row.update(rounds_of(source, seed, kind) if not args.skip_rounds else
                       {"rounds": [], "adapt_final": None, "final_why": None, "unguarded": [None] * args.rounds})
            for guarded in (True, False):  # online: the student scored after every epoch it kept
                where, per_epoch = work / f"seed{seed}" / f"online-{'guarded' if guarded else 'unguarded'}-{kind}", []
                seen = RunOptions(device="cpu", on_epoch=lambda e, r, w=where, p=per_epoch:
                                  p.append(score(w / "student", kind, f"-epoch{e + 1}")))  # best.pt: this epoch (select final)
                state = adapt(AdaptOptions(run=str(source), cache=str(cache), target=kind, out=str(where), mode="online",
                                           mix=args.mix, student={"seed": seed}, run_options=seen, progress=False,
                                           **({} if guarded else {"guard": off})), **quiet)
                key = "online" if guarded else "online_unguarded"
                row[key] = {"epochs": per_epoch, "final": score(Path(state["final"]["model"]), kind),
                            "why": state["final"]["why"], "table": state["epochs"]}
            oracle = work / f"seed{seed}" / f"oracle-{kind}"
            train(resolve(2, {**recipe, "seed": seed}), str(targets[kind]), str(oracle),
                  RunOptions(device="cpu", progress=False), **quiet)
            row["oracle"] = score(oracle, kind)
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"

    print("\n| target | source-only | source, trained as long again | " + " | ".join(f"round {r} (unguarded)" for r in range(1, args.rounds + 1))
          + " | seg adapt (guarded) | online, last epoch (unguarded) | online (guarded) | oracle | gap closed "
            "(rounds / online) |")
    print("|---" * (args.rounds + 8) + "|")
    summary = []
    for kind in targets:
        mine = [r for r in rows if r["target"] == kind]
        so, fin, orc = ([r[k] for r in mine] for k in ("source_only", "adapt_final", "oracle"))
        per_round = [[r["unguarded"][k] for r in mine] for k in range(args.rounds)]
        on_free = [r["online_unguarded"]["final"] for r in mine]
        on_fin = [r["online"]["final"] for r in mine]
        gap = statistics.mean(orc) - statistics.mean(so)
        closed = [(statistics.mean(v) - statistics.mean(so)) / gap if gap > 0 and None not in v else None
                  for v in (fin, on_fin)]
        longer = [r["source_longer"] for r in mine]
        print(f"| {kind} | {ms(so)} | {ms(longer)} | " + " | ".join(ms(v) for v in per_round) + f" | {ms(fin)} | {ms(on_free)} | "
              f"{ms(on_fin)} | {ms(orc)} | " + (" / ".join(f"{c:.0%}" if c is not None else "-" for c in closed) + " |"
                                               if gap > 0
                                               else "no gap: the oracle is not above source-only |"))
        epochs = max(len(r["online_unguarded"]["epochs"]) for r in mine)
        per_epoch = [[r["online_unguarded"]["epochs"][e] for r in mine if len(r["online_unguarded"]["epochs"]) > e]
                     for e in range(epochs)]
        print(f"  online, unguarded, target mIoU after each epoch ({kind}): "
              + ", ".join(f"{e + 1}: {ms(v)}" for e, v in enumerate(per_epoch)))
        summary.append({"target": kind, "source_only": so, "source_longer": longer, "rounds": per_round, "adapt_final": fin, "oracle": orc,
                        "online_unguarded": on_free, "online_unguarded_per_epoch": per_epoch, "online_final": on_fin,
                        "gap_closed": closed[0], "gap_closed_online": closed[1]})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
