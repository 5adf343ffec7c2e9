"""Experiments on one cache: sweeps that run, resume after a kill without repeating finished trials
and share one study between processes; compare; config files that reproduce a run; continuing from
a finished run; TensorBoard logs."""

import json
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

pytest.importorskip("optuna")

TRAIN = ["--phase", "1", "--epochs", "2", "--allow-mismatch", "--device", "cpu"]
SEARCH = ["--search", "lr=1e-4:3e-2:log", "--search", "head=convnext,linear"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    rng = np.random.default_rng(0)
    return write_token_cache(tmp_path_factory.mktemp("tok") / "c", {"train": learnable_split(6, rng),
                                                                    "val": learnable_split(2, rng)})


def trials_of(out: Path) -> list[dict]:
    import optuna

    study = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")
    return [{"number": t.number, "state": t.state.name, "run_dir": t.user_attrs.get("run_dir"),
             "surplus": t.user_attrs.get("surplus", False)} for t in study.get_trials()]


def counted(rows):
    return [r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and not r["surplus"]]


def test_a_three_trial_sweep_runs_links_the_best_and_compares(cache, tmp_path):
    out = tmp_path / "sweep"
    r = run("sweep", "--cache", cache, "--out", out, "--trials", "3", "--seed", "0", *SEARCH, *TRAIN)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["trials"]) == 3 and summary["counts"]["complete"] + summary["counts"]["pruned"] == 3
    for t in summary["trials"]:
        config = json.loads((out / t["run_dir"] / "config.json").read_text())["config"]
        assert config["epochs"] == 2 and config["phase"] == 1          # the fixed flags hold for every trial
        assert config["lr"] == pytest.approx(t["params"]["lr"]) and config["head"] == t["params"]["head"]
    best = summary["best"]
    assert best["value"] == max(t["value"] for t in summary["trials"] if t["state"] == "complete")
    assert (out / "best").resolve() == (out / best["run_dir"]).resolve()
    assert json.loads((out / "best" / "metrics.json").read_text())["miou"] == pytest.approx(best["value"])
    assert (out / "sweep.png").stat().st_size > 1000
    # compare: a sweep folder stands for its trials
    c = run("compare", out, "--out", tmp_path / "cmp")
    assert c.exit_code == 0, c.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [x["label"] for x in report["runs"]] == [t["run_dir"] for t in summary["trials"]]
    assert "lr" in report["config_differences"] and "epochs" not in report["config_differences"]
    assert "mean IoU" in c.output and (tmp_path / "cmp" / "compare.png").stat().st_size > 1000


def test_sweep_refusals_are_one_line(cache, tmp_path):
    r = run("sweep", "--cache", cache, "--out", tmp_path / "s", "--trials", "2", "--search", "lrr=1:2", *TRAIN)
    assert r.exit_code == 1 and "'lrr' is not a train-head setting a sweep can search" in r.output
    r = run("sweep", "--cache", cache, "--out", tmp_path / "s", "--trials", "2", "--search", "lr=1e-3:1e-4", *TRAIN)
    assert r.exit_code == 1 and "LOW must be below HIGH" in r.output
    r = run("sweep", "--cache", cache, "--out", tmp_path / "s", "--trials", "2", "--search", "lr=1e-4:1e-3",
            "--lr", "0.1", *TRAIN)
    assert r.exit_code != 0 and "--lr is both searched and fixed" in r.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = run("sweep", "--cache", cache, "--out", tmp_path / "mine", "--trials", "2", *SEARCH, *TRAIN)
    assert r.exit_code == 1 and "notes.txt: not written by seg sweep" in r.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def _sweep_process(cache, out, trials, seed, heartbeat="1"):
    return subprocess.Popen([sys.executable, "-m", "seg", "sweep", "--cache", str(cache), "--out", str(out),
                             "--trials", str(trials), "--seed", str(seed), "--heartbeat", heartbeat,
                             "--pruner", "none", *SEARCH, *TRAIN],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_sweep_resumes_without_repeating_finished_trials(cache, tmp_path):
    out = tmp_path / "sweep"
    proc = _sweep_process(cache, out, 3, 0)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "trial-0001" / "last.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = trials_of(out)
    assert [r["state"] for r in rows if r["number"] == 0] == ["COMPLETE"]
    assert any(r["state"] == "RUNNING" for r in rows), "the kill must land inside a trial"
    first = (out / "trial-0000" / "best.pt").stat().st_mtime_ns
    time.sleep(3.5)  # 3 heartbeats: the killed trial is now taken as dead
    proc = _sweep_process(cache, out, 3, 0)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    rows = trials_of(out)
    done = counted(rows)
    assert len(done) == 3
    assert (out / "trial-0000" / "best.pt").stat().st_mtime_ns == first        # not trained again
    # the killed trial was retried in its own run folder, resumed from its last.pt
    assert [r["run_dir"] for r in done].count("trial-0001") == 1
    history = json.loads((out / "trial-0001" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]


def test_processes_started_together_share_one_study_without_clashes(cache, tmp_path):
    """Started at once on a new folder (before, about half such starts failed: the study was created
    before the settings file, Optuna's schema creation raced, and every process wrote one temp name)."""
    out = tmp_path / "shared"
    procs = [_sweep_process(cache, out, 4, seed, heartbeat="20") for seed in (1, 2, 3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stdout.read()
    rows = trials_of(out)
    done = counted(rows)
    assert len(done) == 4
    dirs = [r["run_dir"] for r in done]
    assert len(set(dirs)) == 4                                      # no run folder trained twice
    assert not [r for r in rows if r["state"] == "FAIL" and not r["surplus"]]
    for d in dirs:
        assert len(json.loads((out / d / "history.json").read_text())) == 2


def test_compare_refuses_runs_with_different_classes(cache, tmp_path):
    rng = np.random.default_rng(1)
    other = write_token_cache(tmp_path / "c5", {"train": learnable_split(4, rng, num_classes=5),
                                                "val": learnable_split(2, rng, num_classes=5)})
    m = json.loads((other / "manifest.json").read_text())
    m["class_table"]["classes"] = m["class_table"]["classes"][:5]
    (other / "manifest.json").write_text(json.dumps(m))
    for c, name in ((cache, "a"), (other, "b")):
        assert run("train-head", "--cache", c, "--out", tmp_path / name, *TRAIN).exit_code == 0
    r = run("compare", tmp_path / "a", tmp_path / "b")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert f"{tmp_path / 'b'}: its classes" in r.output and "compare runs with the same class table" in r.output


def test_config_file_reproduces_a_run_and_flags_override_it(cache, tmp_path):
    a = tmp_path / "a"
    r = run("train-head", "--cache", cache, "--out", a, "--phase", "2", "--epochs", "2", "--lr", "0.002",
            "--patience", "0", "--focal-gamma", "1.5", "--no-amp", "--allow-mismatch", "--device", "cpu")
    assert r.exit_code == 0, r.output
    config_a = json.loads((a / "config.json").read_text())
    assert config_a["config"]["patience"] is None          # 0 on the command line: never stop early
    b = tmp_path / "b"
    r = run("train-head", "--cache", cache, "--out", b, "--config", a / "config.json", "--allow-mismatch", "--device", "cpu")
    assert r.exit_code == 0, r.output
    config_b = json.loads((b / "config.json").read_text())
    assert config_b["config"] == config_a["config"]        # phase 2 preset's patience 10 did not come back
    assert config_b["config_source"]["path"] == str((a / "config.json").resolve())
    assert config_b["config_source"]["overridden"] == []
    # same settings, same cache, same seed: the same weights
    wa, wb = (torch.load(p / "best.pt", weights_only=True)["head"] for p in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = tmp_path / "c"
    r = run("train-head", "--cache", cache, "--out", c, "--config", a / "config.json", "--lr", "0.01",
            "--allow-mismatch", "--device", "cpu")
    assert r.exit_code == 0, r.output
    config_c = json.loads((c / "config.json").read_text())
    assert {k for k in config_a["config"] if config_a["config"][k] != config_c["config"][k]} == {"lr"}
    assert config_c["config_source"]["overridden"] == ["lr"]
    r = run("train-head", "--cache", cache, "--out", tmp_path / "d", "--config", a / "config.json", "--phase", "3",
            "--allow-mismatch", "--device", "cpu")
    assert r.exit_code == 1 and "--phase 3 differs from the phase 2 in" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {**config_a["config"], "lr": "fast"}}))
    r = run("train-head", "--cache", cache, "--out", tmp_path / "e", "--config", bad, "--device", "cpu")
    assert r.exit_code == 1 and "lr is 'fast', which is not a valid float" in r.output


def test_init_from_continues_a_finished_run_with_a_new_schedule(cache, tmp_path):
    a = tmp_path / "a"
    assert run("train-head", "--cache", cache, "--out", a, *TRAIN).exit_code == 0
    b = tmp_path / "b"
    r = run("train-head", "--cache", cache, "--out", b, *TRAIN, "--init-from", a, "--lr", "1e-12", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert "the optimizer and the LR schedule start again at epoch 1" in r.output
    wa, wb = (torch.load(p / "best.pt", weights_only=True) for p in (a, b))
    # the weights start where the old run ended (BatchNorm's running statistics move with any data)
    moved = [k for k in wa["head"] if "running_" not in k and "num_batches" not in k and not torch.allclose(wb["head"][k].float(), wa["head"][k].float(), rtol=0, atol=1e-6)]
    assert moved == [], moved
    assert wb["init_from"]["run"] == str(a.resolve()) and wb["init_from"]["epoch"] == wa["epoch"]
    r = run("train-head", "--cache", cache, "--out", tmp_path / "c", *TRAIN, "--init-from", a, "--head", "linear")
    assert r.exit_code == 1 and "a convnext head, this run builds linear; pass --head convnext" in r.output


def test_tensorboard_logs_scalars_confusion_and_overlays(cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    r = run("train-head", "--cache", cache, "--out", out, *TRAIN, "--tensorboard")
    assert r.exit_code == 0, r.output
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    history = json.loads((out / "history.json").read_text())
    miou = [e.value for e in events.Scalars("val/mIoU")]
    np.testing.assert_allclose(miou, [h["val_miou"] for h in history], rtol=1e-6)
    assert [e.step for e in events.Scalars("lr")] == [1, 2]
    assert {"loss/train", "loss/val", "val_iou/Sky"} <= set(tags["scalars"])
    assert "val/confusion_matrix" in tags["images"]
    overlays = [t for t in tags["images"] if t.startswith("val/prediction_overlays")]
    assert overlays == ["val/prediction_overlays"]
    image = events.Images(overlays[0])  # 2 val samples in a row, each ground truth | prediction
    assert [e.step for e in image] == [1, 2] and image[0].width == 2 * 2 * 140 and image[0].height == 84


def test_ctrl_c_ends_the_sweep_and_the_interrupted_trial_resumes(cache, tmp_path, monkeypatch):
    import seg.experiments.study as st
    from seg.experiments.study import SweepOptions, sweep
    from seg.train_head import RunOptions

    real = st.train
    calls = []

    def interrupted_in_trial_1(cfg, cache_dir, out_dir, opts, log):
        calls.append(Path(out_dir).name)
        if Path(out_dir).name == "trial-0001" and calls.count("trial-0001") == 1:
            def stop(epoch, row):  # Ctrl-C right after epoch 1 was saved
                raise KeyboardInterrupt
            opts.on_epoch = stop
        return real(cfg, cache_dir, out_dir, opts, log)

    monkeypatch.setattr(st, "train", interrupted_in_trial_1)
    opts = SweepOptions(cache=str(cache), out=str(tmp_path / "s"), trials=3, search=tuple(SEARCH[1::2]), phase=1,
                        fixed={"epochs": 2}, run=RunOptions(device="cpu", allow_mismatch=True), pruner="none", seed=0)
    with pytest.raises(KeyboardInterrupt):
        sweep(opts, log=lambda s: None)
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["counts"]["fail"] == 1  # written on the way out
    sweep(opts, log=lambda s: None)
    assert calls == ["trial-0000", "trial-0001", "trial-0001", "trial-0003"]   # trial 0 never again
    history = json.loads((tmp_path / "s" / "trial-0001" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert len(counted(trials_of(tmp_path / "s"))) == 3
