"""Stopping a training run part way, as Ctrl-C would, for resume tests."""

import pytest

from seg import train_head as th
from seg.train.epochs import EpochRunner


def train_interrupted_at(monkeypatch, epoch: int, *args, **kwargs) -> None:
    """train(*args, **kwargs), stopped by a KeyboardInterrupt as 0-based `epoch` starts."""
    real = EpochRunner.train_epoch

    def stop(self, source, e):
        if e == epoch:
            raise KeyboardInterrupt
        return real(self, source, e)

    monkeypatch.setattr(EpochRunner, "train_epoch", stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            th.train(*args, **kwargs)
    finally:
        monkeypatch.setattr(EpochRunner, "train_epoch", real)
