"""PMT trained from the cache against one-stage PMT (the frozen backbone run on every step), at the
real phase-3 size: training samples/s of each, their ratio measured in one run, the FLOP bound of that
ratio, and peak memory.

    python benchmarks/pmt_speed.py [--json benchmarks/pmt-speed-2core-cpu.json] [--steps 3]

Each (backbone, mode) runs in its own process, so the peak memory (CUDA: max allocated; CPU: peak
RSS) is that mode's alone: the cached mode never builds the backbone. The decoder is PMT's published
shape (100 queries, 6 blocks, MLP as wide as the encoder, masked attention on), the loss PMT's
(12544 points), AdamW with gradient clipping, under the device's half-precision autocast. Random
weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZE = (364, 644)  # H, W: phase 3
BATCH, CLASSES = 2, 10


def child(mode: str, backbone_name: str, steps: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from seg.backbones import load_backbone
    from seg.backbones.features import backbone_features, cast_matmul_weights_
    from seg.backbones.named import backbone_kwargs, prefix_count
    from seg.data.normalize import normalize
    from seg.heads import PMTHead, mask_predictions
    from seg.runtime.device import resolve_device
    from seg.train.mask_loss import MaskClassificationCriterion

    device = resolve_device("auto")
    half = torch.bfloat16 if device.type == "cpu" else torch.float16
    torch.manual_seed(0)
    kw = backbone_kwargs(backbone_name)
    patch, dim = kw["patch_size"], kw["embed_dim"]
    h, w = SIZE
    grid = (h // patch, w // patch)
    head = PMTHead.for_backbone(backbone_name, dim, grid, CLASSES).to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=2e-4, weight_decay=0.05)
    crit = MaskClassificationCriterion(CLASSES, 12544)
    masks = torch.randint(0, CLASSES, (BATCH, h, w), device=device, dtype=torch.uint8)
    depth = kw["depth"]
    layers = [depth // 4 * (i + 1) - 1 for i in range(4)]
    if mode == "one-stage":
        backbone, _ = load_backbone(backbone_name, random_init=True)
        backbone = cast_matmul_weights_(backbone.to(device).eval(), half)
        images = torch.randint(0, 256, (BATCH, h, w, 3), dtype=torch.uint8, device=device)

        def levels():
            with torch.no_grad():
                x = normalize(images)
                return backbone_features(backbone, x, layers, None, device, half, levels=True).to(torch.float16)
    else:
        cached = torch.randn(BATCH, 4, prefix_count(backbone_name) + grid[0] * grid[1], dim, device=device).half()

        def levels():
            return cached

    def step():
        pred = mask_predictions(head, levels(), half)
        loss = crit(pred, masks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.01)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    out = {"mode": mode, "backbone": backbone_name, "device": device.type, "seconds_per_step": sorted(times)[len(times) // 2],
           "samples_per_s": BATCH / sorted(times)[len(times) // 2],
           "peak_MB": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e6}
    with FlopCounterMode(display=False) as fc:
        step()
    out["step_GFLOP"] = fc.get_total_flops() / 1e9
    if mode == "one-stage":
        with FlopCounterMode(display=False) as fc:
            levels()
        out["backbone_GFLOP"] = fc.get_total_flops() / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backbones", default="vits14,vitb14_reg")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "BACKBONE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return
    rows = []
    for name in args.backbones.split(","):
        pair = {}
        for mode in ("cached", "one-stage"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, name, "--steps", str(args.steps)],
                                  capture_output=True, text=True, check=True)
            pair[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        c, o = pair["cached"], pair["one-stage"]
        row = {"backbone": name, "size": f"{SIZE[1]}x{SIZE[0]}", "batch": BATCH, "device": c["device"],
               "cached_samples_per_s": c["samples_per_s"], "one_stage_samples_per_s": o["samples_per_s"],
               "speedup": c["samples_per_s"] / o["samples_per_s"],
               "head_step_GFLOP_per_sample": c["step_GFLOP"] / BATCH,
               "backbone_GFLOP_per_sample": o["backbone_GFLOP"] / BATCH,
               "flop_bound": (c["step_GFLOP"] + o["backbone_GFLOP"]) / c["step_GFLOP"],
               "cached_peak_MB": c["peak_MB"], "one_stage_peak_MB": o["peak_MB"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| backbone | cached samples/s | one-stage samples/s | ratio | FLOP bound | head step GFLOP/sample "
          "| backbone GFLOP/sample | peak MB cached / one-stage |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['cached_samples_per_s']:.2f} | {r['one_stage_samples_per_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['flop_bound']:.2f}x | {r['head_step_GFLOP_per_sample']:.0f} | "
              f"{r['backbone_GFLOP_per_sample']:.0f} | {r['cached_peak_MB']:.0f} / {r['one_stage_peak_MB']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
