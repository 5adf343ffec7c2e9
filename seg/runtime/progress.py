"""Progress bars for people at a terminal, and none in log files."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(iterable=None, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr, off when `enabled` is false (--no-progress, other ranks) or when stderr
    is not a terminal: a redirected log then gets plain lines, not carriage-return redraws."""
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True, **kwargs)
