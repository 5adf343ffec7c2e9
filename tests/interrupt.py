"""Stopping runs part way for resume tests: a training run as Ctrl-C would, an extraction by SIGKILL."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seg import train_head as th
from seg.train.epochs import EpochRunner


def train_interrupted_at(monkeypatch, epoch: int, *args, **kwargs) -> None:
    """train(*args, **kwargs), stopped by a KeyboardInterrupt as 0-based `epoch` starts."""
    real = EpochRunner.train_epoch

    def stop(self, source, e, target=None):
        if e == epoch:
            raise KeyboardInterrupt
        return real(self, source, e, target)

    monkeypatch.setattr(EpochRunner, "train_epoch", stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            th.train(*args, **kwargs)
    finally:
        monkeypatch.setattr(EpochRunner, "train_epoch", real)


def extract_killed_after(args: list, out: Path, shards: int = 2) -> int:
    """`seg extract *args --out out` in a child process, killed with SIGKILL once `shards` shard
    files exist; returns how many exist after the kill."""
    proc = subprocess.Popen([sys.executable, "-m", "seg", "extract", *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.h5"))) < shards:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list(out.glob("*.h5")))
