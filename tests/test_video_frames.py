"""A video as an unlabeled split: every N-th frame, read by index in any order as a sequential decode
reads it, cached like a folder of the same frames, and its source watched like any image."""

import json
import os

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from seg.cache import FeatureCache
from seg.cli import main
from seg.data.decode import read_image
from seg.data.layouts import list_split
from seg.data.unlabeled import unlabeled_split
from seg.data.video_frames import frames_of, read_frame
from seg.extract_features import ExtractConfig, extract
from seg.runtime.errors import SegError

TINY = dict(backbone="vits14", size="112x56", random_init=True, aug_policy="phase3", aug_seeds=1, batch_size=4,
            shard_size=8, workers=0, progress=False)


@pytest.fixture(scope="module")
def clip(tmp_path_factory, dataset):
    """8 frames of the synthetic desert, each a different picture, in an MJPG .avi."""
    files = list_split(dataset, "train")
    path = tmp_path_factory.mktemp("video") / "drive.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (240, 136))
    for i in range(8):
        rgb = cv2.resize(read_image(files.image_path(i % len(files.names))), (240, 136))
        writer.write(cv2.cvtColor(np.roll(rgb, 17 * i, axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_a_frame_read_by_index_in_any_order_is_the_sequential_frame(clip):
    frames = [f for chunk in frames_of(clip, 3) for f in chunk]
    assert len(frames) == 8 and not np.array_equal(frames[0], frames[1])
    for i in (5, 6, 0, 7, 2, 2, 3):   # back (a seek), the next one, a short skip forward (decoded), the same again
        assert np.array_equal(read_frame(clip, i), frames[i]), i
    with pytest.raises(SegError, match="frame 8 cannot be read"):
        read_frame(clip, 8)


def test_an_unlabeled_video_split_lists_every_nth_frame(clip, tmp_path):
    files = unlabeled_split(f"drive={clip}", every=3)
    assert (files.split, files.layout, files.root) == ("drive", "video", clip.parent)
    assert files.names == ("drive.avi@0000000", "drive.avi@0000003", "drive.avi@0000006")
    assert files.image_path(1) == clip
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SegError, match="a folder of images or a video"):
        unlabeled_split(f"drive={tmp_path / 'notes.txt'}")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"f{i}.png"), np.zeros((8, 8, 3), np.uint8))
    assert unlabeled_split(f"d={folder}", every=2).names == ("f0.png", "f2.png", "f4.png")


def test_video_frames_cache_as_the_same_frames_from_a_folder_do(clip, dataset, tmp_path):
    """Seed 0 (the plain resize) of frame 3 holds the tokens a PNG of that decoded frame gives;
    the augmented seeds are drawn per sample name, like any image's."""
    out = tmp_path / "cache"
    r = CliRunner().invoke(main, ["extract", "--data", str(dataset), "--out", str(out), "--backbone", "vits14",
                                  "--size", "112x56", "--random-init", "--aug-policy", "phase3", "--aug-seeds", "1",
                                  "--workers", "0", "--batch-size", "4", "--shard-size", "8", "--splits", "none",
                                  "--unlabeled", f"drive={clip}", "--every", "3",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(f for chunk in frames_of(clip, 8) for f in chunk):
        if i % 3 == 0:
            cv2.imwrite(str(frames / f"frame{i:02d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    extract(ExtractConfig(data=str(dataset), out=str(out), splits=(), unlabeled=(f"pngs={frames}",), every=1, **TINY),
            log=lambda s: None)
    m = json.loads((out / "manifest.json").read_text())
    s = m["splits"]["drive"]
    assert (s["layout"], s["labels"], s["seeds"], len(s["images"])) == ("video", "none", [0, 1], 3)
    cache = FeatureCache(out)
    video, pngs = cache.split("drive"), cache.split("pngs")
    assert np.array_equal(video.read_rows(np.array([1]))[0], pngs.read_rows(np.array([1]))[0])  # seed 0, frame 3
    info = CliRunner().invoke(main, ["cache", "info", str(out)])
    assert f"UNLABELED (frames 0, 3, ... of {clip}" in info.output
    assert CliRunner().invoke(main, ["cache", "verify", str(out), "--sources"]).exit_code == 0
    os.utime(clip, ns=(0, 10 ** 9))
    r = CliRunner().invoke(main, ["cache", "verify", str(out), "--sources"])
    assert r.exit_code != 0 and f"{clip}: changed since extraction" in r.output


def test_every_without_an_unlabeled_split_is_refused(dataset, tmp_path):
    with pytest.raises(SegError, match="--every applies to --unlabeled splits"):
        extract(ExtractConfig(data=str(dataset), out=str(tmp_path / "c"), every=2, **TINY), log=lambda s: None)
