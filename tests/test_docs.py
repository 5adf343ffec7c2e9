"""The docs cannot drift from the CLI: the site builds with `mkdocs build --strict`, and every `seg`
command written in README.md and docs/ parses against the command tree as it is (an unknown flag, a
renamed command or a choice that no longer exists fails here). docs/your-own-images.md is also run
as written (test_walkthrough.py)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from seg.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(page: Path) -> list[str]:
    """Every `seg ...` line of the page's bash blocks, continuations joined, comments dropped."""
    found = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
                part = part.split("  #")[0].split(" # ")[0].strip().removeprefix(".venv/bin/")
                if " -m seg " in part:  # torchrun ... -m seg COMMAND
                    part = "seg " + part.split(" -m seg ", 1)[1]
                if part.startswith("seg ") and "..." not in part:
                    found.append(part)
    return found


def parse(command: str) -> None:
    """Resolve the subcommand chain and parse its arguments as click would, without running it."""
    args = shlex.split(command)[1:]
    group, rest = main, args
    parent = main.make_context("seg", [], resilient_parsing=True)
    while isinstance(group, click.Group) and rest and not rest[0].startswith("-"):
        asked = rest[0]
        name, cmd, rest = group.resolve_command(parent, rest)
        if cmd is None:
            raise click.UsageError(f"no such command {asked!r}")
        parent = click.Context(cmd, info_name=name, parent=parent)
        group = cmd
    # paths name the reader's files, which this machine lacks: existence is not the docs' to prove
    paths = [p.type for p in group.params if isinstance(p.type, click.Path) and p.type.exists]
    for t in paths:
        t.exists = False
    try:
        group.make_context(group.name, list(rest), parent=parent)
    except click.MissingParameter:
        pass  # a documented fragment may leave a required flag to the surrounding text
    finally:
        for t in paths:
            t.exists = True


def test_the_site_builds_strictly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "training" / "index.html").is_file()


def test_readme_is_a_short_first_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 150
    text = "\n".join(lines)
    for needed in ("seg demo", "pytest -q tests", "seg extract", "seg train-head", "seg eval", "import seg"):
        assert needed in text, needed


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_command_parses(page):
    found = commands(page)
    for command in found:
        try:
            parse(command)
        except click.ClickException as exc:
            pytest.fail(f"{page.name}: `{command}`: {exc.format_message()}")


def test_the_docs_name_every_command():
    documented = {shlex.split(c)[1] for page in PAGES for c in commands(page)}
    assert set(main.commands) <= documented, sorted(set(main.commands) - documented)
