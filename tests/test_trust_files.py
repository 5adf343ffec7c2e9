"""Issue 9, security and data loss: no code runs from a shared run, no user file is deleted or
overwritten, a full disk costs one line and nothing already written."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg.train import run_state
from seg.cli import main
from seg.runtime.errors import SegError
from seg.train.presets import resolve
from seg.train_head import RunOptions, train
from conftest import SMALL_SIZE
from token_cache import learnable_split, write_token_cache

EXTRACT = ["extract", "--backbone", "vits14", "--size", SMALL_SIZE, "--random-init", "--workers", "0",
           "--batch-size", "2", "--shard-size", "2"]
QUIET = dict(log=lambda s: None)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *fragments, code=1):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, r.output
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_token_cache(tmp_path_factory.mktemp("tok") / "c", {"train": learnable_split(6, rng),
                                                                    "val": learnable_split(2, rng)})


@pytest.fixture(scope="module")
def finished_run(token_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    train(resolve(1, {"epochs": 2}), str(token_cache), str(out),
          RunOptions(device="cpu", progress=False, allow_mismatch=True), **QUIET)
    return out


def train_args(cache, out, *extra):
    return ["train-head", "--cache", cache, "--out", out, "--phase", "1", "--epochs", "2", "--allow-mismatch",
            "--device", "cpu", *extra]


# -- security ---------------------------------------------------------------------------------

class Planted:
    """Unpickling this runs a shell command: what a malicious shared best.pt would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["best.pt", "last.pt"])
def test_a_planted_pickle_never_runs(finished_run, token_cache, tmp_path, which):
    import shutil

    run_dir = tmp_path / "shared-run"
    shutil.copytree(finished_run, run_dir)
    marker = tmp_path / "pwned"
    record = torch.load(run_dir / which, weights_only=True)
    record["history"] = Planted(marker)
    torch.save(record, run_dir / which)
    if which == "best.pt":
        for args in (["eval", "--run", run_dir, "--cache", token_cache, "--out", tmp_path / "e"],
                     ["predict", "--run", run_dir, "--images", tmp_path, "--out", tmp_path / "p"]):
            one_line_error(run(*args), f"{run_dir / 'best.pt'}: unreadable checkpoint: it holds objects other "
                                       "than tensors and plain containers, which seg never loads")
    else:
        one_line_error(run(*train_args(token_cache, run_dir, "--resume")),
                       f"{run_dir / 'last.pt'}: unreadable checkpoint; cannot resume: it holds objects other")
    assert not marker.exists()


def test_own_checkpoints_load_with_weights_only(finished_run):
    for name in ("best.pt", "last.pt"):
        assert isinstance(torch.load(finished_run / name, weights_only=True), dict)


# -- extract --overwrite deletes only its own cache ---------------------------------------------

def test_overwrite_deletes_only_the_old_caches_files(dataset, tmp_path):
    out = tmp_path / "c"
    assert run(*EXTRACT, "--data", dataset, "--out", out, "--splits", "val").exit_code == 0
    (out / "notes.h5").write_bytes(b"user data")  # a foreign file with a cache-like name
    r = run(*EXTRACT, "--data", dataset, "--out", out, "--splits", "val", "--layers", "2", "--overwrite")
    one_line_error(r, f"{out / 'notes.h5'}: is not part of the cache there")
    assert (out / "notes.h5").read_bytes() == b"user data"
    (out / "notes.h5").unlink()
    r = run(*EXTRACT, "--data", dataset, "--out", out, "--splits", "val", "--layers", "2", "--overwrite")
    assert r.exit_code == 0, r.output
    assert "--overwrite: deleting the old cache's 3 file(s)" in r.output  # manifest + 2 val shards
    assert json.loads((out / "manifest.json").read_text())["layers"] == [10, 11]


def test_a_directory_that_is_not_a_cache_is_never_touched(dataset, tmp_path):
    for files in ({"manifest.json": '{"format": "something else"}', "data.h5": "x"},
                  {"manifest.json": "not json", "a.tmp": "x"},
                  {"precious.txt": "keep", "old.h5": "x"}):
        out = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        for name, text in files.items():
            (out / name).write_text(text)
        for extra in ([], ["--overwrite"]):
            line = one_line_error(run(*EXTRACT, "--data", dataset, "--out", out, "--splits", "val", *extra))
            assert "--overwrite" not in line  # never suggest deleting what seg did not write
        assert {p.name: p.read_text() for p in out.iterdir()} == files


# -- train-head --out -------------------------------------------------------------------------

def test_train_head_refuses_a_directory_of_user_files(token_cache, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    for extra in ([], ["--overwrite"], ["--resume"]):
        one_line_error(run(*train_args(token_cache, out, *extra)), f"{out / 'config.json'}: not written by seg train-head ({out} is not a seg run")
    assert (out / "config.json").read_text() == '{"my": "settings"}' and len(list(out.iterdir())) == 1
    # a directory holding only the lock of a start that died is still new
    (tmp_path / "died").mkdir()
    (tmp_path / "died" / ".seg-train.lock").write_text("12345")
    assert run(*train_args(token_cache, tmp_path / "died", "--epochs", "1")).exit_code == 0
    one_line_error(run(*train_args(token_cache, token_cache)), "is inside the feature cache")
    one_line_error(run(*train_args(token_cache, token_cache / "runs")), "is inside the feature cache")


def test_a_finished_run_without_last_pt_is_not_replaced(finished_run, token_cache, tmp_path):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(finished_run, out)
    (out / "last.pt").unlink()  # what a full disk on the first last.pt write used to leave
    before = {p.name: digest(p) for p in out.iterdir() if p.name != ".seg-train.lock"}
    one_line_error(run(*train_args(token_cache, out)), "holds a seg run already; pass --resume")
    one_line_error(run(*train_args(token_cache, out, "--resume")), "has best.pt but no last.pt")
    assert {p.name: digest(p) for p in out.iterdir() if p.name != ".seg-train.lock"} == before
    (out / "notes.txt").write_text("mine")
    one_line_error(run(*train_args(token_cache, out, "--overwrite")), f"{out / 'notes.txt'}: not written by seg")
    (out / "notes.txt").unlink()
    r = run(*train_args(token_cache, out, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert "--overwrite: deleting the old run's" in r.output and "best.pt" in r.output
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_resume_repairs_a_best_pt_whose_write_failed(token_cache, tmp_path, monkeypatch):
    cfg = resolve(1, {"epochs": 3})
    opts = RunOptions(device="cpu", progress=False, allow_mismatch=True)
    train(cfg, str(token_cache), str(tmp_path / "full"), opts, **QUIET)
    real = run_state.save_checkpoint

    def disk_full_on_second_best(path, payload):
        if path.name == "best.pt" and payload["epoch"] == 2:
            raise SegError(f"{path}: cannot write (No space left on device)")
        real(path, payload)

    monkeypatch.setattr(run_state, "save_checkpoint", disk_full_on_second_best)
    with pytest.raises(SegError, match="No space left"):
        train(cfg, str(token_cache), str(tmp_path / "cut"), opts, **QUIET)
    monkeypatch.setattr(run_state, "save_checkpoint", real)
    assert torch.load(tmp_path / "cut" / "best.pt", weights_only=True)["epoch"] == 1  # lags last.pt
    logs = []
    train(cfg, str(token_cache), str(tmp_path / "cut"), RunOptions(device="cpu", progress=False, allow_mismatch=True,
                                                                  resume=True), log=logs.append)
    assert any("rewriting best.pt and metrics of epoch 2 from last.pt" in line for line in logs)
    for name in ("best.pt", "last.pt"):
        full, cut = (torch.load(tmp_path / d / name, weights_only=True) for d in ("full", "cut"))
        assert full["epoch"] == cut["epoch"]
        assert all(torch.equal(full["head"][k], cut["head"][k]) for k in full["head"])
    assert json.loads((tmp_path / "full" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "cut" / "metrics.json").read_text())


# -- a full disk: one line, nothing lost, the same command resumes ----------------------------

def limited(args: list[str], kib: int) -> subprocess.CompletedProcess:
    """Run `python -m seg ARGS` with a file-size limit (what a full disk looks like to a writer)."""
    cmd = f"ulimit -f {kib}; exec {sys.executable} -m seg " + " ".join(f"'{a}'" for a in args)
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)


def test_extraction_write_failure_is_one_line_and_resumes(dataset, tmp_path):
    args = [str(a) for a in EXTRACT] + ["--data", str(dataset), "--splits", "val,train", "--shard-size", "4"]
    ref = tmp_path / "ref"
    assert run(*args, "--out", ref).exit_code == 0
    sizes = {p.name: p.stat().st_size for p in ref.glob("*.h5")}
    # val-00000 (3 samples) fits under the limit, train-00000 (4 samples) does not
    assert sizes["val-00000.h5"] < 500 * 1024 < sizes["train-00000.h5"]
    out = tmp_path / "full-disk"
    p = limited(args + ["--out", str(out)], 500)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and "HDF5" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("Error: ")]
    assert errors == [f"Error: {out / 'train-00000.h5'}: cannot write (File too large); nothing under this name "
                      "was changed"], p.stderr
    assert digest(out / "val-00000.h5") == digest(ref / "val-00000.h5")
    assert not list(out.glob("*.tmp")) and not (out / "train-00000.h5").exists()
    r = run(*args, "--out", out)
    assert r.exit_code == 0 and "2 shards (6 samples) to do" in r.output, r.output
    assert {p.name: digest(p) for p in out.glob("*.h5")} == {p.name: digest(p) for p in ref.glob("*.h5")}


def test_training_write_failure_is_one_line_and_resumes(token_cache, tmp_path):
    out = tmp_path / "r"
    args = [str(a) for a in train_args(token_cache, out)]
    p = limited(args, 64)  # config.json fits; last.pt (head, optimizer, best copy) does not
    assert p.returncode == 1, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and f"{out / 'last.pt'}: cannot write (File too large)" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (out / "last.pt").exists() and not list(out.glob("*.tmp"))
    r = run(*train_args(token_cache, out, "--resume"))
    assert r.exit_code == 0, r.output
    assert "no epoch finished before; --resume starts at epoch 1" in r.output
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
