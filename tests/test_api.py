"""The Python API of a trained run: labels in three lines, equal to `seg predict`'s, and one-line
refusals of inputs that are not RGB uint8 images."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import seg
from seg.cli import main
from seg.data.decode import read_image
from seg.data.layouts import list_split
from seg.predict import colorize
from seg.runtime.errors import SegError


@pytest.fixture
def run_dir(phase3_run):
    return phase3_run  # shared, read-only: nothing here writes into it


def test_api_labels_equal_seg_predict(run_dir, dataset, tmp_path):
    files = list_split(dataset, "val")
    paths = [files.image_path(i) for i in range(len(files.names))]
    model = seg.load(run_dir, device="cpu")
    labels = model.predict([read_image(p) for p in paths])
    r = CliRunner().invoke(main, ["predict", "--run", str(run_dir), "--images", str(paths[0].parent), "--out",
                                  str(tmp_path / "p"), "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 0, r.output
    for p, ids in zip(paths, labels):
        assert ids.shape == (540, 960) and ids.dtype == np.uint8
        written = cv2.cvtColor(cv2.imread(str(tmp_path / "p" / "color" / f"{p.stem}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(written, colorize(ids, model.classes))
    one = model.predict(str(paths[0]))                       # a path, alone: an array, alone
    np.testing.assert_array_equal(one, labels[0])
    scores = model.predict_logits(paths[0])
    assert scores.shape == (len(model.classes.names), 540, 960) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores.argmax(0), labels[0])


def test_precision_chooses_backbone_and_head_arithmetic(run_dir, dataset, tmp_path):
    """auto: the cache's bf16 backbone and the run's bf16 autocast (what eval from the cache scores);
    fp32: float32 everywhere, the exported graph's computation; the choice reaches predict.json."""
    import json

    import torch

    auto, fp32 = seg.load(run_dir, device="cpu"), seg.load(run_dir, device="cpu", precision="fp32")
    assert (auto.segmenter.compute_dtype, auto.segmenter.amp) == (torch.bfloat16, torch.bfloat16)
    assert (fp32.segmenter.compute_dtype, fp32.segmenter.amp) == (torch.float32, None)
    assert fp32.segmenter.backbone.blocks[0].attn.qkv.weight.dtype == torch.float32
    image = read_image(list_split(dataset, "val").image_path(0))
    a, b = auto.predict_logits(image), fp32.predict_logits(image)
    assert 0 < np.abs(a - b).max() < 0.5  # two computations of the same model
    with pytest.raises(SegError, match="precision must be auto, fp32, bf16 or fp16, got 'fp64'"):
        seg.load(run_dir, device="cpu", precision="fp64")
    r = CliRunner().invoke(main, ["predict", "--run", str(run_dir), "--images", str(list_split(dataset, "val").image_path(0)),
                                  "--out", str(tmp_path / "p"), "--precision", "fp32", "--workers", "0", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p" / "predict.json").read_text())["precision"] == "fp32"
    written = cv2.cvtColor(cv2.imread(str(tmp_path / "p" / "color" / f"{list_split(dataset, 'val').image_path(0).stem}.png")),
                           cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(written, colorize(fp32.predict(image), fp32.classes))


def test_api_sliding_window_and_tta_follow_the_cli_options(run_dir, dataset):
    image = read_image(list_split(dataset, "val").image_path(0))
    small = image[::3, ::3].copy()  # another size: labels come back at it
    slid = seg.load(run_dir, device="cpu", mode="slide", tta="flip").predict(small)
    assert slid.shape == small.shape[:2]


@pytest.mark.parametrize("bad,message", [
    (np.zeros((20, 30), np.uint8), "image array is grayscale (20, 30); expected HxWx3 RGB"),
    (np.zeros((20, 30, 4), np.uint8), "drop the alpha channel with image[..., :3]"),
    (np.zeros((20, 30, 3), np.float32), "image array is float32; expected uint8 RGB values 0..255"),
    ([1, 2, 3], "an image is an HxWx3 uint8 RGB numpy array or a path, got int"),
])
def test_api_refuses_what_is_not_an_rgb_image(run_dir, bad, message):
    model = seg.load(run_dir, device="cpu")
    with pytest.raises(SegError) as err:
        model.predict(bad)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_api_refuses_a_run_without_best_pt(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SegError, match="empty: no best.pt"):
        seg.load(Path(tmp_path / "empty"), device="cpu")


def test_video_in_annotated_video_out_with_every_frame(run_dir, dataset, tmp_path):
    from seg.data.video_frames import frame_count

    files = list_split(dataset, "val")
    clip = tmp_path / "in" / "clip.avi"
    clip.parent.mkdir()
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (240, 136))
    for i in range(7):
        rgb = cv2.resize(read_image(files.image_path(i % len(files.names))), (240, 136))
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    assert frame_count(clip) == 7
    cv2.imwrite(str(tmp_path / "in" / "still.png"), cv2.imread(str(files.image_path(0))))
    r = CliRunner().invoke(main, ["predict", "--run", str(run_dir), "--images", str(tmp_path / "in"), "--out",
                                  str(tmp_path / "p"), "--device", "cpu", "--workers", "0", "--video-masks"])
    assert r.exit_code == 0, r.output
    assert "predicted 1 images and 7 frames of 1 video(s)" in r.output
    out = tmp_path / "p" / "video" / "clip.mp4"
    assert frame_count(out) == 7
    cap = cv2.VideoCapture(str(out))
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (240, 136)
    cap.release()
    assert sorted(p.name for p in (tmp_path / "p" / "video" / "clip").iterdir()) == [f"{i:06d}.png" for i in range(1, 8)]
    assert not list((tmp_path / "p" / "video").glob(".*seg-tmp*"))
