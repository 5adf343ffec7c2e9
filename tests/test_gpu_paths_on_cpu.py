"""Defects of the GPU, mixed-precision and DDP paths that a CPU can show: state cached across calls,
the recorded autocast dtype on resume, device mapping under torchrun, lock errors, the loss's
precision under autocast, and validation when a rank's slice of the split is empty."""

import errno
import math
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from seg.heads import build_head, head_logits
from seg.runtime import device as device_mod
from seg.runtime.output import Output
from seg.runtime.distributed import Dist, rank_device
from seg.runtime.errors import SegError
from seg.train.losses import SegLoss
from seg.train.presets import resolve
from seg.train_head import RunOptions, train
from token_cache import learnable_split, write_token_cache

pytestmark = pytest.mark.slow  # not in the quick lane (README: Development)

QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_token_cache(tmp_path_factory.mktemp("tok") / "c", {"train": learnable_split(6, rng),
                                                                    "val": learnable_split(1, rng)})


def test_state_cached_under_inference_mode_serves_training():
    """Evaluation then training in one process: the resize matrices cached by the first call must be
    usable by autograd in the second (an inference tensor cannot be saved for backward)."""
    head = build_head("convnext", 16, 10)
    tokens = torch.randn(2, 1, 16, 5, 7).half()
    with torch.inference_mode():
        head_logits(head.eval(), tokens, (61, 83), amp=False)
    logits = head_logits(head.train(), tokens, (61, 83), amp=False)
    logits.square().mean().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_the_autocast_dtype_is_recorded_and_kept_on_resume(token_cache, tmp_path):
    out = tmp_path / "r"
    opts = RunOptions(device="cpu", progress=False)
    train(resolve(2, {"epochs": 1}), str(token_cache), str(out), opts, **QUIET)
    assert json.loads((out / "config.json").read_text())["amp_dtype"] == "bfloat16"  # phase 2 is AMP; bf16 on CPU
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["amp_dtype"] == "bfloat16"
    state["amp_dtype"] = "float16"  # as a run on an fp16-only GPU would have recorded it
    torch.save(state, out / "last.pt")
    with pytest.raises(SegError, match=r"the run trained under float16 autocast, which this device cannot continue "
                                       r"\(--amp-dtype fp16 trains with a GradScaler, a GPU path"):
        train(resolve(2, {"epochs": 1}), str(token_cache), str(out), RunOptions(device="cpu", progress=False,
                                                                               resume=True), **QUIET)


def test_amp_dtype_by_compute_capability(monkeypatch):
    from seg.runtime.device import half_dtype, training_amp_dtype

    gpu = torch.device("cuda", 0)
    for capability, half in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there
        assert half_dtype(gpu) == half
        assert training_amp_dtype("auto", gpu) == torch.float16  # the published scripts' fp16 + GradScaler
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    with pytest.raises(SegError, match=r"--amp-dtype bf16: this GPU \(compute capability 7.0\) has no bf16"):
        training_amp_dtype("bf16", gpu)
    assert training_amp_dtype("auto", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(SegError, match="--amp-dtype fp16 trains with a GradScaler, a GPU path"):
        training_amp_dtype("fp16", torch.device("cpu"))


def test_device_mapping(monkeypatch):
    with pytest.raises(SegError, match="--device cuda:1 under torchrun would put every rank on GPU 1"):
        rank_device(Dist(rank=1, world=2, local_rank=1), "cuda:1")
    assert rank_device(Dist(rank=1, world=2, local_rank=1), "cpu") == "cpu"
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # below torch.cuda.set_device, whose own argument check then runs (it refuses a device without an index)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", chosen.append, raising=False)
    assert rank_device(Dist(rank=1, world=2, local_rank=1), "auto") == "cuda:1"
    assert device_mod.resolve_device("cuda:1") == torch.device("cuda:1") and chosen == [1]
    assert device_mod.resolve_device("cuda") == torch.device("cuda:0") and chosen == [1, 0]
    assert device_mod.resolve_device("auto") == torch.device("cuda:0") and chosen == [1, 0, 0]
    with pytest.raises(SegError, match="--device cuda:2: this machine has 2 CUDA device"):
        device_mod.resolve_device("cuda:2")


def test_a_lock_that_cannot_be_taken_says_why(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr("fcntl.lockf", no_locks)
    with pytest.raises(SegError, match=r"\.lock: cannot lock it \(No locks available\)"):
        Output(tmp_path, "train-head", lambda rel: False, ".lock").claim()


@pytest.mark.parametrize("kind", ["focal_dice", "weighted_ce", "lin_focal_dice"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_loss_is_float32_under_autocast(kind, dtype):
    """Half-precision logits under autocast give exactly the float32 loss of the same values."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 10, 23, 31, generator=g) * 4).to(dtype)
    target = torch.randint(0, 10, (2, 23, 31), generator=g)
    target[:, :3] = 255  # ignore pixels: the masked Dice sums go through einsum, a matmul that autocast lowers
    loss = SegLoss(kind, torch.linspace(0.5, 5, 10))
    plain = loss(logits.float(), target)
    with torch.autocast("cpu", dtype=dtype):
        auto = loss(logits, target)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)


def test_validation_with_an_empty_slice_on_one_rank(token_cache, tmp_path):
    """The val split has 1 sample and there are 2 ranks: rank 1 validates nothing. Both ranks must issue
    the same collectives (a DDP forward broadcasts BatchNorm buffers), and the scores must be rank 0's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "seg",
           "train-head", "--cache", str(token_cache), "--out", str(tmp_path / "r"), "--phase", "1", "--epochs", "1",
           "--device", "cpu", "--batch-size", "2"]  # one sample per rank and step
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        output, _ = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # a hang: stop both ranks, not only the launcher
        os.killpg(p.pid, 9)
        pytest.fail("the ranks hung in validation")
    assert p.returncode == 0, output
    history = json.loads((tmp_path / "r" / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["val_loss"])


def test_out_of_memory_is_one_line_naming_the_flags(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from seg.cli import main
    import seg.train_head as th

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(th, "train", oom)
    r = CliRunner().invoke(main, ["train-head", "--cache", str(tmp_path), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower --batch-size " \
           "(with --accum to keep the effective batch), stream with --preload never" in r.output


def test_collective_timeout(monkeypatch):
    from datetime import timedelta

    from seg.runtime.distributed import collective_timeout

    monkeypatch.delenv("SEG_DIST_TIMEOUT_MIN", raising=False)
    assert collective_timeout() == timedelta(minutes=60)  # not the library's 10: rank 0 may hash for long
    monkeypatch.setenv("SEG_DIST_TIMEOUT_MIN", "180")
    assert collective_timeout() == timedelta(minutes=180)
    monkeypatch.setenv("SEG_DIST_TIMEOUT_MIN", "soon")
    with pytest.raises(SegError, match="SEG_DIST_TIMEOUT_MIN must be a number of minutes, got 'soon'"):
        collective_timeout()



def test_worker_counts_follow_cpu_affinity_and_local_ranks(monkeypatch):
    from seg.runtime.device import usable_cores, worker_count

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine has more cores than this process may use
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert usable_cores() == 8 and worker_count() == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on this node share the eight cores
    assert usable_cores() == 2 and worker_count() == 1


def test_one_sha256_check_serves_every_rank(token_cache):
    from seg.cache import FeatureCache

    rank0, rank1 = FeatureCache(token_cache), FeatureCache(token_cache)
    rank0.check_shards(["train", "val"])
    first = sorted(rank0.verified)[0]
    path = token_cache / first
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # this rank sees another file under that name
    try:
        rank1.adopt_verified(rank0.verified)
        assert set(rank1.verified) == set(rank0.verified) - {first}
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_the_preset_batch_is_split_over_ranks():
    from seg.train.rank_batching import rank_batching

    assert rank_batching(2, 2, 1) == (2, 2)          # one process: as configured
    assert rank_batching(2, 2, 2) == (2, 1)          # phase 3 on 2 GPUs: each rank its own step's batch of 2
    assert rank_batching(2, 2, 4) == (1, 1)          # on 4: one sample each, still 4 per step
    assert rank_batching(1, 4, 2) == (1, 2)
    assert rank_batching(2, 2, 2, scale=True) == (2, 2)   # --scale-batch: global 8
    with pytest.raises(SegError, match=r"a global batch of 2 x accum 2 = 4 samples per step cannot be split over 8 "
                                       r"ranks; .* or --scale-batch"):
        rank_batching(2, 2, 8)


def test_gpu_check_without_cuda_says_so_and_exits_0():
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: gpu_check.sh would run the GPU checks")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    p = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0 and "gpu_check: no CUDA device visible to torch" in p.stdout, p.stdout + p.stderr


def test_gpu_figures_rehearse_every_step_on_the_cpu(tmp_path):
    """The figures gpu_check.sh prints on a GPU, rehearsed small on the CPU: the script runs the
    same extraction, head step and cached epoch, so an API change cannot break it unseen."""
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_figures.py"
    out = tmp_path / "figures.json"
    p = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert p.returncode == 0, p.stdout + p.stderr
    f = json.loads(out.read_text())
    assert f["device"] == "cpu"
    for k in ("bf16_matmul_GFLOPs", "extract_images_per_s", "phase3_head_step_ms", "phase3_head_step_floor_ms",
              "phase3_head_step_fp16_scaler_ms", "phase3_head_step_fp16_scaler_cudnn_benchmark_ms", "cached_epoch_s"):
        assert f[k] > 0, k
    assert 0 < f["extract_fraction_of_bf16_rate"] < 2
    # one-stage = the cached epoch + the backbone on the epoch's 4 train + 2 val images
    assert f["onestage_epoch_s_projected"] == pytest.approx(f["cached_epoch_s"] + 6 / f["extract_images_per_s"])
    assert f["cached_vs_onestage"] == pytest.approx(f["onestage_epoch_s_projected"] / f["cached_epoch_s"])
    assert "cached_vs_onestage" in p.stdout


def test_heads_run_in_the_dtype_they_trained_in(monkeypatch, token_cache, tmp_path, phase3_run):
    """On a GPU with bf16 (Ampere and later) the default is fp16 autocast with a GradScaler, as the
    published scripts trained; the head must then run in fp16, not in the device's default half type,
    in training, validation, eval and predict alike."""
    from seg.evaluate import EvalOptions, evaluate
    from seg.infer.runs import load_run
    from seg.infer.segmenter import Segmenter
    from seg.runtime.device import run_amp_dtype
    from seg.train.epochs import EpochRunner

    head = build_head("convnext", 16, 3)
    seen = []
    conv = next(m for m in head.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tokens, masks = torch.randn(2, 1, 16, 5, 7).half(), torch.randint(0, 3, (2, 20, 28))
    for amp in (torch.float16, True, None, False):
        head_logits(head, tokens, (20, 28), amp)
    assert seen == [torch.float16, torch.bfloat16, torch.float32, torch.float32]  # True: the CPU's half type
    runner = EpochRunner(resolve(3, {}), head, head, lambda logits, m: logits.mean(), None, None, None,
                         torch.device("cpu"), torch.float16, None, None, None, 3, Dist())
    runner.forward_loss(tokens, masks)
    assert seen[-1] == torch.float16  # the training step and validation use the run's dtype

    # read back at inference where the device has it, else the device's half type
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert run_amp_dtype(True, "float16", gpu) == torch.float16
    assert run_amp_dtype(True, "bfloat16", gpu) == torch.bfloat16
    assert run_amp_dtype(True, "float16", cpu) == torch.bfloat16
    assert run_amp_dtype(True, None, cpu) == torch.bfloat16  # runs recorded before the dtype was
    assert run_amp_dtype(False, "float16", gpu) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    assert run_amp_dtype(True, "bfloat16", gpu) == torch.float16
    assert run_amp_dtype(True, None, gpu) == torch.float16

    # eval from the cache and the image path (predict, eval --data) use the run's dtype
    import seg.evaluate
    import seg.infer.runs

    out = tmp_path / "r"
    train(resolve(2, {"epochs": 1}), str(token_cache), str(out), RunOptions(device="cpu", progress=False), **QUIET)
    monkeypatch.setattr(seg.infer.runs, "run_amp_dtype", lambda amp, recorded, device: torch.float16)  # as on a GPU
    passed = []
    real = seg.evaluate.head_logits
    monkeypatch.setattr(seg.evaluate, "head_logits", lambda h, t, s, amp, g=None: passed.append(amp) or real(h, t, s, amp, g))
    evaluate(EvalOptions(run=str(out), cache=str(token_cache), device="cpu", progress=False, out=str(tmp_path / "e")),
             log=lambda s: None)
    assert passed and set(passed) == {torch.float16}
    assert Segmenter(load_run(phase3_run, cpu), None, cpu).amp == torch.float16


def test_the_gpu_default_fp16_with_a_grad_scaler_trains_and_resumes_exactly(token_cache, tmp_path, monkeypatch):
    """What train-head runs on a GPU by default (fp16 autocast, a GradScaler), run on the CPU, which has
    both: the scaler is live, its state is saved, and a resumed run ends bit-identical to an unbroken one."""
    import seg.train_head
    from interrupt import train_interrupted_at

    monkeypatch.setattr(seg.train_head, "training_amp_dtype", lambda choice, device: torch.float16)
    cfg = resolve(3, {"epochs": 3, "batch_size": 2, "accum": 1, "head": "linear"})  # fp16 on a CPU is slow
    opts = dict(device="cpu", progress=False)
    train(cfg, str(token_cache), str(tmp_path / "full"), RunOptions(**opts), **QUIET)
    train_interrupted_at(monkeypatch, 1, cfg, str(token_cache), str(tmp_path / "cut"), RunOptions(**opts), **QUIET)
    train(cfg, str(token_cache), str(tmp_path / "cut"), RunOptions(**opts, resume=True), **QUIET)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert full["amp_dtype"] == cut["amp_dtype"] == "float16"
    # a live scaler (a disabled one saves nothing): it counted every step, 6 images / batch 2 x 3 epochs,
    # none skipped for inf gradients, so its scale is still the initial 2^16
    assert full["scaler"]["_growth_tracker"] == 9 and full["scaler"]["scale"] == 2.0 ** 16, full["scaler"]
    assert full["scaler"] == cut["scaler"]
    for k in full["head"]:
        assert torch.equal(full["head"][k], cut["head"][k]), k
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in cut["history"]]
    assert all(math.isfinite(h["train_loss"]) for h in full["history"])
