"""The output contract (seg.runtime.output), run on every command that takes --out. The commands are
found from the CLI itself: a new one fails `test_every_command_with_out_is_covered` until it has a
recipe here, and then goes through the same cases as the others:
  0. a refusal on an output that did not exist leaves none;
  a. a foreign file in its output: refused in one line naming it, the file untouched;
  b. a foreign file named like one of its own side files: refused, untouched;
  c. another process holding the output: refused naming its pid (sweeps wait for it instead);
  d. after a-c, a good run works (the refusals left nothing behind that blocks it), and user files
     with temporary-looking names beside a file output are left as they were;
  e. a refusal after the good output leaves every file of it byte for byte as it was;
  f. a rerun after that works.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import click
import pytest
import torch
from click.testing import CliRunner

from seg.cli import main
from seg.data.synthetic import LAYOUT, write_dataset
from conftest import SMALL_SIZE

pytestmark = pytest.mark.slow  # not in the quick lane (README: Development)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def commands_with_out(group: click.Group = main, prefix: str = "") -> list[str]:
    found = []
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            found += commands_with_out(cmd, f"{prefix}{name} ")
        elif any("--out" in getattr(p, "opts", ()) for p in cmd.params):
            found.append(prefix + name)
    return found


def one_line_error(r, *fragments):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1, r.output
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def ok(r):
    assert r.exit_code == 0, r.output
    return r


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, lock files aside (they hold the last holder's pid)."""
    out = {}
    for top, _, files in os.walk(folder):
        for f in files:
            p = Path(top) / f
            if not f.endswith(".lock") and not p.is_symlink():
                out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Recipe:
    good: Callable[[Path], list]          # a command that writes a good output at out
    refused_after: Callable[[Path], list] # one that must be refused on that good output
    rerun: Callable[[Path], list]         # one that must work on it
    lock: str                             # the lock's file name in the claimed folder
    sides: tuple[str, ...]                # files it writes beside its output, relative to the folder
    file_output: Optional[str] = None     # export: the output is this file in the folder
    bystanders: tuple[str, ...] = ()      # user files beside a file output that a good run never touches
    shared: bool = False                  # sweep: processes share the output and wait for the lock
    rerun_refused: bool = False           # demo: its finished output is kept, and a rerun says so
    fails_fresh: Optional[Callable[[Path], list]] = None  # fails on a new output after claiming it
                                                          # [default: refused_after]


@pytest.fixture(scope="module")
def nan_run(phase3_run, tmp_path_factory) -> Path:
    """A copy of a good run whose head weights are NaN (a diverged run)."""
    out = tmp_path_factory.mktemp("nan") / "run"
    shutil.copytree(phase3_run, out)
    record = torch.load(out / "best.pt", weights_only=True)
    first = next(k for k, v in record["head"].items() if v.is_floating_point())
    record["head"][first] = torch.full_like(record["head"][first], float("nan"))
    torch.save(record, out / "best.pt")
    return out


@pytest.fixture(scope="module")
def recipes(dataset, small_cache, phase3_run, nan_run, tmp_path_factory) -> dict[str, Recipe]:
    image = sorted((dataset / LAYOUT["val"] / "Color_Images").iterdir())[0]
    empty = tmp_path_factory.mktemp("norun")
    broken = write_dataset(tmp_path_factory.mktemp("broken"), {"val": 1})  # its mask is not a PNG
    next((broken / LAYOUT["val"] / "Segmentation").iterdir()).write_bytes(b"not a png")
    extract = ["extract", "--data", dataset, "--backbone", "vits14", "--size", SMALL_SIZE, "--random-init",
               "--workers", "0", "--splits", "val", "--no-progress"]
    train = ["train-head", "--cache", small_cache, "--phase", "1", "--epochs", "1", "--device", "cpu",
             "--no-progress", "--no-verify"]
    evaluate = ["eval", "--run", phase3_run, "--cache", small_cache, "--split", "val", "--device", "cpu", "--no-progress"]
    predict = ["predict", "--run", phase3_run, "--images", image, "--device", "cpu", "--workers", "0", "--no-progress"]
    sweep = ["sweep", "--cache", small_cache, "--trials", "1", "--phase", "1", "--epochs", "1", "--device", "cpu",
             "--search", "lr=1e-4:1e-3:log", "--seed", "0"]
    demo = ["demo", "--train-images", "2", "--epochs", "1", "--size", "70x42", "--random-init", "--device", "cpu"]
    # a labelled split serves as the target here: the contract, not the adaptation, is under test
    pseudo = ["pseudo-label", "--cache", small_cache, "--split", "val", "--device", "cpu", "--no-progress"]
    adapt = ["adapt", "--cache", small_cache, "--target", "val", "--rounds", "1", "--epochs", "1", "--device", "cpu",
             "--no-progress"]
    return {
        "extract": Recipe(lambda o: [*extract, "--out", o],
                          lambda o: [*extract, "--out", o, "--batch-size", "3"],
                          lambda o: [*extract, "--out", o], ".seg-extract.lock", ("manifest.json",),
                          fails_fresh=lambda o: [*extract[:2], broken, *extract[3:], "--out", o]),
        "train-head": Recipe(lambda o: [*train, "--out", o], lambda o: [*train, "--out", o],
                             lambda o: [*train, "--out", o, "--overwrite"], ".seg-train.lock", ("config.json",),
                             fails_fresh=lambda o: [*train, "--out", o, "--init-from", nan_run]),
        "eval": Recipe(lambda o: [*evaluate, "--out", o],
                       lambda o: ["eval", "--run", nan_run, "--cache", small_cache, "--split", "val", "--out", o],
                       lambda o: [*evaluate, "--out", o], ".seg-eval.lock", ("eval.json",)),
        "predict": Recipe(lambda o: [*predict, "--out", o],
                          lambda o: ["predict", "--run", nan_run, "--images", image, "--out", o],
                          lambda o: [*predict, "--out", o], ".seg-predict.lock", ("predict.json",)),
        # exports at a small size: the contract, not the graph, is under test here
        "export": Recipe(lambda o: ["export", "--run", phase3_run, "--out", o / "m.onnx", "--size", "112x56"],
                         lambda o: ["export", "--run", nan_run, "--out", o / "m.onnx", "--overwrite"],
                         lambda o: ["export", "--run", phase3_run, "--out", o / "m.onnx", "--overwrite",
                                    "--size", "112x56"],
                         ".m.onnx.seg-export.lock", ("m.parity.json", "m.parity-rejected.json"),
                         file_output="m.onnx", bystanders=("m.onnx.tmp", ".m.onnx.tmp", "notes.txt")),
        "compare": Recipe(lambda o: ["compare", phase3_run, phase3_run, "--out", o],
                          lambda o: ["compare", phase3_run, empty, "--out", o],
                          lambda o: ["compare", phase3_run, phase3_run, "--out", o], ".seg-compare.lock",
                          ("compare.json",)),
        "sweep": Recipe(lambda o: [*sweep, "--out", o],
                        lambda o: [*sweep[:-3], "lr=1e-3:1e-2:log", "--seed", "0", "--out", o],
                        lambda o: [*sweep, "--out", o], ".seg-sweep.lock", ("sweep-settings.json",), shared=True,
                        fails_fresh=lambda o: [*sweep, "--out", o, "--storage", "nosuchdb://x"]),
        "pseudo-label": Recipe(lambda o: [*pseudo, "--run", phase3_run, "--out", o],
                               lambda o: [*pseudo, "--run", nan_run, "--out", o],
                               lambda o: [*pseudo, "--run", phase3_run, "--out", o], ".seg-pseudo-label.lock",
                               ("pseudo.json", "masks.npy")),
        "adapt": Recipe(lambda o: [*adapt, "--run", phase3_run, "--out", o],
                        lambda o: [*adapt, "--run", nan_run, "--out", o],
                        lambda o: [*adapt, "--run", phase3_run, "--out", o], ".seg-adapt.lock", ("adapt.json",)),
        "demo": Recipe(lambda o: [*demo, "--out", o], lambda o: [*demo, "--out", o], lambda o: [*demo, "--out", o],
                       ".seg-demo.lock", ("run",), rerun_refused=True,
                       fails_fresh=lambda o: [*demo, "--out", o, "--size", "71x42"]),
    }


def test_every_command_with_out_is_covered(recipes):
    found = commands_with_out()
    assert {"extract", "train-head", "eval", "predict", "export", "compare", "sweep", "demo"} <= set(found)
    missing = [c for c in found if c not in recipes]
    assert not missing, f"commands that write to --out without a case in the output contract test: {missing}"


def hold_lock(folder: Path, lock: str, seconds: float) -> subprocess.Popen:
    """Another process holding the output's lock, as a second seg command would."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from seg.runtime.output import Output; "
        "Output(sys.argv[1], 'x', lambda r: True, sys.argv[2]).claim(); print('held', flush=True); "
        "time.sleep(float(sys.argv[3]))"), str(folder), lock, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("name", commands_with_out())
def test_the_output_contract(name, recipes, tmp_path):
    if name not in recipes:
        pytest.fail(f"seg {name} takes --out but has no recipe in this test")
    r = recipes[name]
    folder = tmp_path / "out"
    target = folder / r.file_output if r.file_output else folder

    # 0. a failure on a new output leaves nothing behind, not even the folder
    one_line_error(run(*(r.fails_fresh or r.refused_after)(folder)))
    assert not folder.exists()

    # a. a foreign file: for a file output, a user's file under the output's own name
    folder.mkdir()
    mine = folder / (r.file_output or "notes.txt")
    mine.write_bytes(b"the user's")
    one_line_error(run(*r.good(folder)), str(mine), "not written by seg")
    assert mine.read_bytes() == b"the user's"
    mine.unlink()

    # b. a user's file named like a side file
    for side in r.sides:
        (folder / side).write_bytes(b"the user's")
        one_line_error(run(*r.good(folder)), str(folder / side))
        assert (folder / side).read_bytes() == b"the user's" and (folder / side).is_file()
        (folder / side).unlink()

    # c. two at once
    if r.shared:
        holder = hold_lock(folder, r.lock, 3)
        t0 = time.monotonic()
        ok(run(*r.good(folder)))  # waited for the holder, then joined
        assert time.monotonic() - t0 > 1
        holder.wait()
    else:
        holder = hold_lock(folder, r.lock, 120)
        try:
            one_line_error(run(*r.good(folder)), f"in use by another seg {name} (pid {holder.pid})")
        finally:
            holder.kill()
            holder.wait()
        # d. then a good run, which leaves user files with temporary-looking names alone
        for b in r.bystanders:
            (folder / b).write_bytes(b"the user's")
        ok(run(*r.good(folder)))
        for b in r.bystanders:
            assert (folder / b).read_bytes() == b"the user's"
    assert target.exists()
    assert not [p for p in folder.rglob("*.seg-tmp*")], "a temporary was left behind"

    # e. a refusal after a good output changes nothing of it
    before = snapshot(folder)
    one_line_error(run(*r.refused_after(folder)))
    assert snapshot(folder) == before

    # f. a rerun works (a finished demo is kept and the rerun says so, changing nothing)
    if r.rerun_refused:
        one_line_error(run(*r.rerun(folder)), "holds a finished demo")
        assert snapshot(folder) == before
    else:
        ok(run(*r.rerun(folder)))


def test_an_older_segs_temporary_is_tolerated_beside_its_output_and_never_touched(dataset, tmp_path):
    """Before round four seg wrote `<name>.tmp`: an interrupted older extraction resumes, and the
    leftover is neither refused as foreign nor deleted (a user's file may carry such a name)."""
    out = tmp_path / "c"
    args = ["extract", "--data", dataset, "--backbone", "vits14", "--size", SMALL_SIZE, "--random-init",
            "--workers", "0", "--splits", "val", "--no-progress", "--out", out, "--shard-size", "2"]
    ok(run(*args))
    (out / "val-00001.h5").rename(out / "val-00001.h5.tmp")   # as a kill mid-write left it
    ok(run(*args))
    assert (out / "val-00001.h5").is_file() and (out / "val-00001.h5.tmp").is_file()
    (out / "notes.tmp").write_text("mine")                       # not the temporary of anything seg owns
    one_line_error(run(*args), "notes.tmp")
