"""The deployment command: `seg export`."""

from __future__ import annotations

import click

from seg.cli.common import example, user_errors
from seg.cli.group import main


@main.command("export", epilog=example("seg export --run run --out model.onnx",
                                       "seg export --run run --out model-448.onnx --size 448x252",
                                       "seg export --run run --out model-any.onnx --dynamic-size"))
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A train-head run directory (its best.pt).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--size", default=None, help="Export size WxH (multiples of the patch size). [default: the run's]")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(18, 23), help="ONNX opset.")
@click.option("--weights", default=None, help="Backbone weights file, if not where the cache was built from.")
@click.option("--samples", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Images for the parity check (repeatable). [default: 4 synthetic scenes]")
@click.option("--dynamic-size", is_flag=True,
              help="Take images of any height and width: the graph resizes them to the export size exactly as "
                   "`seg predict` does and returns labels and logits at the input's size. Without it, the graph "
                   "takes the export size only: resize with cv2.resize(image, (W, H), interpolation=cv2.INTER_LINEAR).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier seg export at --out.")
@user_errors
def export(run_dir, out, size, opset, weights, samples, dynamic_size, overwrite) -> None:
    """One ONNX graph from uint8 RGB pixels [N, H, W, 3] to class ids and logits, checked with
    onnxruntime against the eager model; refused when they differ beyond the bound."""
    from seg.export_model import ExportOptions, export_onnx

    export_onnx(ExportOptions(run=run_dir, out=out, size=size, opset=opset, weights=weights, samples=samples,
                              overwrite=overwrite, dynamic_size=dynamic_size), log=click.echo)
