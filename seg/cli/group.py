"""The `seg` command group; the commands register themselves in `pipeline` and `tools`."""

from __future__ import annotations

import click

from seg import __version__
from seg.cli.common import example


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=example(
    "seg extract --data DATA --out cache --backbone vitb14_reg --size 644x364",
    "seg train-head --cache cache --out run --phase 3",
    "seg eval --run run --cache cache"))
@click.version_option(__version__, prog_name="seg")
def main() -> None:
    """Semantic-segmentation heads on cached, frozen DINOv2/DINOv3 features."""
