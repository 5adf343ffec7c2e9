from pathlib import Path

import pytest

from seg.data.synthetic import write_dataset

DATA_DIR = Path(__file__).parent / "data"
# Small but real: 960x540 RGB PNGs and uint16 raw masks in the Falcon layout.
COUNTS = {"train": 6, "val": 3, "test": 2}
SMALL_SIZE = "224x126"  # 16x9 patches: keeps the ViT-S forward pass to a few tens of ms


def golden_model(model_cls, fixture: str):
    """(model with the fixture's config and weights, in eval mode; the fixture) of a golden file."""
    import torch

    gold = torch.load(DATA_DIR / fixture, weights_only=True)
    model = model_cls(**gold["config"])
    model.load_state_dict(gold["state_dict"], strict=True)
    return model.eval(), gold


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("falcon"), COUNTS)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory, dataset) -> Path:
    """A phase3-augmented vits14 random-init cache shared by read-only tests."""
    from seg.extract_features import ExtractConfig, extract

    out = tmp_path_factory.mktemp("cache") / "c"
    extract(ExtractConfig(data=str(dataset), out=str(out), backbone="vits14", size=SMALL_SIZE,
                          random_init=True, aug_policy="phase3", aug_seeds=2, splits=("train", "val", "test"),
                          batch_size=4, shard_size=4, workers=0, progress=False), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def phase3_run(tmp_path_factory, small_cache) -> Path:
    """A phase-3 run trained one epoch on `small_cache`, shared by read-only tests (API, export)."""
    from seg.train.presets import resolve
    from seg.train_head import RunOptions, train

    out = tmp_path_factory.mktemp("run") / "p3"
    train(resolve(3, {"epochs": 1, "lr": 1e-3}), str(small_cache), str(out), RunOptions(device="cpu", progress=False),
          log=lambda s: None)
    return out
