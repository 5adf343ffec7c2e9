"""docs/your-own-images.md, run as written: its shell commands through the CLI (extract with
--random-init: no weights can be downloaded here, as the page says) and its onnxruntime snippet, on a
generated plain folder. A change to a flag or an output name breaks this test, not the reader."""

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from seg.cli import main

pytestmark = pytest.mark.slow  # not in the quick lane (README: Development)
PAGE = Path(__file__).resolve().parent.parent / "docs" / "your-own-images.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_your_own_images_page_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "mydata" / "images").mkdir(parents=True)
    (tmp_path / "mydata" / "masks").mkdir()
    for i in range(1, 13):
        rgb = rng.integers(0, 255, (180, 320, 3), np.uint8)
        mask = np.zeros((180, 320), np.uint8)
        mask[:60], mask[60:120, : 100 + 10 * i] = 2, 1          # sky, bush, ground
        rgb[mask == 2] //= 3
        cv2.imwrite(f"mydata/images/photo{i:03d}.jpg", rgb)
        cv2.imwrite(f"mydata/masks/photo{i:03d}.png", mask)

    table = CliRunner().invoke(main, ["classes", "--data", "mydata", "--no-progress"])
    assert table.exit_code == 0 and [c["values"] for c in json.loads(table.output)["classes"]] == [[0], [1], [2]]
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.startswith("seg ")]
    assert [c.split()[1] for c in commands] == ["extract", "train-head", "eval", "predict", "export"]
    for command in commands:
        args = shlex.split(command)[1:] + (["--random-init"] if command.startswith("seg extract") else [])
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, f"{command}\n{r.output}"
    assert (tmp_path / "run" / "eval-val" / "eval.json").is_file()
    assert {"legend.png", "predict.json"} <= {p.name for p in (tmp_path / "predictions").iterdir()}
    assert len(list((tmp_path / "predictions" / "ids").iterdir())) == 12

    (snippet,) = blocks("python")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, str(PAGE), "exec"), {})
    shape = printed.getvalue().split(")")[0] + ")"
    assert shape == "(180, 320)"
