"""Batch-1 latency of the deployed model, eager PyTorch against onnxruntime, in one run.

    python benchmarks/deploy_latency.py --json benchmarks/deploy-latency-2core-cpu.json

For vits14 and vitb14_reg at 644x364 (random weights: latency does not depend on their values) with
the phase-3 head (UPerNet), a run is trained for one epoch on procedural images, exported with
`seg export`, and one image is timed through:
  - eager, the run's own path (`seg.load(run).predict_logits`-equivalent: half-precision backbone
    and autocast head, as `seg predict` runs it; without the image decode and the final resize);
  - eager float32 graph (the module that was exported);
  - onnxruntime on the exported file (CPU execution provider).
Each row gives median ms per image, analytic FLOPs per image (backbone + head convolutions +
upsampling), and the fraction of this machine's matmul rate (bf16 for the half-precision path,
fp32 for the others) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def head_flops(head: nn.Module, tokens: torch.Tensor, out_size: tuple[int, int]) -> float:
    """Convolution and linear FLOPs of one forward pass, counted with hooks, plus the bilinear
    upsampling's two matrix products."""
    total = [0.0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            total[0] += 2 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total[0] += 2 * out.numel() * mod.in_features

    hooks = [m.register_forward_hook(hook) for m in head.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        logits = head(tokens.reshape(1, -1, *tokens.shape[-2:]).float())
    for h in hooks:
        h.remove()
    k, hp, wp = logits.shape[1:]
    H, W = out_size
    return total[0] + 2 * k * (H * hp * wp + H * wp * W)


sys.path.insert(0, str(Path(__file__).resolve().parent))


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="vits14,vitb14_reg")
    ap.add_argument("--size", default="644x364")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import seg
    from bench_pipeline import task_matmul, vit_flops  # the same rates and FLOPs as the pipeline benchmark
    from seg.data.synthetic import make_scene, write_dataset
    from seg.export_model import ExportOptions, export_onnx
    from seg.deploy.onnx_file import open_session
    from seg.deploy.graph import PixelsToClasses
    from seg.backbones.rebuild import rebuild_backbone
    from seg.extract_features import ExtractConfig, extract
    from seg.train.presets import resolve
    from seg.train_head import RunOptions, train

    work = Path(args.work or tempfile.mkdtemp(prefix="seg-latency-"))
    w, h = (int(v) for v in args.size.split("x"))
    data = write_dataset(work / "data", {"train": 2, "val": 1, "test": 0}, seed=3)
    rates = {k: v for k, v in task_matmul({}).items() if k in ("bf16", "fp32")}
    rows = [{"what": "machine bf16 matmul 2048^3", "GFLOP/s": rates["bf16"]},
            {"what": "machine fp32 matmul 2048^3", "GFLOP/s": rates["fp32"]}]
    print(f"matmul: bf16 {rates['bf16']:.0f} GFLOP/s, fp32 {rates['fp32']:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    for name in args.backbones.split(","):
        cache, run = work / f"cache-{name}", work / f"run-{name}"
        extract(ExtractConfig(data=str(data), out=str(cache), backbone=name, size=args.size, random_init=True,
                              aug_seeds=1, splits=("train", "val"), batch_size=2, shard_size=4, workers=0,
                              progress=False), log=lambda s: None)
        train(resolve(3, {"epochs": 1}), str(cache), str(run), RunOptions(device="cpu", progress=False),
              log=lambda s: None)
        t0 = time.perf_counter()
        onnx_file = work / f"{name}.onnx"
        report = export_onnx(ExportOptions(run=str(run), out=str(onnx_file), overwrite=True), log=lambda s: None)
        export_s = time.perf_counter() - t0

        model = seg.load(run, device="cpu")
        image = torch.from_numpy(model.resize(make_scene(5)[0], None, "", 0)[0])[None]
        segm = model.segmenter
        graph = PixelsToClasses(rebuild_backbone(segm.run.backbone, None, torch.device("cpu")), segm.run.head,
                                segm.run.backbone["layers"], None, (h, w), segm.patch)
        session = open_session(onnx_file)
        feed = {"image": image.numpy()}
        tokens = segm.tokens(normalize_image(image))
        flops = vit_flops(name, args.size) + head_flops(segm.run.head, tokens, (h, w))
        timings = {
            f"eager, run's path ({segm.run.backbone['compute_dtype']} backbone, amp head)":
                (lambda: segm.scores(image, (h, w)), "bf16" if segm.compute_dtype == torch.bfloat16 else "fp32"),
            "eager float32 graph (the exported module)": (lambda: torch_no_grad(graph, image), "fp32"),
            "onnxruntime CPU, exported file": (lambda: session.run(None, feed), "fp32"),
        }
        for what, (fn, rate) in timings.items():
            ms = median_ms(fn, args.repeats)
            frac = flops / (ms / 1000) / (rates[rate] * 1e9)
            rows.append({"backbone": name, "what": what, "ms": ms, "GFLOP/image": flops / 1e9,
                         f"fraction of {rate} matmul rate": frac})
            print(f"{name:11s} {what:58s} {ms:8.1f} ms  {flops / 1e9:6.1f} GFLOP  {100 * frac:5.1f}% of {rate} rate")
        rows.append({"backbone": name, "what": "export + parity check", "s": export_s,
                     "max_abs_logit_diff": report["parity"][0]["max_abs_logit_diff"],
                     "onnx_MB": onnx_file.stat().st_size / 1e6})
        print(f"{name:11s} export + parity {export_s:.0f} s, max |dlogit| {report['parity'][0]['max_abs_logit_diff']:.2g}, "
              f"{onnx_file.stat().st_size / 1e6:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "threads": torch.get_num_threads(),
                                               "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    from seg.data.normalize import normalize

    return normalize(image)


def torch_no_grad(graph, image):
    with torch.no_grad():
        return graph(image)


if __name__ == "__main__":
    main()
