"""Absolute GPU figures for `benchmarks/gpu_check.sh`, each against a rate measured in this run:
extraction images/s and the fraction of the GPU's bf16 matmul rate it reaches; the phase-3 head
step in ms against its FLOP floor; one cached epoch against one one-stage epoch."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e9


# The GPU's figures; --tiny is a CPU-sized rehearsal of the same steps, which the test suite runs so
# that this script cannot rot unseen on machines without a GPU.
FULL = {"backbone": "vitb14_reg", "size": "644x364", "train": 64, "val": 16, "batch": 16, "matmul_n": 8192, "steps": 25}
TINY = {"backbone": "vits14", "size": "224x126", "train": 4, "val": 2, "batch": 2, "matmul_n": 512, "steps": 2}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small rehearsal of every step (any device)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_pipeline import vit_flops  # analytic ViT FLOPs, shared with the pipeline benchmark
    from seg.cache import FeatureCache
    from seg.data.synthetic import write_dataset
    from seg.extract_features import ExtractConfig, extract
    from seg.heads import build_head, head_logits
    from seg.train.losses import SegLoss
    from seg.train.presets import resolve
    from seg.train_head import RunOptions, train

    c = TINY if args.tiny else FULL
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = {"device": name, "bf16_matmul_GFLOPs": matmul_rate(dev, torch.bfloat16, c["matmul_n"])}
    work = Path(tempfile.mkdtemp(prefix="seg-gpu-"))
    data = write_dataset(work / "data", {"train": c["train"], "val": c["val"], "test": 0})
    t0 = time.perf_counter()
    summary = extract(ExtractConfig(data=str(data), out=str(work / "cache"), backbone=c["backbone"], size=c["size"],
                                    random_init=True, splits=("train", "val"), batch_size=c["batch"],
                                    device=args.device, progress=False), log=lambda s: None)
    ips = summary.loop_images_per_s
    rows["extract_images_per_s"] = ips
    rows["extract_fraction_of_bf16_rate"] = ips * vit_flops(c["backbone"], c["size"]) / (rows["bf16_matmul_GFLOPs"] * 1e9)
    rows["extract_wall_s"] = time.perf_counter() - t0

    # the phase-3 head step (batch 2, bf16 autocast, Focal+Dice, AdamW) on the cache's token shape, against
    # its FLOP floor
    manifest = FeatureCache(work / "cache").manifest
    layers, dim, gh, gw = manifest["token_shape"]
    h, w = manifest["mask_shape"]
    cfg = resolve(3, {})
    head = build_head(cfg.head, layers * dim, 10).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    crit = SegLoss("focal_dice", torch.ones(10, device=dev))
    tokens = torch.randn(2, layers, dim, gh, gw, device=dev).half()
    target = torch.randint(0, 10, (2, h, w), device=dev)
    flops = [0.0]

    def count(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            flops[0] += 2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in head.modules()]
    head_logits(head, tokens, (h, w), True)
    for hook in hooks:
        hook.remove()
    step_flops = 3 * flops[0]  # forward + backward (about twice the forward)

    def step_ms(dtype: torch.dtype) -> float:
        """Median ms of one training step under `dtype` autocast (fp16 with a GradScaler, as train-head)."""
        scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
        times = []
        for i in range(c["steps"]):
            sync(dev)
            t = time.perf_counter()
            loss = crit(head_logits(head, tokens, (h, w), dtype), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            if i >= c["steps"] // 5:
                times.append(time.perf_counter() - t)
        return 1000 * sorted(times)[len(times) // 2]

    rows["phase3_head_step_ms"] = step_ms(torch.bfloat16)
    # train-head's default on a GPU (fp16 autocast + GradScaler, as published), and with cuDNN's
    # autotuner on (not seg's default: it makes the algorithm choice vary from run to run)
    rows["phase3_head_step_fp16_scaler_ms"] = step_ms(torch.float16)
    torch.backends.cudnn.benchmark = True
    rows["phase3_head_step_fp16_scaler_cudnn_benchmark_ms"] = step_ms(torch.float16)
    torch.backends.cudnn.benchmark = False
    rows["phase3_head_step_floor_ms"] = 1000 * step_flops / (rows["bf16_matmul_GFLOPs"] * 1e9)

    # a cached epoch against a one-stage epoch (the backbone on every sample): measured parts
    t = time.perf_counter()
    train(resolve(3, {"epochs": 1, "warmup_epochs": 0}), str(work / "cache"), str(work / "run"),
          RunOptions(device=args.device, progress=False, preload="always"), log=lambda s: None)
    cached_epoch = json.loads((work / "run" / "history.json").read_text())[0]["seconds"]
    rows["cached_epoch_s"] = cached_epoch
    # + the backbone on every train and val image of the epoch, at the extraction's measured rate
    rows["onestage_epoch_s_projected"] = cached_epoch + (c["train"] + c["val"]) / ips
    rows["cached_vs_onestage"] = rows["onestage_epoch_s_projected"] / cached_epoch
    rows["train_wall_s"] = time.perf_counter() - t
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {v}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
