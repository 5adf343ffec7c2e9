"""Absolute GPU figures for `benchmarks/gpu_check.sh`, each against a rate measured in this run:
extraction images/s and the fraction of the GPU's bf16 matmul rate it reaches; the phase-3 head
step in ms against its FLOP floor; one cached epoch against one one-stage epoch."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e9


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_pipeline import vit_flops  # analytic ViT FLOPs, shared with the pipeline benchmark
    from seg.data.synthetic import write_dataset
    from seg.extract_features import ExtractConfig, extract
    from seg.heads import build_head, head_logits
    from seg.train.losses import SegLoss
    from seg.train.presets import resolve
    from seg.train_head import RunOptions, train

    dev = torch.device("cuda")
    rows = {"gpu": torch.cuda.get_device_name(dev), "bf16_matmul_GFLOPs": matmul_rate(dev, torch.bfloat16)}
    work = Path(tempfile.mkdtemp(prefix="seg-gpu-"))
    data = write_dataset(work / "data", {"train": 64, "val": 16, "test": 0})
    t0 = time.perf_counter()
    summary = extract(ExtractConfig(data=str(data), out=str(work / "cache"), backbone="vitb14_reg", size="644x364",
                                    random_init=True, splits=("train", "val"), batch_size=16, device="cuda",
                                    progress=False), log=lambda s: None)
    ips = summary.loop_images_per_s
    rows["extract_images_per_s"] = ips
    rows["extract_fraction_of_bf16_rate"] = ips * vit_flops("vitb14_reg", "644x364") / (rows["bf16_matmul_GFLOPs"] * 1e9)
    rows["extract_wall_s"] = time.perf_counter() - t0

    # phase-3 head step (batch 2, bf16, Focal+Dice, AdamW) against its FLOP floor
    head = build_head("upernet", 768, 10).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    crit = SegLoss("focal_dice", torch.ones(10, device=dev))
    tokens = torch.randn(2, 1, 768, 26, 46, device=dev).half()
    target = torch.randint(0, 10, (2, 364, 644), device=dev)
    flops = [0.0]

    def count(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            flops[0] += 2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in head.modules()]
    head_logits(head, tokens, (364, 644), True)
    for h in hooks:
        h.remove()
    step_flops = 3 * flops[0]  # forward + backward (about twice the forward)
    times = []
    for i in range(25):
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        loss = crit(head_logits(head, tokens, (364, 644), True), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(dev)
        if i >= 5:
            times.append(time.perf_counter() - t)
    rows["phase3_head_step_ms"] = 1000 * sorted(times)[len(times) // 2]
    rows["phase3_head_step_floor_ms"] = 1000 * step_flops / (rows["bf16_matmul_GFLOPs"] * 1e9)

    # a cached epoch against a one-stage epoch (the backbone on every sample): measured parts
    t = time.perf_counter()
    train(resolve(3, {"epochs": 1, "warmup_epochs": 0}), str(work / "cache"), str(work / "run"),
          RunOptions(device="cuda", progress=False, preload="always"), log=lambda s: None)
    cached_epoch = json.loads((work / "run" / "history.json").read_text())[0]["seconds"]
    rows["cached_epoch_s"] = cached_epoch
    rows["onestage_epoch_s_projected"] = cached_epoch + 80 / ips  # + the backbone on 64 train + 16 val images
    rows["cached_vs_onestage"] = rows["onestage_epoch_s_projected"] / cached_epoch
    rows["train_wall_s"] = time.perf_counter() - t
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
