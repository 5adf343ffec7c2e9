"""The pipeline's commands: extract, train-head, eval, predict. Each parses its flags into the stage's
config dataclass, calls the stage, and prints."""

from __future__ import annotations

import click

from seg.cli.common import (COUNT, LAYOUT, NO_PROGRESS, WORKERS, example, parse_pair, parse_scales, parse_stride,
                            user_errors)
from seg.cli.group import main


@main.command(epilog=example(
    "seg extract --data /data/falcon --out cache/b14 --backbone vitb14_reg --size 644x364 --aug-policy phase3",
    "seg extract --data /data/cityscapes --out cache/cs --backbone dinov3_vitb16 --weights dinov3.pth --size 1024x512"))
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="Dataset root: Falcon, Cityscapes, ADE20K, Pascal VOC 2012 or plain <split>/images + <split>/masks folders.")
@LAYOUT
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory to create or resume.")
@click.option("--backbone", default="vitb14_reg", show_default=True,
              help="DINOv2: vits14|vitb14|vitl14|vitg14, optionally _reg; DINOv3: dinov3_vits16|dinov3_vits16plus|"
                   "dinov3_vitb16|dinov3_vitl16|dinov3_vith16plus (--weights only).")
@click.option("--size", default="644x364", show_default=True,
              help="Input WIDTHxHEIGHT, multiples of the patch (14 for DINOv2, 16 for DINOv3).")
@click.option("--weights", default=None, type=click.Path(),
              help="Checkpoint file or folder: official .pth, Hugging Face transformers (model.safetensors, "
                   "pytorch_model.bin or a snapshot folder) or timm (else the official URL via the torch hub cache).")
@click.option("--random-init", is_flag=True, help="Seeded random weights instead of DINOv2's (tests, offline trials).")
@click.option("--random-init-seed", default=0, show_default=True, help="Seed for --random-init.")
@click.option("--aug-policy", type=click.Choice(["none", "phase2", "phase3"]), default="none", show_default=True, help="Augmentation policy for train seeds > 0.")
@click.option("--aug-seeds", default=None, type=COUNT,
              help="K >= 1: with a policy, each train image is cached as K augmented draws (seeds 1..K) "
                   "[default: 4 with a policy or --copy-paste, else 1].")
@click.option("--border-fill", type=click.Choice(["ignore", "background"]), default="ignore", show_default=True,
              help="Mask value where a rotation/shift leaves the frame: ignore (not scored) or background "
                   "(class 0, as the published scripts did).")
@click.option("--splits", default="train,val", show_default=True,
              help="Comma-separated labelled splits to extract (none: only the --unlabeled ones).")
@click.option("--unlabeled", multiple=True, metavar="NAME=FOLDER|VIDEO",
              help="Also cache a folder of images, or a video's frames, without masks as split NAME (repeatable), "
                   "augmented like train; into an existing cache of the same settings, it is added and the other "
                   "splits stay as they are. `seg pseudo-label` labels it.")
@click.option("--every", default=1, show_default=True, type=click.IntRange(min=1),
              help="--unlabeled: keep every N-th image (in name order) or video frame.")
@click.option("--flip-views", is_flag=True,
              help="--unlabeled: also cache each view flipped left-right as split NAME-flip, for a teacher's flip "
                   "TTA (`seg pseudo-label --tta`); twice the split's extraction time and disk.")
@click.option("--layers", default="1", show_default=True, help="Last N blocks (e.g. 4) or block indices (e.g. 8,9,10,11); all normed.")
@click.option("--tap-block", type=click.IntRange(min=0), default=None,
              help="Store the un-normed stream entering block B (all tokens) instead of normed layers: "
                   "a tap cache for `train-head --tune-blocks N-B`.")
@click.option("--batch-size", default=8, show_default=True, type=COUNT, help="Images per backbone forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda[:N].")
@click.option("--workers", default=None, type=WORKERS, help="Decoding/augmentation worker processes [default: cores - 1, at most 8; none on a 2-core CPU].")
@click.option("--shard-size", default=64, show_default=True, type=COUNT, help="Samples per HDF5 shard.")
@click.option("--classes", default=None,
              help="Class names in id order for masks of ids 0..K-1 (e.g. ground,sky,tree; 255 ignored), or a JSON "
                   "class table [default: the layout's own: Falcon's published 10 classes (600 -> Background), "
                   "Cityscapes' 19 train ids, ADE20K's 150, VOC's 21; `seg classes` prints them, `seg classes "
                   "--data ROOT` one from your masks].")
@click.option("--fp32", is_flag=True, help="Compute in float32 instead of half precision.")
@click.option("--token-dtype", type=click.Choice(["fp16", "int8"]), default="fp16", show_default=True,
              help="How tokens are stored: float16, or int8 with a float16 scale per 32 channels (0.53x the bytes).")
@click.option("--copy-paste", "copy_paste", default="none", show_default=True,
              help="Paste instances of rare classes into train samples: none, auto (classes under 1% of "
                   "train pixels) or class names/ids, e.g. Logs,Rocks.")
@click.option("--copy-paste-scale", default="0.5,1.5", show_default=True, help="Scale jitter LOW,HIGH of pasted instances.")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="A plain folder (images/ and masks/ at the top, no split folders): the share of images, "
                   "chosen by a hash of each name, that form the val split.")
@click.option("--overwrite", is_flag=True, help="Replace the seg cache in --out (deletes only the files its manifest lists).")
@NO_PROGRESS
@user_errors(on_interrupt="interrupted; rerun the same command to resume (finished shards are kept)",
             on_oom="lower --batch-size, then rerun the same command: finished shards are kept")
def extract(**kw) -> None:
    """Run the frozen DINOv2 or DINOv3 backbone once per (image, aug seed) and store tokens in HDF5 shards."""
    from seg.extract_features import ExtractConfig, extract as run

    cfg = ExtractConfig(
        data=kw["data"], out=kw["out"], layout=kw["layout"], backbone=kw["backbone"], size=kw["size"], weights=kw["weights"],
        random_init=kw["random_init"], random_init_seed=kw["random_init_seed"], aug_policy=kw["aug_policy"], border_fill=kw["border_fill"],
        aug_seeds=kw["aug_seeds"], splits=tuple(s.strip() for s in kw["splits"].split(",")
                                                 if s.strip() and s.strip() != "none"),
        unlabeled=tuple(kw["unlabeled"]), every=kw["every"], flip_views=kw["flip_views"],
        layers=kw["layers"], tap_block=kw["tap_block"], batch_size=kw["batch_size"], device=kw["device"], workers=kw["workers"],
        shard_size=kw["shard_size"], classes=kw["classes"], overwrite=kw["overwrite"], half=not kw["fp32"],
        token_dtype=kw["token_dtype"], copy_paste=kw["copy_paste"], copy_paste_scale=parse_pair(kw["copy_paste_scale"], "--copy-paste-scale"),
        progress=not kw["no_progress"], val_fraction=kw["val_fraction"],
    )
    from seg.runtime import distributed

    d = distributed.init(cfg.device)
    try:
        summary = run(cfg, log=click.echo, dist_ctx=d)
    finally:
        distributed.shutdown(d)
    if d.is_main:
        for line in summary.lines:
            click.echo(line)


@main.command("train-head", epilog=example("seg train-head --cache cache/b14 --out runs/p3 --phase 3",
                                            "seg train-head --cache cache/cs --out runs/cs --phase 3 --epochs 20"))
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False), help="Feature cache from `seg extract`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, history, plots).")
@click.option("--phase", type=click.IntRange(1, 3), default=3, show_default=True, help="Published preset to start from.")
@click.option("--head", type=click.Choice(["convnext", "upernet", "linear", "upernet-ms", "pmt"]),
              help="Override the preset's head (linear: DINOv2's BN + 1x1 conv; upernet-ms: pyramid over 4 layers; "
                   "pmt: PMT's mask decoder with its published recipe).")
@click.option("--ms-fusion", type=click.Choice(["reduce", "full"]),
              help="upernet-ms: fuse the 4 levels with a 1x1 reduction then a 3x3 conv (reduce), or mmseg's 3x3 over all (full). [default: reduce]")
@click.option("--loss", type=click.Choice(["ce", "weighted_ce", "focal_dice", "lin_focal_dice", "mask_classification"]),
              help="Override the loss (focal_dice = the published focal; lin_focal_dice = Lin et al.'s; "
                   "mask_classification = PMT's, for --head pmt).")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), help="Override the optimizer.")
@click.option("--lr", type=float, help="Base learning rate.")
@click.option("--momentum", type=float, help="SGD momentum.")
@click.option("--weight-decay", type=float, help="Weight decay.")
@click.option("--schedule", type=click.Choice(["none", "cosine", "warmup_cosine", "step_warmup_cosine"]),
              help="LR schedule: per epoch, or step_warmup_cosine per optimizer step (PMT's).")
@click.option("--warmup-epochs", type=int, help="Warmup epochs for warmup_cosine.")
@click.option("--warmup-fraction", type=float, help="Share of all steps that warm up, for step_warmup_cosine.")
@click.option("--grad-clip", type=float, help="Clip the gradients' global norm to this [pmt: 0.01; else never].")
@click.option("--queries", type=int, help="pmt: learned queries [default: 100].")
@click.option("--decoder-blocks", type=int, help="pmt: decoder blocks [default: 6].")
@click.option("--masked-attention/--no-masked-attention", default=None,
              help="pmt: masked attention before each block, annealed away during training [default: on].")
@click.option("--mask-points", type=int, help="pmt: points the loss samples per mask [default: 12544].")
@click.option("--eta-min", type=float, help="Cosine floor.")
@click.option("--epochs", type=int, help="Epochs (cosine schedules span them).")
@click.option("--batch-size", type=int, help="Samples per step.")
@click.option("--accum", type=int, help="Gradient accumulation steps.")
@click.option("--patience", type=int, help="Early-stopping patience in epochs (0 = never stop early).")
@click.option("--select", type=click.Choice(["best", "final"]), help="best.pt holds the best-val-mIoU or the final weights.")
@click.option("--amp/--no-amp", default=None, help="Half-precision autocast.")
@click.option("--amp-dtype", type=click.Choice(["auto", "bf16", "fp16"]), default="auto", show_default=True,
              help="Autocast dtype: auto = fp16 with a GradScaler on a GPU (as published), bf16 on a CPU.")
@click.option("--focal-gamma", type=float, help="Focal loss gamma.")
@click.option("--dice-weight", type=float, help="Weight of the Dice term in focal_dice.")
@click.option("--max-class-weight", type=float, help="Largest inverse-frequency class weight.")
@click.option("--seed", type=int, help="Seed for head init and the per-epoch sample draw.")
@click.option("--all-seeds", is_flag=True, default=None, help="Visit every cached (image, aug seed) each epoch.")
@click.option("--sampling", type=click.Choice(["uniform", "rare-class"]),
              help="Epoch draw: uniform (published) or rare-class (DAFormer's RCS over cached samples).")
@click.option("--rcs-temperature", type=float, help="Rare-class sampling temperature T [default: 0.01].")
@click.option("--rcs-min-pixels", type=int,
              help="Pixels of the drawn class a sample must hold [default: 3000 at 1024x512, scaled to the mask].")
@click.option("--tune-blocks", type=click.IntRange(min=0),
              help="Also train the last k backbone blocks and the final norm (needs `extract --tap-block N-k`).")
@click.option("--backbone-lr", type=float, help="Learning rate of the tuned blocks [default: lr / 10].")
@click.option("--layer-decay", type=float, help="Tuned block i of k learns at backbone-lr x decay^(k-1-i) [default: 1].")
@click.option("--weights", type=click.Path(),
              help="--tune-blocks: the backbone checkpoint the cache was built with (checked by sha256) "
                   "[default: the torch hub cache].")
@click.option("--checkpointing", is_flag=True,
              help="--tune-blocks: recompute block activations in backward (less memory, ~1/3 more compute).")
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda[:N].")
@click.option("--preload", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Hold the cache on the device, or stream it from the shards.")
@click.option("--workers", type=WORKERS, default=None, help="Reader processes when streaming [default: 0 on a CPU (reads in the training process), up to 4 on a GPU].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--overwrite", is_flag=True, help="Replace the seg run in --out (deletes its files; says which).")
@click.option("--scale-batch", is_flag=True,
              help="Under torchrun, give every rank the whole --batch-size and --accum (global batch x world) "
                   "instead of splitting the preset's batch over the ranks.")
@click.option("--strict-preset", is_flag=True,
              help="Refuse a cache whose backbone, size or layers differ from the phase's published ones.")
@click.option("--allow-mismatch", is_flag=True, hidden=True,
              help="Accepted for old scripts: a mismatching cache is trained on by default now.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every shard before training.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="Start from a run's config.json (or a file of that shape); flags override it.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False),
              help="Start the head from this finished run's best.pt (a new run: fresh optimizer and LR schedule).")
@click.option("--target", type=click.Path(file_okay=False),
              help="Pseudo-labels of an unlabeled split of the cache (`seg pseudo-label --out DIR`): mix those "
                   "samples into every batch; validation and the best model stay on the labelled val split.")
@click.option("--target-ratio", type=float, help="--target: the target's share of each batch [default: 0.5].")
@click.option("--target-weight", type=float, help="--target: the weight of the target samples' loss [default: 1].")
@click.option("--init-from-pmt", type=click.Path(dir_okay=False),
              help="pmt: start the decoder from a published PMT checkpoint (its class head dropped when the "
                   "class count differs).")
@click.option("--tensorboard", is_flag=True, help="Log to RUN/tensorboard (needs: pip install 'seg[tensorboard]').")
@click.option("--deterministic", is_flag=True,
              help="Bit-repeatable training steps on one GPU: torch's deterministic algorithms (slower). "
                   "A CPU run repeats without it.")
@NO_PROGRESS
@click.pass_context
@user_errors(on_interrupt="interrupted; rerun with --resume to continue from the last finished epoch",
             on_oom="lower --batch-size (with --accum to keep the effective batch), stream with --preload never, "
                    "or with --tune-blocks add --checkpointing; --resume continues from the last finished epoch")
def train_head(ctx, cache_dir, out, phase, device, preload, workers, resume, overwrite, strict_preset, allow_mismatch,
               no_verify, weights, checkpointing, no_progress, amp_dtype, scale_batch, config_file, init_from,
               init_from_pmt, target, tensorboard, deterministic, **overrides) -> None:
    """Train a segmentation head from cached tokens (phases 1-3 reproduce the published runs).

    On a cache of another backbone or size (DINOv3, your own dataset) the preset's other settings
    apply and seg says the run is not the published configuration."""
    from seg.scoring.metrics import format_table
    from seg.train.presets import resolve
    from seg.train_head import RunOptions, train

    from seg.runtime import distributed

    source = None
    if target:  # the defaults of a run with a target; flags (or a --config file's values) override them
        from seg.train.presets import TARGET_DEFAULTS

        overrides.update({k: v for k, v in TARGET_DEFAULTS.items() if overrides.get(k) is None})
    if config_file:
        from seg.train.config_file import config_from_file

        explicit = ctx.get_parameter_source("phase") == click.core.ParameterSource.COMMANDLINE
        cfg, source = config_from_file(config_file, overrides, phase if explicit else None)
    else:
        cfg = resolve(phase, overrides)
    d = distributed.init(device)
    try:
        metrics = train(cfg, cache_dir, out, RunOptions(device, preload, workers, resume, allow_mismatch,
                                                        overwrite=overwrite, strict_preset=strict_preset,
                                                        verify=not no_verify,
                                                        weights=weights, checkpointing=checkpointing,
                                                        progress=not no_progress, amp_dtype=amp_dtype,
                                                        scale_batch=scale_batch, tensorboard=tensorboard,
                                                        init_from=init_from, init_from_pmt=init_from_pmt, target=target,
                                                        config_source=source,
                                                        deterministic=deterministic),
                        log=click.echo, dist_ctx=d)
    finally:
        distributed.shutdown(d)
    if not d.is_main:
        return
    if metrics:
        click.echo(f"best epoch {metrics['epoch']} on val:")
        click.echo(format_table(metrics))  # the stored JSON (NaN as null) prints as-is
    click.echo(f"run: {out} (best.pt, last.pt, history.csv, metrics.json, curves.png, per_class_iou.png)")


@main.command("eval", epilog=example("seg eval --run runs/p3 --cache cache/b14 --split val",
                                     "seg eval --run runs/p3 --data /data/falcon --split test --mode slide --tta flip"))
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory (best.pt).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), help="Score from this cache's tokens (fast).")
@click.option("--data", type=click.Path(file_okay=False), help="Score end to end from images under this dataset root.")
@LAYOUT
@click.option("--split", default="val", show_default=True, help="train|val|test.")
@click.option("--weights", type=click.Path(), help="Backbone checkpoint file or folder (checked by sha256).")
@click.option("--tta", type=click.Choice(["none", "flip", "flip+scales"]), default="none", show_default=True,
              help="Test-time augmentation (images only).")
@click.option("--full-res", is_flag=True, help="Score at the original image size (masks read from disk).")
@click.option("--mode", type=click.Choice(["resize", "slide"]), default="resize", show_default=True,
              help="resize: the whole image to the training size; slide: training-size windows over the original.")
@click.option("--stride", default=None, help="slide: window step WxH [default: 2/3 of the window].")
@click.option("--tta-scales", default=None,
              help="flip+scales: comma-separated scales [default: 0.75,1,1.25; DINOv2's +ms: 1,1.32,1.73,2.28,3].")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="--data a plain folder: the val share given to `seg extract` (the same images are val).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [default: RUN/eval-SPLIT from the cache; RUN/eval-SPLIT-images[-fullres|-slide][-tta-...] from images].")
@click.option("--batch-size", default=4, show_default=True, type=COUNT, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda[:N].")
@click.option("--workers", type=WORKERS, default=None, help="Image decoding processes.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the cache's shards (with --cache).")
@NO_PROGRESS
@user_errors
def eval_cmd(run_dir, cache_dir, data, layout, split, weights, tta, full_res, mode, stride, tta_scales, val_fraction,
             out, batch_size, device, workers, no_verify, no_progress) -> None:
    """Per-class IoU, Dice, accuracy and confusion matrix of a run on a split."""
    from seg.evaluate import EvalOptions, evaluate

    evaluate(EvalOptions(run=run_dir, split=split, cache=cache_dir, data=data, layout=layout, weights=weights, tta=tta,
                         full_res=full_res, out=out, device=device, batch_size=batch_size, workers=workers,
                         verify=not no_verify, mode=mode, stride=parse_stride(stride),
                         tta_scales=parse_scales(tta_scales), progress=not no_progress, val_fraction=val_fraction),
             log=click.echo)


@main.command(epilog=example("seg predict --run runs/p3 --images new_photos/ --out predictions"))
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory (best.pt).")
@click.option("--images", required=True, multiple=True,
              help="Image or video (mp4, avi, mkv, mov) files, or folders of them (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--weights", type=click.Path(), help="Backbone checkpoint file or folder (checked by sha256).")
@click.option("--overlay-alpha", default=0.5, show_default=True, help="Mask opacity in overlays.")
@click.option("--overlay-legend", is_flag=True, help="A legend strip of the classes shown under each overlay image.")
@click.option("--save-raw", is_flag=True, help="Also write masks in the dataset's raw values (uint16, original size).")
@click.option("--save-ids", is_flag=True,
              help="Also write class-id maps (ids/: uint8 PNGs, uint16 past 255 classes; the ids of legend.png).")
@click.option("--tta", type=click.Choice(["none", "flip", "flip+scales"]), default="none", show_default=True)
@click.option("--mode", type=click.Choice(["resize", "slide"]), default="resize", show_default=True,
              help="resize: the whole image to the training size; slide: training-size windows over the original.")
@click.option("--stride", default=None, help="slide: window step WxH [default: 2/3 of the window].")
@click.option("--tta-scales", default=None,
              help="flip+scales: comma-separated scales [default: 0.75,1,1.25; DINOv2's +ms: 1,1.32,1.73,2.28,3].")
@click.option("--batch-size", default=4, show_default=True, type=COUNT)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: the cache's backbone dtype and the run's training autocast; fp32: labels exactly as the "
                   "float32 ONNX graph of `seg export`; bf16/fp16: backbone and head in that dtype.")
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda[:N].")
@click.option("--workers", type=WORKERS, default=None, help="Image decoding processes.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping it.")
@click.option("--video-masks", is_flag=True, help="Videos (mp4, avi, mkv, mov): also write each frame's colour mask.")
@NO_PROGRESS
@user_errors
def predict(run_dir, images, out, weights, overlay_alpha, overlay_legend, save_raw, save_ids, tta, mode, stride, tta_scales, batch_size,
            precision, device, workers, strict, video_masks, no_progress) -> None:
    """Colour masks, overlays, and image | ground truth | prediction where a mask sits beside the image."""
    from seg.predict import PredictOptions, predict as run

    run(PredictOptions(run=run_dir, images=images, out=out, weights=weights, overlay_alpha=overlay_alpha,
                       save_raw=save_raw, save_ids=save_ids, overlay_legend=overlay_legend, tta=tta, device=device, batch_size=batch_size, workers=workers,
                       strict=strict, mode=mode, stride=parse_stride(stride), tta_scales=parse_scales(tta_scales),
                       precision=precision, progress=not no_progress, video_masks=video_masks),
        log=click.echo)
