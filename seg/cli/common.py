"""What every `seg` command shares: user mistakes as one line, flag parsers, shared options."""

from __future__ import annotations

import functools
import sys

import click

from seg.data.file_names import printable
from seg.runtime.errors import SegError


OOM_ADVICE = "lower --batch-size"


def user_errors(fn=None, *, on_interrupt: str = "interrupted", on_oom: str = OOM_ADVICE):
    """Turn SegError and OS errors (full disk, permissions, missing paths) into one line and exit 1;
    a GPU out of memory into one line naming the flags that lower the memory (on_oom); Ctrl-C says
    how to continue (on_interrupt) and exits 130."""
    if fn is None:
        return functools.partial(user_errors, on_interrupt=on_interrupt, on_oom=on_oom)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegError as exc:
            raise click.ClickException(printable(str(exc))) from None
        except OSError as exc:
            where = exc.filename if exc.filename is not None else "seg"
            raise click.ClickException(printable(f"{where}: {exc.strerror or exc}")) from None
        except KeyboardInterrupt:
            click.echo(on_interrupt, err=True)
            sys.exit(130)
        except RuntimeError as exc:
            if type(exc).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
                raise
            first = str(exc).splitlines()[0] if str(exc) else "out of memory"
            raise click.ClickException(printable(f"the GPU ran out of memory ({first[:160]}); {on_oom}")) from None

    return wrapper


def parse_pair(text: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise SegError(f"{flag} takes LOW,HIGH (e.g. 0.5,1.5), got {text!r}") from None
    return lo, hi


def parse_stride(text):
    """'WxH' -> (h, w) pixels, or None for the default."""
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SegError(f"--stride takes WxH pixels (e.g. 429x243), got {text!r}") from None
    if w < 1 or h < 1:
        raise SegError(f"--stride must be positive, got {text!r}")
    return h, w


def parse_scales(text):
    if text is None:
        return None
    try:
        scales = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SegError(f"--tta-scales takes comma-separated numbers (e.g. 1,1.32,1.73), got {text!r}") from None
    if not scales or not all(0.1 <= s <= 8 for s in scales):
        raise SegError(f"--tta-scales must be numbers between 0.1 and 8, got {text!r}")
    return scales


COUNT = click.IntRange(min=1)
WORKERS = click.IntRange(min=0)

LAYOUT = click.option("--layout", type=click.Choice(["auto", "falcon", "folders", "cityscapes", "ade20k", "voc"]),
                      default="auto", show_default=True,
                      help="Dataset layout of --data; auto finds it (README: Your own dataset).")
NO_PROGRESS = click.option("--no-progress", is_flag=True,
                           help="No progress bars (they are off anyway when stderr is not a terminal).")


def example(*commands: str) -> str:
    """A command's help ends with examples (click keeps a paragraph after \\b as it is)."""
    return "\b\nExample:\n" + "\n".join(f"  {c}" for c in commands)
