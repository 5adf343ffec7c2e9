"""Head training step speed at the real phase-3 shapes (vitb14_reg @ 644x364: a 26x46 grid of 768-d
tokens per stored layer, 364x644 masks), batch 2, bf16 autocast, Focal+Dice, AdamW: samples/s per
head, measured one after the other in one process.

    python benchmarks/head_speed.py
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    from seg.heads import build_head, head_logits
    from seg.train.losses import SegLoss

    torch.manual_seed(0)
    grid, dim, mask = (26, 46), 768, (364, 644)
    crit = SegLoss("focal_dice", torch.ones(10))
    print("| head | stored layers | parameters | samples/s (batch 2, bf16) |\n|---|---|---|---|")
    import sys

    cases = (("upernet", 1, None), ("linear", 1, None), ("linear", 4, None), ("upernet-ms", 4, "reduce"),
             ("upernet-ms", 4, "full"))
    if "--only" in sys.argv:
        cases = [c for c in cases if c[0] == sys.argv[sys.argv.index("--only") + 1]]
    for head_name, layers, fusion in cases:
        head = build_head(head_name, layers * dim, 10, layers=layers, ms_fusion=fusion)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
        tokens = torch.randn(2, layers, dim, *grid).half()
        target = torch.randint(0, 10, (2, *mask))
        times = []
        for step in range(7):
            t0 = time.perf_counter()
            loss = crit(head_logits(head, tokens, mask, True), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 2:  # the first steps allocate and tune
                times.append(time.perf_counter() - t0)
        rate = 2 / (sum(times) / len(times))
        n = sum(p.numel() for p in head.parameters())
        label = head_name + (f" ({fusion} fusion)" if fusion else "")
        print(f"| {label} | {layers} | {n:,} | {rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
