"""The GPU paths, run where a CUDA device exists (skipped otherwise): extraction, training in bf16
and in fp16 with a GradScaler, preloading onto the GPU, int8 rows dequantised on the GPU, eval and
predict, bit-repeatable --deterministic runs, and 2-process DDP with NCCL when two GPUs are present. `benchmarks/gpu_check.sh` runs them
and prints the GPU's figures."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg.cli import main
from token_cache import learnable_split, write_token_cache

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

EXTRACT = ["extract", "--backbone", "vits14", "--size", "224x126", "--random-init", "--splits", "train,val",
           "--batch-size", "4", "--shard-size", "4", "--device", "cuda"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def gpu_cache(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("gpu") / "c"
    r = run(*EXTRACT, "--data", dataset, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_extraction_on_the_gpu_records_it_and_matches_the_cpu_closely(gpu_cache, dataset, tmp_path):
    m = json.loads((gpu_cache / "manifest.json").read_text())
    cap = torch.cuda.get_device_capability()
    assert m["device"] == "cuda" and m["environment"]["gpu"] == torch.cuda.get_device_name()
    assert m["compute_dtype"] == ("bfloat16" if cap >= (8, 0) else "float16")
    cpu = tmp_path / "cpu"
    assert run(*EXTRACT[:-2], "--device", "cpu", "--fp32", "--data", dataset, "--out", cpu, "--splits", "val").exit_code == 0
    from seg.cache import FeatureCache

    g = FeatureCache(gpu_cache).split("val").read_rows(np.arange(3))[0].astype(np.float32)
    c = FeatureCache(cpu).split("val").read_rows(np.arange(3))[0].astype(np.float32)
    rel = np.linalg.norm(g - c) / np.linalg.norm(c)
    assert rel < 0.05, rel  # half precision on the GPU against float32 on the CPU


@pytest.mark.parametrize("amp_dtype", ["bf16", "fp16"])
def test_training_on_the_gpu_preloads_there_and_uses_the_asked_precision(gpu_cache, dataset, tmp_path, amp_dtype):
    if amp_dtype == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0")
    out = tmp_path / amp_dtype
    r = run("train-head", "--cache", gpu_cache, "--out", out, "--phase", "3", "--epochs", "2", "--device", "cuda",
            "--amp-dtype", amp_dtype, "--preload", "auto", "--allow-mismatch")
    assert r.exit_code == 0, r.output
    assert "preload: auto -> on cuda" in r.output
    assert "to train the head (optimizer state + one step measured)" in r.output
    if amp_dtype == "fp16":
        assert "with a GradScaler" in r.output
    record = torch.load(out / "last.pt", weights_only=True)
    assert record["amp_dtype"] == ("bfloat16" if amp_dtype == "bf16" else "float16")
    assert all(torch.isfinite(v).all() for v in record["head"].values() if v.is_floating_point())
    e = run("eval", "--run", out, "--cache", gpu_cache, "--device", "cuda")
    assert e.exit_code == 0, e.output
    from seg.data.layouts import list_split

    images = list_split(dataset, "val").image_path(0).parent
    p = run("predict", "--run", out, "--images", images, "--out", tmp_path / "p", "--device", "cuda")
    assert p.exit_code == 0, p.output
    assert len(list((tmp_path / "p" / "color").glob("*.png"))) == len(list(images.glob("*.png")))
    # images through the backbone on the GPU score like the cache's tokens (same recorded precision)
    d = run("eval", "--run", out, "--data", dataset, "--device", "cuda", "--out", tmp_path / "e-data")
    assert d.exit_code == 0, d.output
    from_cache = json.loads((out / "eval-val" / "eval.json").read_text())["miou"]
    from_images = json.loads((tmp_path / "e-data" / "eval.json").read_text())["miou"]
    assert abs(from_cache - from_images) < 0.02


@pytest.mark.parametrize("head", ["upernet", "upernet-ms"])
def test_deterministic_runs_repeat_bit_for_bit_on_the_gpu(gpu_cache, dataset, tmp_path, head):
    """--deterministic: two runs of the same settings end with identical weights (fp16 + GradScaler,
    the GPU default; upernet-ms adds transposed convolutions and the FPN's upsampling)."""
    cache = gpu_cache
    if head == "upernet-ms":  # four layers
        cache = tmp_path / "c4"
        r = run(*EXTRACT, "--layers", "2,5,8,11", "--data", dataset, "--out", cache)
        assert r.exit_code == 0, r.output
    heads = []
    for name in ("a", "b"):
        r = run("train-head", "--cache", cache, "--out", tmp_path / name, "--phase", "3", "--head", head,
                "--epochs", "2", "--device", "cuda", "--deterministic", "--allow-mismatch")
        assert r.exit_code == 0, r.output
        heads.append(torch.load(tmp_path / name / "last.pt", weights_only=True)["head"])
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_int8_rows_dequantise_on_the_gpu_to_the_same_values(tmp_path):
    from seg.cache.quant import QuantSpec

    x = torch.from_numpy(np.random.default_rng(0).normal(0, 2, (4, 1, 64, 6, 10)).astype(np.float16))
    spec = QuantSpec.for_tokens(list(x.shape[1:]), False)
    rows = spec.pack(x)
    assert torch.equal(spec.dequantize(rows.cuda()).cpu(), spec.dequantize(rows))
    assert torch.equal(spec.pack(x.cuda()).cpu(), rows)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_process_ddp_on_two_gpus(tmp_path):
    rng = np.random.default_rng(0)
    cache = write_token_cache(tmp_path / "c", {"train": learnable_split(8, rng), "val": learnable_split(3, rng)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "seg",
           "train-head", "--cache", str(cache), "--out", str(tmp_path / "r"), "--phase", "2", "--epochs", "2",
           "--allow-mismatch", "--device", "cuda"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "world 2" in p.stdout
    assert json.loads((tmp_path / "r" / "config.json").read_text())["world_size"] == 2
