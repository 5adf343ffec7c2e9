"""`seg export`: a trained run as one ONNX graph from uint8 pixels to class ids and logits, checked
with onnxruntime against the eager model before it is published."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from seg.backbones.named import file_sha256
from seg.backbones.rebuild import rebuild_backbone
from seg.data.augment import Augmenter, parse_size
from seg.data.decode import read_image
from seg.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from seg.data.synthetic import make_scene
from seg.deploy.graph import PixelsToClasses
from seg.deploy.onnx_file import DEFAULT_OPSET, open_session, require_onnx, write_onnx
from seg.deploy.parity import LOGIT_BOUND, compare
from seg.infer.runs import load_run
from seg.infer.segmenter import Segmenter
from seg.runtime.atomic import publish, write_json
from seg.runtime.output import Output, temp_path
from seg.runtime.errors import SegError

# The ONNX protobuf holds at most 2 GiB; larger graphs need external data files, not written here.
MAX_PARAM_BYTES = 1_900_000_000
SAMPLE_IMAGES = 4


@dataclass
class ExportOptions:
    run: str
    out: str
    size: Optional[str] = None          # WxH; default: the run's size
    opset: int = DEFAULT_OPSET
    weights: Optional[str] = None       # the backbone weights file, when not where the cache found it
    samples: Sequence[str] = ()         # images for the parity check; default: synthetic scenes
    overwrite: bool = False             # replace an earlier `seg export` at --out
    dynamic_size: bool = False          # images of any size in, resized in the graph as `seg predict` does


def report_path(out: Path) -> Path:
    """The parity report beside the model: model.onnx -> model.parity.json."""
    return out.with_suffix(".parity.json")


def rejected_report_path(out: Path) -> Path:
    """Where the report of a refused export goes: never over the accepted model's report."""
    return out.with_suffix(".parity-rejected.json")


def _is_export_report(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = {"onnx", "accepted", "onnx_sha256", "parity", "bound"}
    return data if isinstance(data, dict) and keys <= set(data) else None


def export_output(out: Path) -> Output:
    """The claim on the model file and the reports beside it (seg.runtime.output): the model is seg's
    only when its report records its sha256; each report only when it is a seg export report."""
    sides = {out.name, report_path(out).name, rejected_report_path(out).name}

    def owns(name: str) -> bool:
        path = out.parent / name
        if name == out.name:
            report = _is_export_report(report_path(out))
            return path.is_file() and report is not None and report["onnx_sha256"] == file_sha256(path)
        return _is_export_report(path) is not None

    return Output(out.parent, "export", owns, f".{out.name}.seg-export.lock", what="export",
                  covers=sides.__contains__)


def export_onnx(opts: ExportOptions, log: Callable[[str], None] = print) -> dict:
    """Export, check against the eager model, and publish the model only when within the bound.
    Returns the report (also written beside the model)."""
    require_onnx()
    out = Path(opts.out)
    if out.suffix.lower() != ".onnx":
        raise SegError(f"{out}: the model file must end in .onnx")
    with export_output(out):
        if out.exists() and not opts.overwrite:
            raise SegError(f"{out}: already exists; pass --overwrite to replace an earlier seg export")
        return _export(opts, out, log)


def _export(opts: ExportOptions, out: Path, log: Callable[[str], None]) -> dict:
    cpu = torch.device("cpu")
    run = load_run(opts.run, cpu)
    patch = run.backbone["patch_size"]
    w, h = parse_size(opts.size, patch) if opts.size else run.size
    backbone = rebuild_backbone(run.backbone, opts.weights, cpu)
    n_bytes = 4 * sum(p.numel() for m in (backbone, run.head) for p in m.parameters())
    if n_bytes > MAX_PARAM_BYTES:
        raise SegError(f"{run.backbone['backbone']}: {n_bytes / 1e9:.1f} GB of float32 weights exceed the 2 GB an "
                       "ONNX file holds without external data, which seg export does not write")
    graph = PixelsToClasses(backbone, copy.deepcopy(run.head), run.backbone["layers"], run.tap_block, (h, w), patch,
                            run.levels, opts.dynamic_size)
    batches = _parity_batches(opts.samples, (w, h), opts.dynamic_size)
    with torch.no_grad():  # before the export, which may leave the module traced
        eager = [graph(images) for images in batches]
    tmp = temp_path(out)
    table = run.class_table
    metadata = {"seg.classes": json.dumps(table.to_json()), "seg.size": f"{w}x{h}",
                "seg.backbone": run.backbone["backbone"], "seg.head": run.record["config"]["head"],
                "seg.input": "uint8 NHWC RGB of any size, resized in the graph" if opts.dynamic_size else
                             f"uint8 NHWC RGB at {w}x{h} (cv2.resize INTER_LINEAR to it first)"}
    log(f"exporting {run.backbone['backbone']} + {run.record['config']['head']} at {w}x{h}"
        + (" (images of any size in)" if opts.dynamic_size else "") + f", opset {opts.opset} ...")
    try:
        write_onnx(graph, batches[0][:2], tmp, opts.opset, metadata, opts.dynamic_size)
        session = open_session(tmp)
        checks, reported = [], []
        # What `seg predict` computes: in the run's own precision (half-precision backbone and head:
        # differs by design, reported) and in float32 (the graph's computation: labels should agree)
        predictors = [(f"seg predict ({run.backbone['compute_dtype']} backbone, amp head "
                       f"{bool(run.record['config']['amp'])})", Segmenter(run, opts.weights, cpu)),
                      ("seg predict --precision fp32", Segmenter(run, opts.weights, cpu, precision="fp32"))]
        for images, (eager_labels, eager_logits) in zip(batches, eager):
            at = f"{images.shape[2]}x{images.shape[1]}"
            onnx_labels, onnx_logits = session.run(None, {"image": images.numpy()})
            checks.append(compare(f"eager float32 graph at {at} (PyTorch kernels)", onnx_labels, onnx_logits,
                                  eager_logits.numpy(), eager_labels.numpy()))
            small = images if not opts.dynamic_size else \
                torch.from_numpy(np.stack(_resized([i.numpy() for i in images], (w, h))))
            for name, segmenter in predictors:
                scores = segmenter.scores(small, tuple(images.shape[1:3])).float().numpy()
                reported.append(compare(f"{name} at {at}", onnx_labels, onnx_logits, scores))
        accepted = all(c.within_bound for c in checks)
        checks += reported
        report = _report(opts, run, (w, h), checks, accepted, tmp if accepted else None)
        if accepted:
            # the report first: a model under the final name always has its matching report
            write_json(report_path(out), report)
            publish(tmp, out)
            rejected_report_path(out).unlink(missing_ok=True)
        else:  # the earlier good model and its report stay as they were
            write_json(rejected_report_path(out), report)
    finally:
        tmp.unlink(missing_ok=True)
    for line in _table(checks):
        log(line)
    if not accepted:
        c = next(c for c in checks if not c.within_bound)
        raise SegError(f"{out}: not written: onnxruntime differs from the eager graph by {c.max_abs_logit_diff:.3g} "
                       f"(bound {c.tolerance:.3g}) with {c.decided_disagreements} confidently labelled pixels "
                       f"changed; see {rejected_report_path(out)}"
                       + ("; the earlier model there is unchanged" if out.exists() else ""))
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {report_path(out)}")
    return report


PARITY_SIZES = ((960, 540), (1280, 720), (480, 270))  # dynamic graphs: as made, larger, smaller than most runs


def _parity_batches(paths: Sequence[str], size: tuple[int, int], dynamic: bool) -> list[torch.Tensor]:
    """The parity check's batches of uint8 images: the given files, or procedural desert scenes
    (textured regions, edges and noise: what real images have and constant or white-noise inputs do
    not). A fixed-size graph gets one batch resized to the export size as `seg predict` resizes; a
    dynamic one gets its images at their own sizes (files grouped by size) and the scenes at three
    sizes around the export size."""
    rgbs = [read_image(Path(p)) for p in paths] if paths else [make_scene(1000 + i)[0] for i in range(SAMPLE_IMAGES)]
    if not dynamic:
        return [_batch(_resized(rgbs, size))]
    if paths:
        by_size: dict[tuple, list] = {}
        for rgb in rgbs:
            by_size.setdefault(rgb.shape, []).append(rgb)
        return [_batch(group) for group in by_size.values()]
    return [_batch(_resized(rgbs, s)) for s in PARITY_SIZES]


def _resized(rgbs: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    resize = Augmenter("none", size)
    return [resize(rgb, None, "", 0)[0] for rgb in rgbs]


def _batch(rgbs: list[np.ndarray]) -> torch.Tensor:
    if len(rgbs) < 2:
        rgbs = rgbs * 2  # the export needs a batch of 2 to keep the batch dimension dynamic
    return torch.from_numpy(np.stack(rgbs))


def _report(opts: ExportOptions, run, size, checks, accepted: bool, model: Optional[Path]) -> dict:
    import onnx
    import onnxruntime

    w, h = size
    k = run.class_table.num_classes
    return {
        "onnx": str(Path(opts.out).resolve()), "accepted": accepted,
        "onnx_sha256": file_sha256(model) if model else None,
        "run": str(Path(opts.run).resolve()), "backbone": run.backbone["backbone"],
        "head": run.record["config"]["head"], "size": {"width": w, "height": h}, "opset": opts.opset,
        "inputs": {"image": {"dtype": "uint8", "shape": ["N", "H", "W", 3] if opts.dynamic_size else ["N", h, w, 3],
                             "layout": "NHWC RGB 0..255",
                             "resize": (f"in the graph: to {w}x{h} as cv2.resize INTER_LINEAR (uint8), as seg predict"
                                        if opts.dynamic_size else f"none in the graph: resize to {w}x{h} with "
                                        "cv2.resize(image, (W, H), interpolation=cv2.INTER_LINEAR) first")}},
        "outputs": {"labels": {"dtype": "uint8", "shape": ["N", "H", "W"] if opts.dynamic_size else ["N", h, w]},
                    "logits": {"dtype": "float32", "shape": ["N", k, "H", "W"] if opts.dynamic_size else ["N", k, h, w],
                               "meaning": "log of PMT's semantic scores" if run.levels else "class logits"}},
        "normalization": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "in_graph": True},
        "class_table": run.class_table.to_json(),
        "bound": {"logit": LOGIT_BOUND, "rule": "max |logit diff| <= bound x max(1, max |eager logit|), and no "
                  "label change where the eager top-2 margin exceeds twice that tolerance"},
        "parity": [c.to_json() for c in checks],
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _table(checks) -> list[str]:
    """The parity table: the eager rows decide (bounded); the others are reported for comparison."""
    rows = [f"{'compared with':58s} {'max|dlogit|':>11s} {'tolerance':>10s} {'labels equal':>12s} {'sure flips':>10s}"]
    for c in checks:
        tolerance = f"{c.tolerance:10.3g}" if c.reference.startswith("eager") else f"{'(report)':>10s}"
        rows.append(f"{c.reference[:58]:58s} {c.max_abs_logit_diff:11.3g} {tolerance} "
                    f"{100 * c.label_agreement:11.3f}% {c.decided_disagreements:10d}")
    rows.append("sure flips: pixels whose label changed although the reference's top two logits are more than twice "
                "the tolerance apart (rounding cannot flip those). Only the eager rows are held to their tolerance; "
                "the others are reported (the run's own precision differs by design).")
    return rows
