"""Issue 9, silently wrong results and small gaps: every case a user can meet ends in one clear
line (or a warning) and a non-zero exit, never in a wrong cache, checkpoint or output."""

import json
import shutil
import subprocess
import sys
import time

import cv2
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg import train_head as th
from seg.train.epochs import EpochRunner
from seg.backbones import load_backbone
from seg.cache import verify
from seg.cli import main
from seg.train.presets import resolve
from seg.data.synthetic import write_dataset
from seg.train_head import RunOptions, train
from conftest import SMALL_SIZE
from test_trust_files import EXTRACT, QUIET, finished_run, one_line_error, run, token_cache, train_args  # noqa: F401
from token_cache import learnable_split, write_token_cache


# -- settings that change the bytes are compared on resume ------------------------------------

def test_precision_and_batch_size_are_settings(dataset, tmp_path):
    out = tmp_path / "c"
    assert run(*EXTRACT, "--data", dataset, "--out", out, "--splits", "val").exit_code == 0
    before = (out / "manifest.json").read_text()
    one_line_error(run(*EXTRACT, "--data", dataset, "--out", out, "--splits", "val", "--fp32"),
                   "holds a cache with other settings (differs in compute_dtype)")
    args = [a if a != "2" or i != EXTRACT.index("--batch-size") + 1 else "1" for i, a in enumerate(EXTRACT)]
    one_line_error(run(*args, "--data", dataset, "--out", out, "--splits", "val"), "differs in batch_size")
    assert (out / "manifest.json").read_text() == before
    # an interrupted bf16 cache is not finished in fp32 either
    m = json.loads(before)
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    (out / "val-00001.h5").unlink()
    one_line_error(run(*EXTRACT, "--data", dataset, "--out", out, "--splits", "val", "--fp32"), "compute_dtype")
    assert not (out / "val-00001.h5").exists()


def test_old_format_caches_are_refused_with_a_reason(small_cache, tmp_path):
    copy = tmp_path / "v1"
    shutil.copytree(small_cache, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 1
    (copy / "manifest.json").write_text(json.dumps(m))
    one_line_error(run("cache", "info", copy), "cache format version 1, this seg reads versions 2, 3, 4, 5, 6, 7; re-extract it")


# -- integrity before use ---------------------------------------------------------------------

def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_shard_is_refused_before_use(token_cache, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(token_cache, copy)
    shard = copy / "train-00000.h5"
    flip(shard, 1455)  # HDF5 metadata: read silently as fill-value zeros without the checksum
    line = one_line_error(run(*train_args(copy, tmp_path / "r")),
                          f"{shard}: sha256 differs from the manifest (corrupt or changed shard)")
    assert "--no-verify" in line
    assert not (tmp_path / "r" / "best.pt").exists()
    r = run(*train_args(token_cache, tmp_path / "ok"))
    assert r.exit_code == 0 and "integrity: 3 shards" in r.output, r.output
    flip(copy / "val-00000.h5", 2000)
    one_line_error(run("eval", "--run", tmp_path / "ok", "--cache", copy, "--split", "val", "--out", tmp_path / "e"),
                   "val-00000.h5: sha256 differs")


def test_cache_verify_never_crashes_on_single_byte_flips(tmp_path):
    """Bounded fuzz: one flipped byte at 120 offsets spread over a shard (metadata, chunk index,
    data, checksums); every time verify reports exactly that shard on one line and never raises."""
    rng = np.random.default_rng(1)
    t, m = learnable_split(2, rng, channels=16, grid=(5, 8))
    cache = write_token_cache(tmp_path / "c", {"val": (t, m)}, size=(112, 70), shard_size=2)
    shard = cache / "val-00000.h5"
    pristine = shard.read_bytes()
    assert verify(cache) == []
    t0 = time.perf_counter()
    offsets = sorted(set(np.linspace(0, len(pristine) - 1, 120).astype(int)) | {1455})
    for off in offsets:
        flip(shard, int(off))
        problems = verify(cache)
        assert len(problems) == 1 and problems[0].startswith(f"{shard}: "), (off, problems)
        shard.write_bytes(pristine)
    assert time.perf_counter() - t0 < 30
    r = run("cache", "verify", cache)
    assert r.exit_code == 0


# -- NaN and inf are never checkpointed -------------------------------------------------------

def test_non_finite_val_loss_writes_nothing_and_names_the_last_good_checkpoint(token_cache, tmp_path, monkeypatch):
    real = EpochRunner.validate

    def nan_at(epoch_to_fail):
        def validate(self, source):
            loss, cm = real(self, source)
            return (float("nan") if self.sched.last_epoch == epoch_to_fail else loss), cm
        return validate

    monkeypatch.setattr(EpochRunner, "validate", nan_at(1))
    r = run(*train_args(token_cache, tmp_path / "a", "--epochs", "3"))
    one_line_error(r, "epoch 2 ended with val loss nan; stopped without saving it. The last good checkpoint is",
                   "last.pt (epoch 1); --resume continues from it")
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["epoch"] == 0
    assert torch.load(tmp_path / "a" / "best.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(EpochRunner, "validate", nan_at(0))
    one_line_error(run(*train_args(token_cache, tmp_path / "b")),
                   "epoch 1 ended with val loss nan; stopped without saving it. No checkpoint was written")
    assert not (tmp_path / "b" / "last.pt").exists() and not (tmp_path / "b" / "best.pt").exists()


def test_exploding_weights_are_never_checkpointed(token_cache, tmp_path):
    r = run(*train_args(token_cache, tmp_path / "r", "--lr", "1e30", "--batch-size", "8", "--accum", "1",
                        "--optimizer", "sgd", "--momentum", "0"))
    one_line_error(r, "stopped")
    for name in ("best.pt", "last.pt"):
        path = tmp_path / "r" / name
        if path.exists():
            ck = torch.load(path, weights_only=True)
            assert all(torch.isfinite(v).all() for v in ck["head"].values() if v.is_floating_point())


def test_nan_weights_stop_extraction_at_the_first_sample(dataset, tmp_path):
    model, _ = load_backbone("vits14", random_init=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["blocks.3.norm1.weight"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    args = [a for a in EXTRACT if a != "--random-init"]
    one_line_error(run(*args, "--weights", tmp_path / "nan.pth", "--data", dataset, "--out", tmp_path / "c",
                       "--splits", "val"),
                   "val_00000.png (aug seed 0): the backbone produced NaN or infinite tokens")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["norm.weight"].fill_(1e6)  # finite, but beyond float16
    torch.save(state, tmp_path / "big.pth")
    one_line_error(run(*args, "--weights", tmp_path / "big.pth", "--data", dataset, "--out", tmp_path / "d",
                       "--splits", "val"),
                   "val_00000.png (aug seed 0): the backbone produced values beyond the float16 range")
    assert not list((tmp_path / "c").glob("*.h5"))


@pytest.mark.parametrize("where", ["patches", "prefix"])
@pytest.mark.parametrize("bad", [2, 3])
def test_a_non_finite_batch_is_refused_before_its_shard_is_written(tmp_path, monkeypatch, bad, where):
    """The loop copies a batch to the host while the next one computes: a bad batch that completes a
    shard (2), or the split's last batch (3), is still refused before anything holding it is written,
    whether its patch tokens or its prefix tokens (cls, registers) are bad."""
    import seg.extraction.loop as loop
    from seg.extract_features import ExtractConfig, extract
    from seg.runtime.errors import SegError

    real = loop.backbone_features
    calls = []

    def poisoned(model, x, *args, **kwargs):
        out = real(model, x, *args, **kwargs)
        calls.append(len(x))
        if sum(calls) - len(x) <= bad < sum(calls):  # the batch holding sample `bad`
            poison = out[0] if where == "patches" else out[1]
            poison[bad - (sum(calls) - len(x))].fill_(float("nan"))
        return out

    monkeypatch.setattr(loop, "backbone_features", poisoned)
    dataset, out = write_dataset(tmp_path / "d", {"train": 1, "val": 4, "test": 0}), tmp_path / "c"
    with pytest.raises(SegError, match=rf"val_0000{bad}.png \(aug seed 0\): the backbone produced NaN or infinite"):
        extract(ExtractConfig(data=str(dataset), out=str(out), backbone="vits14", size=SMALL_SIZE, random_init=True,
                              splits=("val",), batch_size=2, shard_size=3, workers=0, progress=False), log=lambda s: None)
    # shard 0 holds samples 0-2 (batches [0, 1] and [2]), shard 1 sample 3
    assert sorted(f.name for f in out.glob("*.h5")) == ([] if bad == 2 else ["val-00000.h5"])
    if bad == 3:  # the shard finished before the bad batch is whole and finite
        with h5py.File(out / "val-00000.h5") as f:
            assert len(f["tokens"]) == 3 and np.isfinite(f["tokens"][:].astype(np.float32)).all()


# -- layers -----------------------------------------------------------------------------------

def test_layers_are_normalised_and_checked(dataset, tmp_path):
    r = run(*EXTRACT, "--data", dataset, "--out", tmp_path / "c", "--splits", "train,val", "--layers", "11,8")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["layers"] == [8, 11] and m["token_shape"][0] == 2
    one_line_error(run(*EXTRACT, "--data", dataset, "--out", tmp_path / "d", "--layers", "11,11"),
                   "--layers 11,11: block 11 is named twice")
    cache = tmp_path / "c"
    one_line_error(run("train-head", "--cache", cache, "--out", tmp_path / "r", "--phase", "1", "--strict-preset"),
                   "cache is vits14 @ 224x126, but phase 1 is vits14 @ 476x266; cache stores blocks [8, 11], but "
                   "phase 1 was published on the normed last block [11] only")
    r = run("train-head", "--cache", cache, "--out", tmp_path / "r", "--phase", "1", "--epochs", "1", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "cache stores blocks [8, 11], but phase 1 was published on the normed last block [11] only" in r.output
    assert "head input: 768 channels = 2 layer(s) x 384 from blocks [8, 11], grid 16x9" in r.output


# -- class tables -----------------------------------------------------------------------------

BAD_TABLES = [
    ({"classes": [{"name": "A", "values": [0], "color": [0, 0, 300]}]}, "classes[0] ('A'): color must be three integers"),
    ({"classes": [{"name": "A", "values": [0], "color": [0, 0]}]}, "classes[0] ('A'): color must be three integers"),
    ({"classes": [{"name": "A", "values": [0]}], "ignore_values": [70000]}, "ignore_values: raw value 70000 is outside"),
    ({"classes": [{"name": "A", "values": [0, 5]}], "ignore_values": [5]}, "ignore_values: raw value 5 is also class 'A'"),
    ({"classes": [{"name": "A", "values": [0]}, {"name": "A", "values": [1]}]}, "classes[1] ('A'): the name is also class 0"),
    ({"classes": [{"name": "A", "values": [100.5]}]}, "classes[0] ('A'): raw values must be integers, got 100.5"),
    ({"classes": [{"name": "A", "values": [100.0]}]}, "classes[0] ('A'): raw values must be integers, got 100.0"),
    ({"classes": [{"name": "", "values": [1]}]}, "classes[0]: needs a non-empty string name"),
    ({"classes": []}, 'expected {"classes": [{"name": ..., "values": [...]}, ...]} with at least one class'),
]


@pytest.mark.parametrize("table,message", BAD_TABLES)
def test_class_tables_are_validated_at_load(dataset, tmp_path, table, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    one_line_error(run(*EXTRACT, "--data", dataset, "--out", tmp_path / "c", "--classes", path),
                   f"{path}: {message}")
    assert not (tmp_path / "c").exists()


# -- predict ----------------------------------------------------------------------------------

def test_predict_skips_bad_inputs_and_never_collides(finished_run, small_cache, tmp_path):
    from seg.train.presets import resolve as _resolve

    run_dir = tmp_path / "run"
    train(_resolve(3, {"epochs": 1}), str(small_cache), str(run_dir),
          RunOptions(device="cpu", progress=False, allow_mismatch=True), **QUIET)
    src = write_dataset(tmp_path / "d", {"test": 2})
    folder = src / "Offroad_Segmentation_testImages" / "Color_Images"
    img = cv2.imread(str(folder / "test_00000.png"))
    cv2.imwrite(str(folder / "test_00000.jpg"), img)            # frame.png + frame.jpg
    (folder / "broken.png").write_bytes(b"\x89PNG broken")      # unreadable image
    (folder.parent / "Segmentation" / "test_00001.png").write_bytes(b"bad mask")  # bad optional mask
    out = tmp_path / "p"
    r = run("predict", "--run", run_dir, "--images", folder, "--out", out, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert f"WARNING: skipped: {folder / 'broken.png'}: cannot read image" in r.output
    assert "WARNING: no compare panel for" in r.output and "test_00001.png: cannot read mask" in r.output
    assert "predicted 3 images" in r.output and "skipped 1 unreadable image(s)" in r.output
    assert sorted(p.name for p in (out / "color").iterdir()) == ["test_00000_jpg.png", "test_00000_png.png",
                                                               "test_00001.png"]
    assert sorted(p.name for p in (out / "compare").iterdir()) == ["test_00000_jpg.png", "test_00000_png.png"]
    record = json.loads((out / "predict.json").read_text())
    assert record["outputs"][str(folder / "test_00000.jpg")] == "test_00000_jpg.png" and len(record["skipped"]) == 1
    r = run("predict", "--run", run_dir, "--images", folder, "--out", out, "--workers", "0")  # rerun: same outputs
    assert r.exit_code == 0, r.output
    one_line_error(run("predict", "--run", run_dir, "--images", folder, "--out", tmp_path / "s", "--workers", "0",
                       "--strict"), "broken.png: cannot read image", "(--strict)")
    (out / "color" / "mine.png").write_bytes(b"user")
    one_line_error(run("predict", "--run", run_dir, "--images", folder, "--out", out, "--workers", "0"),
                   f"{out / 'color' / 'mine.png'}: not written by seg predict")
    assert (out / "color" / "mine.png").read_bytes() == b"user"


# -- sources: absolute paths, changes seen, one extraction at a time ----------------------------

def test_data_dir_is_absolute_and_source_changes_are_reported(tmp_path, monkeypatch):
    root = write_dataset(tmp_path / "d", {"val": 2})
    monkeypatch.chdir(tmp_path)
    assert run(*EXTRACT, "--data", "d", "--out", "c", "--splits", "val").exit_code == 0
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["splits"]["val"]["data_dir"] == str(root.resolve() / "Offroad_Segmentation_Training_Dataset" / "val")
    mask = root / "Offroad_Segmentation_Training_Dataset" / "val" / "Segmentation" / "val_00001.png"
    raw = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
    raw[:50, :50] = 800
    cv2.imwrite(str(mask), raw)
    r = run(*EXTRACT, "--data", "d", "--out", "c", "--splits", "val")
    assert r.exit_code == 0 and "WARNING: 1 source file(s) differ from what this cache was extracted from" in r.output
    assert run("cache", "verify", "c").exit_code == 0  # the shards themselves are intact
    r = run("cache", "verify", "c", "--sources")
    assert r.exit_code == 1 and f"{mask}: changed since extraction" in r.output
    monkeypatch.chdir("/")
    r = run("eval", "--run", "x", "--cache", tmp_path / "c")  # from elsewhere the manifest's paths still work
    assert "no best.pt" in r.output


def test_a_second_extraction_into_the_same_cache_is_refused(dataset, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from seg.runtime.output import Output; "
        "Output(sys.argv[1], 'extract', lambda r: False, '.seg-extract.lock').claim(); print('held', flush=True); "
        "time.sleep(60)"), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line_error(run(*EXTRACT, "--data", dataset, "--out", out, "--splits", "val"),
                       f"{out}: in use by another seg extract (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    assert run(*EXTRACT, "--data", dataset, "--out", out, "--splits", "val").exit_code == 0


# -- small gaps -------------------------------------------------------------------------------

def test_numbers_out_of_range_are_one_line_errors(token_cache, tmp_path, finished_run):
    out = tmp_path / "r"
    for flag, value, message in (("--lr", "nan", "--lr must be a finite number > 0, got nan"),
                                 ("--momentum", "-1", "--momentum must be a finite number >= 0 and < 1, got -1.0"),
                                 ("--weight-decay", "-1", "--weight-decay must be a finite number >= 0, got -1.0"),
                                 ("--patience", "-1", "--patience must be 0 (never stop early) or a number of epochs")):
        one_line_error(run(*train_args(token_cache, out, flag, value)), message)
    for cmd in (["eval", "--run", finished_run, "--cache", token_cache], ["predict", "--run", finished_run,
                                                                         "--images", tmp_path, "--out", tmp_path / "p"]):
        one_line_error(run(*cmd, "--batch-size", "0"), "Invalid value for '--batch-size'", code=2)
        one_line_error(run(*cmd, "--workers", "-1"), "Invalid value for '--workers'", code=2)
    assert not out.exists()


def test_extract_flag_gaps(dataset, tmp_path):
    one_line_error(run(*EXTRACT, "--data", dataset, "--out", tmp_path / "a", "--splits", ","), "--splits names no split")
    one_line_error(run(*EXTRACT, "--data", dataset, "--out", tmp_path / "a", "--aug-seeds", "0"),
                   "Invalid value for '--aug-seeds'", code=2)
    assert "K >= 1" in run("extract", "--help").output
    torch.save([1, 2, 3], tmp_path / "list.pth")
    one_line_error(run(*[a for a in EXTRACT if a != "--random-init"], "--weights", tmp_path / "list.pth",
                       "--data", dataset, "--out", tmp_path / "b"),
                   "list.pth: expected a state dict of tensors, got list")
    assert not (tmp_path / "a").exists()


def test_a_one_by_one_grid_is_refused_for_batchnorm(tmp_path):
    rng = np.random.default_rng(0)
    t, m = learnable_split(3, rng, channels=16, grid=(1, 1))
    cache = write_token_cache(tmp_path / "c", {"train": (t, m), "val": (t, m)}, size=(14, 14))
    one_line_error(run(*train_args(cache, tmp_path / "r")),
                   "the patch grid is 1x1; the convnext head's BatchNorm needs more than one value per channel")


def test_ctrl_c_in_train_head_names_resume(token_cache, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(th, "train", interrupted)
    r = run(*train_args(token_cache, tmp_path / "r"))
    assert r.exit_code == 130 and "rerun with --resume to continue from the last finished epoch" in r.output


def test_jpg_images_take_png_masks(tmp_path):
    root = write_dataset(tmp_path / "d", {"val": 2})
    folder = root / "Offroad_Segmentation_Training_Dataset" / "val" / "Color_Images"
    png = folder / "val_00001.png"
    cv2.imwrite(str(folder / "val_00001.jpg"), cv2.imread(str(png)))
    png.unlink()
    r = run(*EXTRACT, "--data", root, "--out", tmp_path / "c", "--splits", "val")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["splits"]["val"]["images"] == ["val_00000.png", "val_00001.jpg"]
    with h5py.File(tmp_path / "c" / "val-00000.h5") as f:
        assert (f["masks"][1] < 10).all()  # the mask of the .jpg was read from val_00001.png
