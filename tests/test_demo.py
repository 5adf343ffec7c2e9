"""`seg demo` end to end: even on random backbone weights the head must learn the generated data."""

import json

import cv2
import pytest
from click.testing import CliRunner

from seg.cli import main

pytestmark = pytest.mark.slow  # not in the quick lane (README: Development)


def test_demo_learns_on_random_weights(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--train-images", "16", "--epochs", "10",
                                  "--size", "238x140", "--random-init", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "run" / "eval-test" / "eval.json").read_text())
    assert result["miou"] > 0.4, result["miou"]  # chance is ~0.1 for 10 classes
    assert result["images"] == 4
    assert "RANDOM backbone weights" in r.output and "Landscape" in r.output
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["weights_sha256"] == "random-init" and manifest["augmentation"]["policy"] == "phase3"
    assert manifest["splits"]["train"]["seeds"] == [1, 2]  # every cached train sample augmented
    raw_mask = cv2.imread(str(next((out / "data").rglob("Segmentation/*.png"))), cv2.IMREAD_UNCHANGED)
    assert raw_mask.dtype.name == "uint16" and raw_mask.shape == (540, 960)
    assert f"legend            {out / 'predictions' / 'legend.png'}" in r.output
    # the demo's overlays carry a legend strip under the image
    shown = cv2.imread(str(out / "predictions" / "overlay" / "test_00000.png"))
    assert shown.shape == (540 + 30, 960, 3) and (shown[540:] < 100).any()
    for p in ["run/curves.png", "run/eval-test/confusion.png", "predictions/overlay/test_00000.png",
              "predictions/compare/test_00000.png", "predictions/legend.png"]:
        assert (out / p).is_file(), p
    again = CliRunner().invoke(main, ["demo", "--out", str(out), "--random-init"])
    assert again.exit_code == 1 and "holds a finished demo" in again.output
