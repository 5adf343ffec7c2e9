"""8-bit token caches: which scales, what they cost in fidelity, what they save.

    python benchmarks/token_quant.py --json benchmarks/token-quant-2core-cpu.json

1. Schemes, on real-architecture features (random weights; procedural scenes at 644x364): relative
   RMS error ||dequantised - float16|| / ||float16|| of per-token absmax (one scale per token), per-
   channel scales over the sample set (one scale per channel, calibrated on the very tokens it
   quantises: its best case), and per-token group scales (G = 16, 32, 64, 128 channels), with bytes
   per sample against float16. For normed last-layer tokens of vits14 and vitb14_reg, 4 normed
   layers (upernet-ms caches), and tap tokens (the un-normed stream entering block 8). Random-weight
   ViTs lack the few large channels trained DINOv2 has, so each is also measured with 3 channels
   scaled x40 ("with outlier channels", simulated).
2. Fidelity: the demo recipe (phase-3 head, vits14 @ 322x182, phase3 augmentation x 2) trained on a
   float16 and an int8 cache of the same extraction, 2 head seeds each, on the demo's dataset and on
   a second procedural dataset; val mIoU, preloaded bytes and a streamed epoch's time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def schemes(tokens: torch.Tensor, is_tap: bool) -> dict[str, tuple[float, float]]:
    """name -> (relative RMS error, stored bytes / float16 bytes)."""
    from seg.cache.quant import QMAX, QuantSpec, relative_rms_error

    shape = list(tokens.shape[1:])
    c = shape[1]
    ref = tokens.float()
    out = {}
    per_token = QuantSpec(tuple(shape), 1, c)
    out["per-token absmax"] = (relative_rms_error(ref, per_token.dequantize(per_token.pack(tokens)).float()),
                               per_token.row_bytes / (2 * ref[0].numel()))
    # per channel over the whole sample set: one float16 scale per channel, shared by every token
    dims = [d for d in range(ref.dim()) if d != 2]
    amax = ref.abs().amax(dim=dims, keepdim=True)
    scale = (amax / QMAX).half().float()
    q = (ref / scale.clamp_min(1e-30)).round().clamp(-QMAX, QMAX)
    out["per-channel (calibrated on these tokens)"] = (relative_rms_error(ref, (q * scale).half().float()),
                                                       (ref[0].numel() + 2 * c / max(1, len(ref))) / (2 * ref[0].numel()))
    for g in (16, 32, 64, 128):
        spec = QuantSpec(tuple(shape), 1, g)
        out[f"per-token groups of {g}"] = (relative_rms_error(ref, spec.dequantize(spec.pack(tokens)).float()),
                                           spec.row_bytes / (2 * ref[0].numel()))
    return out


def part_schemes(n_images: int, rows: list) -> None:
    from seg.backbones import load_backbone
    from seg.backbones.features import backbone_features
    from seg.data.augment import Augmenter
    from seg.data.normalize import normalize
    from seg.data.synthetic import make_scene

    size = (644, 364)
    resize = Augmenter("none", size)
    images = torch.from_numpy(np.stack([resize(make_scene(100 + i)[0], None, "", 0)[0] for i in range(n_images)]))
    cpu = torch.device("cpu")
    for name in ("vits14", "vitb14_reg"):
        model, _ = load_backbone(name, random_init=True, seed=0)
        depth = len(model.blocks)
        feats = {}
        with torch.no_grad():
            for b in range(0, n_images, 2):
                x = normalize(images[b:b + 2])
                for kind, layers, tap in (("last layer", [depth - 1], None),
                                          ("4 layers", [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1], None),
                                          ("tap block 8", [], 8)):
                    f = backbone_features(model, x, layers, tap, cpu, torch.bfloat16).half()
                    feats.setdefault(kind, []).append(f)
        for kind, parts in feats.items():
            tokens = torch.cat(parts)
            for variant in ("as computed", "with outlier channels"):
                t = tokens
                if variant != "as computed":
                    t = tokens.float().clone()
                    chan = [5, 77, 300]
                    if tokens.dim() == 3:
                        t[:, :, chan] *= 40
                    else:
                        t[:, :, chan] *= 40
                    t = t.half()
                for scheme, (err, ratio) in schemes(t, tokens.dim() == 3).items():
                    rows.append({"part": "schemes", "backbone": name, "tokens": kind, "variant": variant,
                                 "scheme": scheme, "relative_rms": err, "bytes_vs_fp16": ratio})
                    print(f"{name:10s} {kind:11s} {variant:21s} {scheme:42s} rel RMS {err:.5f}  bytes {ratio:.3f}x")


def part_fidelity(work: Path, rows: list, epochs: int, seeds: int) -> None:
    from seg.cache import FeatureCache
    from seg.extract_features import ExtractConfig, extract
    from seg.data.synthetic import write_dataset
    from seg.train.presets import resolve
    from seg.train.sources import split_bytes
    from seg.train_head import RunOptions, train

    datasets = {"demo data (48 train, 12 val)": ({"train": 48, "val": 12, "test": 0}, 0),
                "synthetic, seed 7 (64 train, 16 val)": ({"train": 64, "val": 16, "test": 0}, 7)}
    for label, (counts, seed) in datasets.items():
        data = write_dataset(work / f"data{seed}", counts, seed=seed)
        for dtype in ("fp16", "int8"):
            cache = work / f"cache{seed}-{dtype}"
            extract(ExtractConfig(data=str(data), out=str(cache), backbone="vits14", size="322x182", random_init=True,
                                  aug_policy="phase3", aug_seeds=2, splits=("train", "val"), batch_size=8,
                                  token_dtype=dtype, progress=False), log=lambda s: None)
            fc = FeatureCache(cache)
            preload_bytes = split_bytes(fc.split("train")) + split_bytes(fc.split("val"))
            mious, stream_s = [], []
            for head_seed in range(seeds):
                cfg = resolve(3, {"backbone": "vits14", "size": "322x182", "epochs": epochs, "warmup_epochs": 1,
                                  "lr": 1e-3, "batch_size": 4, "accum": 1, "patience": 0, "seed": head_seed})
                out = work / f"run{seed}-{dtype}-{head_seed}"
                metrics = train(cfg, str(cache), str(out), RunOptions(device="cpu", progress=False, preload="always"),
                                log=lambda s: None)
                mious.append(metrics["miou"])
            # one streamed epoch, timed apart from the preloaded runs
            cfg = resolve(3, {"backbone": "vits14", "size": "322x182", "epochs": 1, "warmup_epochs": 0, "lr": 1e-3,
                              "batch_size": 4, "accum": 1, "patience": 0})
            t0 = time.perf_counter()
            train(cfg, str(cache), str(work / f"stream{seed}-{dtype}"), RunOptions(device="cpu", progress=False,
                                                                                   preload="never"), log=lambda s: None)
            stream_s = time.perf_counter() - t0
            err = json.loads((cache / "manifest.json").read_text()).get("token_quant_error", {}).get("relative_rms")
            rows.append({"part": "fidelity", "dataset": label, "token_dtype": dtype, "val_miou": mious,
                         "val_miou_mean": statistics.mean(mious), "preloaded_bytes": preload_bytes,
                         "streamed_1_epoch_s": stream_s, "relative_rms": err})
            print(f"{label:38s} {dtype}: val mIoU {['%.4f' % v for v in mious]} preload {preload_bytes / 1e6:.1f} MB "
                  f"streamed epoch+val {stream_s:.1f} s" + (f" rel RMS {err:.4f}" if err else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="scenes for the scheme comparison")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--skip", choices=["schemes", "fidelity"], default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="seg-quant-"))
    rows: list = []
    if args.skip != "schemes":
        part_schemes(args.images, rows)
    if args.skip != "fidelity":
        part_fidelity(work, rows, args.epochs, args.seeds)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
