"""torchrun on CPU (gloo, 2 processes): extraction bytes, a DDP step, a killed rank."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg.cli import main
from token_cache import learnable_split, write_token_cache

pytestmark = pytest.mark.slow  # not in the quick lane (README: Development)

EXTRACT = ["extract", "--backbone", "vits14", "--size", "224x126", "--random-init", "--aug-policy", "phase2",
           "--aug-seeds", "2", "--splits", "train,val", "--batch-size", "2", "--shard-size", "2", "--workers", "0"]


def torchrun(*args, nproc=2, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "seg", *[str(a) for a in args]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def hashes(cache: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.glob("*.h5"))}


def test_two_ranks_extract_the_same_bytes_as_one(dataset, tmp_path):
    one = tmp_path / "one"
    r = CliRunner().invoke(main, [*EXTRACT, "--data", str(dataset), "--out", str(one)])
    assert r.exit_code == 0, r.output
    two = tmp_path / "two"
    p = torchrun(*EXTRACT, "--data", dataset, "--out", two)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rank 0 of 2" in p.stdout
    assert hashes(one) == hashes(two) and len(hashes(one)) == 8
    assert json.loads((one / "manifest.json").read_text())["splits"] == json.loads((two / "manifest.json").read_text())["splits"]
    assert json.loads((two / "manifest.json").read_text())["complete"] is True


def test_killed_rank_then_rerun_completes(dataset, tmp_path):
    ref = tmp_path / "ref"
    assert CliRunner().invoke(main, [*EXTRACT, "--data", str(dataset), "--out", str(ref), "--size", "476x266"]).exit_code == 0
    out = tmp_path / "out"
    proc = torchrun(*EXTRACT, "--data", dataset, "--out", out, "--size", "476x266", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.h5"))) < 2:
        time.sleep(0.02)
    # kill one worker rank (a child of the torchrun agent); the agent then stops the other one
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "no rank processes found"
    os.kill(int(children[-1]), signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert len(list(out.glob("*.h5"))) < 8
    rerun = torchrun(*EXTRACT, "--data", dataset, "--out", out, "--size", "476x266")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert hashes(out) == hashes(ref)
    v = CliRunner().invoke(main, ["cache", "verify", str(out)])
    assert v.exit_code == 0, v.output


@pytest.mark.parametrize("flags,per_rank", [
    (("--batch-size", "4", "--accum", "1"), "per-rank batch 2 x world 2 x accum 1 (the preset's 4 x accum 1)"),
    (("--batch-size", "1", "--accum", "4"), "per-rank batch 1 x world 2 x accum 2 (the preset's 1 x accum 4)"),
    (("--batch-size", "2", "--accum", "1", "--scale-batch"), "per-rank batch 2 x world 2 x accum 1 (--scale-batch)"),
], ids=["split-batch", "split-accum", "scale-batch"])
def test_ddp_step_equals_single_process_step(tmp_path, flags, per_rank):
    """The global batch of a step is the configured batch x accum, split over the ranks (with accum the
    micro-batches before the step accumulate under no_sync); --scale-batch gives each rank all of it."""
    rng = np.random.default_rng(0)
    t, m = learnable_split(4, rng)
    vt, vm = learnable_split(3, rng)
    cache = write_token_cache(tmp_path / "c", {"train": (t, m), "val": (vt, vm)})
    # one optimizer step per epoch: 4 images = global batch (2 per rank x 2 ranks) = one-process batch 4
    # SGD: the step is linear in the gradient (Adam's first step, g/|g|, would amplify float noise)
    common = ["--cache", cache, "--phase", "3", "--allow-mismatch", "--epochs", "1", "--loss", "ce",
              "--no-amp", "--device", "cpu", "--preload", "always", "--optimizer", "sgd", "--lr", "0.5",
              "--momentum", "0", "--schedule", "none"]
    single = CliRunner().invoke(main, ["train-head", *map(str, common), "--out", str(tmp_path / "one"),
                                       "--batch-size", "4", "--accum", "1"])
    assert single.exit_code == 0, single.output
    p = torchrun("train-head", *common, "--out", tmp_path / "two", *flags)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"4 per step = {per_rank}" in p.stdout, p.stdout + p.stderr
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    from seg.heads import build_head

    torch.manual_seed(0)
    init = build_head("upernet", 16, 10).state_dict()
    moved = 0
    for k in a["head"]:
        diff = (a["head"][k] - b["head"][k]).abs().max().item()
        assert torch.allclose(a["head"][k], b["head"][k], rtol=1e-4, atol=1e-6), f"{k}: max diff {diff}\n{p.stdout}"
        moved += int(not torch.equal(a["head"][k], init[k]))
    assert moved > 10  # the step really changed the weights
    # validation over ranks: one confusion matrix for the whole split, the same as one process
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert np.array(ma["confusion_matrix"]).sum() == np.array(mb["confusion_matrix"]).sum() == 3 * (84 * 140 - 9)
    assert ma["miou"] == mb["miou"] or abs(ma["miou"] - mb["miou"]) < 1e-3
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


def test_ddp_step_with_tuned_blocks_equals_single_process_step(tmp_path):
    """--tune-blocks under DDP: the tail's gradients are averaged over ranks like the head's."""
    from seg.data.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", {"train": 4, "val": 3})
    cache = tmp_path / "tap"
    r = CliRunner().invoke(main, ["extract", "--backbone", "vits14", "--size", "224x126", "--random-init",
                                  "--tap-block", "11", "--workers", "0", "--data", str(data), "--out", str(cache)])
    assert r.exit_code == 0, r.output
    common = ["--cache", cache, "--phase", "3", "--allow-mismatch", "--epochs", "1", "--loss", "ce", "--accum", "1",
              "--no-amp", "--device", "cpu", "--preload", "always", "--optimizer", "sgd", "--lr", "0.5",
              "--momentum", "0", "--schedule", "none", "--tune-blocks", "1"]
    single = CliRunner().invoke(main, ["train-head", *map(str, common), "--out", str(tmp_path / "one"),
                                       "--batch-size", "4"])
    assert single.exit_code == 0, single.output
    p = torchrun("train-head", *common, "--out", tmp_path / "two", "--batch-size", "4")  # 2 per rank
    assert p.returncode == 0, p.stdout + p.stderr
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["head"]
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["head"]
    from seg.backbones import load_backbone

    original = load_backbone("vits14", random_init=True)[0].blocks[11].state_dict()
    assert not torch.allclose(a["tail.blocks.0.mlp.fc1.weight"], original["mlp.fc1.weight"])  # the block trained
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), f"{k}: max diff {(a[k] - b[k]).abs().max()}"
