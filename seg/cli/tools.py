"""The helper commands: the demo, built-in class tables, cache info and verify."""

from __future__ import annotations

import json
from pathlib import Path

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


@main.command("classes", epilog=example("seg classes --layout falcon > my-classes.json",
                                        "seg classes --data mydata > my-classes.json"))
@click.option("--layout", default=None, type=click.Choice(["falcon", "cityscapes", "ade20k", "voc", "folders"]),
              help="The public layout whose built-in class table to print (with --data: the layout of ROOT).")
@click.option("--data", default=None, type=click.Path(exists=True, file_okay=False),
              help="A dataset whose masks hold class ids: print a starting table with one class per id found.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@user_errors
def classes_cmd(layout, data, no_progress) -> None:
    """Print a class table as the JSON that --classes takes: a layout's built-in one, or, with --data,
    one class per mask value found (rename the classes, then pass the file to --classes)."""
    if data is not None:
        from seg.data.classes import table_from_mask_values
        from seg.data.decode import raw_mask_values
        from seg.data.layouts import SPLITS, list_split, resolve_layout
        from seg.runtime.errors import SegError
        from seg.runtime.progress import progress_bar

        found_layout = resolve_layout(data, layout or "auto")
        masks = []
        for split in SPLITS:
            try:
                files = list_split(data, split, layout=found_layout)
            except SegError:  # a split the dataset does not have
                continue
            masks += [files.mask_path(i) for i in range(len(files.names))]
        if not masks:
            raise SegError(f"{data}: no masks found in its {found_layout} layout")
        values: set[int] = set()
        with progress_bar(enabled=not no_progress, total=len(masks), unit="mask", desc="classes") as bar:
            for path in masks:
                values |= {int(v) for v in raw_mask_values(path)}
                bar.update(1)
        click.echo(json.dumps(table_from_mask_values(sorted(values)), indent=2))
        return
    if layout is None or layout == "folders":
        raise click.UsageError("give --layout falcon|cityscapes|ade20k|voc for a built-in table, or --data ROOT "
                               "to make one from your masks")
    from seg.data.public_tables import builtin_table

    click.echo(json.dumps(builtin_table(layout).to_json(), indent=2))


@main.group(epilog=example("seg cache info cache/b14 && seg cache verify cache/b14"))
def cache() -> None:
    """Inspect and check feature caches."""


@cache.command("info", epilog=example("seg cache info cache/b14", "seg cache info pseudo/r1"))
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest (or pseudo-label record).")
@user_errors
def cache_info(cache_dir: str, as_json: bool) -> None:
    """Print a cache's manifest in human form (--json: the manifest itself, per-split class_counts included).
    Given a `seg pseudo-label` folder: its teacher, thresholds, coverage and per-class shares."""
    from seg.cache import describe
    from seg.cache.format import MANIFEST, read_manifest
    from seg.cache.pseudo import RECORD, read_pseudo

    if (Path(cache_dir) / RECORD).is_file() and not (Path(cache_dir) / MANIFEST).is_file():
        from seg.adapt.pseudo_label import describe_pseudo

        click.echo(json.dumps(read_pseudo(cache_dir), indent=2) if as_json else "\n".join(describe_pseudo(cache_dir)))
        return

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
