"""The helper commands: the demo, built-in class tables, cache info and verify."""

from __future__ import annotations

import json

import click

from seg.cli.common import example, user_errors
from seg.cli.group import main


@main.command(epilog=example("seg demo --out seg-demo"))
@click.option("--out", default="seg-demo", show_default=True, type=click.Path(file_okay=False), help="Where everything goes.")
@click.option("--train-images", default=48, show_default=True, help="Generated training images.")
@click.option("--epochs", default=12, show_default=True, help="Head training epochs.")
@click.option("--size", default="322x182", show_default=True, help="Backbone input size (multiples of 14).")
@click.option("--random-init", is_flag=True, help="Use random backbone weights without trying the official ones.")
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda[:N].")
@user_errors
def demo(out, train_images, epochs, size, random_init, device) -> None:
    """Generate a small dataset and run extract, train-head, eval and predict on it."""
    from seg.demo import DemoOptions, run_demo

    run_demo(DemoOptions(out=out, train_images=train_images, epochs=epochs, size=size, random_init=random_init,
                         device=device), log=click.echo)


@main.command("classes", epilog=example("seg classes --layout falcon > my-classes.json"))
@click.option("--layout", required=True, type=click.Choice(["falcon", "cityscapes", "ade20k", "voc"]),
              help="The public layout whose built-in class table to print.")
@user_errors
def classes_cmd(layout: str) -> None:
    """Print a layout's built-in class table as the JSON that --classes takes, to start your own from."""
    from seg.data.public_tables import builtin_table

    click.echo(json.dumps(builtin_table(layout).to_json(), indent=2))


@main.group(epilog=example("seg cache info cache/b14 && seg cache verify cache/b14"))
def cache() -> None:
    """Inspect and check feature caches."""


@cache.command("info", epilog=example("seg cache info cache/b14"))
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@user_errors
def cache_info(cache_dir: str, as_json: bool) -> None:
    """Print a cache's manifest in human form (--json: the manifest itself, per-split class_counts included)."""
    from seg.cache import describe
    from seg.cache.format import read_manifest

    if as_json:
        click.echo(json.dumps(read_manifest(cache_dir), indent=2))
        return
    for line in describe(cache_dir):
        click.echo(line)


@cache.command("verify", epilog=example("seg cache verify cache/b14 --sources"))
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--sources", is_flag=True, help="Also list source images/masks changed or missing since extraction.")
@user_errors
def cache_verify(cache_dir: str, sources: bool) -> None:
    """Re-read every shard; check checksums, shapes and order. Exit 1 on any problem."""
    from seg.runtime.progress import progress_bar
    from seg.cache import verify
    from seg.cache.format import read_manifest

    splits = read_manifest(cache_dir, check=False).get("splits")  # its inconsistencies are verify's to list
    total = sum(len(s.get("images") or []) * len(s.get("seeds") or []) for s in splits.values()
                if isinstance(s, dict)) if isinstance(splits, dict) else 0
    with progress_bar(total=total, unit="sample", desc="verify") as bar:
        problems = verify(cache_dir, progress=bar.update, sources=sources)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise click.ClickException(f"{cache_dir}: {len(problems)} problem(s) found")
    click.echo(f"{cache_dir}: OK ({total} samples)")
