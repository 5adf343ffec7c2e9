"""--tune-blocks speed at the real phase-3 shapes (vitb14_reg @ 644x364, random weights), side by side in
one process: training samples/s of the frozen-head phase 3 step, of --tune-blocks 1, 2, 3 from tap
tokens (and 3 with activation checkpointing), and of one-stage training of the same blocks (the whole
backbone forward on every step); validation samples/s of each; the projected 40-epoch wall time of
the full recipe (2857 train / 317 val images) with extraction included.

    python benchmarks/tune_blocks.py [--json results.json] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

FULL_TRAIN, FULL_VAL, FULL_EPOCHS = 2857, 317, 40
BATCH, SIZE = 2, (364, 644)


def timed(fn: Callable[[], None], steps: int) -> float:
    """Seconds per call after one warm-up call (allocation, kernel choice)."""
    fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main() -> None:
    from seg.backbones import load_backbone
    from seg.backbones.tail import BackboneTail
    from seg.runtime.device import autocast
    from seg.heads import TunedHead, build_head, head_logits
    from seg.train.losses import SegLoss
    from seg.data.normalize import normalize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    h, w = SIZE
    grid = (h // 14, w // 14)
    backbone, _ = load_backbone("vitb14_reg", random_init=True)
    depth = len(backbone.blocks)
    images = torch.randint(0, 256, (BATCH, h, w, 3), dtype=torch.uint8)
    target = torch.randint(0, 10, (BATCH, h, w))
    crit = SegLoss("focal_dice", torch.ones(10))
    rows = []

    def report(name: str, train_s: float, val_s: float, extract_rate, **extra) -> None:
        train_rate, val_rate = BATCH / train_s, BATCH / val_s
        epoch_h = (FULL_TRAIN / train_rate + FULL_VAL / val_rate) / 3600
        rows.append({"config": name, "train_samples_per_s": train_rate, "val_samples_per_s": val_rate,
                     "extract_images_per_s": extract_rate, "epoch_hours": epoch_h, **extra})
        print(f"  {name:34s} train {train_rate:6.2f}/s  val {val_rate:6.2f}/s  epoch {epoch_h * 60:6.1f} min", flush=True)

    with torch.no_grad(), autocast(cpu):  # what a cache stores, computed once here
        x = normalize(images)
        tap_tokens = {k: backbone.tokens_entering(x, depth - k).to(torch.float16) for k in (1, 2, 3)}
        layer_tokens = torch.stack(backbone.get_intermediate_layers(x, n=1, reshape=True), 1).to(torch.float16)

    def extraction_rate(fn) -> float:
        def run() -> None:
            with torch.no_grad(), autocast(cpu):
                fn(normalize(images))
        return BATCH / timed(run, max(2, args.steps // 2))

    layer_extract = extraction_rate(lambda v: backbone.get_intermediate_layers(v, n=1, reshape=True))
    print(f"  extraction (layer cache): {layer_extract:.2f} images/s", flush=True)

    def step_fn(model, tokens, grid_=None) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            crit(head_logits(model, tokens, SIZE, True, grid_), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def val_fn(model, tokens, grid_=None) -> Callable[[], None]:
        def val() -> None:
            with torch.no_grad():
                head_logits(model, tokens, SIZE, True, grid_)
        return val

    head = build_head("upernet", 768, 10)
    report("frozen head (phase 3)", timed(step_fn(head, layer_tokens), args.steps),
           timed(val_fn(head.eval(), layer_tokens), args.steps), layer_extract)
    for k in (1, 2, 3):
        model, _ = load_backbone("vitb14_reg", random_init=True)
        tail = BackboneTail(model, depth - k).requires_grad_(True)
        tuned = TunedHead(tail, build_head("upernet", 768, 10)).train()
        tap_extract = extraction_rate(lambda v: backbone.tokens_entering(v, depth - k))
        report(f"--tune-blocks {k} from tap tokens", timed(step_fn(tuned, tap_tokens[k], grid), args.steps),
               timed(val_fn(tuned.eval(), tap_tokens[k], grid), args.steps), tap_extract, tune_blocks=k)
        if k == 3:
            tail.checkpointing = True
            tuned.train()
            report("--tune-blocks 3 --checkpointing", timed(step_fn(tuned, tap_tokens[k], grid), args.steps),
                   timed(val_fn(tuned.eval(), tap_tokens[k], grid), args.steps), tap_extract, tune_blocks=k)
            tail.checkpointing = False
        # one-stage: the frozen prefix on every step (no grad, half precision), then the same tail + head
        def one_stage_tokens() -> torch.Tensor:
            with torch.no_grad(), autocast(cpu):
                return backbone.tokens_entering(normalize(images), depth - k).to(torch.float16)

        opt = torch.optim.AdamW(tuned.parameters(), lr=1e-4)
        tuned.train()

        def one_step() -> None:
            crit(head_logits(tuned, one_stage_tokens(), SIZE, True, grid), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def one_val() -> None:
            with torch.no_grad():
                head_logits(tuned, one_stage_tokens(), SIZE, True, grid)

        tuned.eval()
        val_s = timed(one_val, args.steps)
        tuned.train()
        report(f"one-stage, {k} tuned block(s)", timed(one_step, args.steps), val_s, None,
               tune_blocks=k, one_stage=True)

    print("\n| configuration | train samples/s | val samples/s | extraction (K=4) h | 40 epochs h | total h |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        extract_h = 0.0 if r.get("one_stage") else (FULL_TRAIN * 4 + FULL_VAL) / r["extract_images_per_s"] / 3600
        r["projected_hours_K4"] = extract_h + FULL_EPOCHS * r["epoch_hours"]
        print(f"| {r['config']} | {r['train_samples_per_s']:.2f} | {r['val_samples_per_s']:.2f} | {extract_h:.2f} | "
              f"{FULL_EPOCHS * r['epoch_hours']:.1f} | {r['projected_hours_K4']:.1f} |")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({"batch": BATCH, "size": "644x364", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
