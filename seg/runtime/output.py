"""The output contract: the one way every seg command that writes takes its output.

1. Claim. The output is new, empty, or this command's own earlier output; anything else there is
   refused, naming the first foreign file. What is "own" is the command's to say (`owns`); the claim
   covers every file written beside the named output (reports, settings, the lock).
2. Lock. A POSIX record lock in the output, holding the pid, for the whole command; a second command
   on the same output is refused naming the holder. Commands that share an output on purpose (sweep
   workers) wait for it instead (`wait=True`), for as long as their setup takes.
3. Temporaries. Every file is written under a unique temporary name, `.<name>.<pid>-<random>.seg-tmp`
   (a video keeps its suffix after that, for OpenCV), and renamed into place when complete. Only
   names of exactly that form, for a name the command owns, whose writing process is dead, are ever
   cleared; a user's `model.onnx.tmp` never is (an older seg's `<name>.tmp` beside that seg's own
   output is tolerated, not refused, and left alone).
4. A refusal or failure leaves everything as it was: the checks run before anything is created, and
   run again under the lock before the first write.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from seg.runtime.errors import SegError

_TEMP = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.seg-tmp(\.[A-Za-z0-9]+)?$")


def temp_path(final: Path, keep_suffix: bool = False) -> Path:
    """A fresh temporary name beside `final`, unique to this process and call. It ends in `.seg-tmp`,
    so that no `*.png` or `*.h5` pattern takes it for a finished file; `keep_suffix` appends the
    final suffix for writers that choose the format by it (OpenCV's video writer)."""
    final = Path(final)
    tail = final.suffix if keep_suffix else ""
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.seg-tmp{tail}")


def temp_target(name: str) -> Optional[str]:
    """The final name that `name` is a seg temporary of, or None."""
    m = _TEMP.match(name)
    return m.group("final") if m else None


def legacy_temp_target(name: str) -> Optional[str]:
    """`<name>.tmp`, the temporary of seg before round four: left by an interrupted older seg, it is
    tolerated beside its own output (not foreign) but never cleared, since a user's file may carry
    such a name too."""
    return name[: -len(".tmp")] if name.endswith(".tmp") and len(name) > 4 else None


def owned_name(rel: str, owns: Callable[[str], bool], lock_name: str) -> bool:
    """Whether `rel` ('/'-separated) is a command's own: its lock, a file `owns` accepts, or a seg
    temporary (or an older seg's `<name>.tmp`) of such a file."""
    if rel == lock_name:
        return True
    head, _, name = rel.rpartition("/")
    final = temp_target(name) or legacy_temp_target(name)
    if final is not None and owns(f"{head}/{final}" if head else final):
        return True
    return owns(rel)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(name: str) -> bool:
    m = _TEMP.match(name)
    return bool(m) and not _pid_alive(int(m.group("pid")))


def vouched_by(folder: Path, record: str, keys: set[str], files: tuple[str, ...]) -> Callable[[str], bool]:
    """owns() for an output whose record (written first, a JSON object with `keys`) vouches for the
    rest: `files` are the command's own only while that record is there and is seg's, so a user's
    file that merely carries one of the names is foreign."""
    try:
        data = json.loads((Path(folder) / record).read_text())
        vouched = isinstance(data, dict) and keys <= set(data)
    except (OSError, ValueError):
        vouched = False
    return lambda rel: vouched and rel in files


def entries(folder: Path) -> Iterator[str]:
    """Every file and symlink under `folder`, as a '/'-separated relative path, sorted; symlinked
    folders are listed, never entered. Empty folders hold nothing to lose and are not listed."""
    found = []
    for top, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(top).relative_to(folder)
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
        dirs[:] = [d for d in dirs if d not in links]
        found += [(rel / f).as_posix() for f in files + links]
    return iter(sorted(found))


class Output:
    """A folder claimed for one command. `owns(relative_path)` says whether a file there is this
    command's own (an earlier output it may replace); the lock and seg temporaries of owned files
    are handled here. Use as a context manager, or claim() / release()."""

    def __init__(self, folder: Path, command: str, owns: Callable[[str], bool], lock_name: str,
                 wait: bool = False, what: Optional[str] = None,
                 covers: Optional[Callable[[str], bool]] = None) -> None:
        self.folder = Path(folder)
        self.command = command
        self.owns = owns
        self.lock_path = self.folder / lock_name
        self.wait = wait
        self.what = what or f"seg {command} output"
        # A file output (an export) claims only its own names in a folder that is the user's:
        # covers(name) says which top-level names those are; nothing else there is looked at.
        self.covers = covers
        self._fd: Optional[int] = None
        self._created = False

    def _ours(self, rel: str) -> bool:
        return owned_name(rel, self.owns, self.lock_path.name)

    def _entries(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        if self.covers is None:
            return list(entries(self.folder))
        return sorted(n for n in os.listdir(self.folder)
                      if n != self.lock_path.name and self.covers(temp_target(n) or n))

    def foreign(self) -> list[str]:
        return [rel for rel in self._entries() if not self._ours(rel)]

    def check(self) -> None:
        """Refuse, changing nothing, unless the folder is new, empty or this command's own."""
        if self.folder.exists() and not self.folder.is_dir():
            raise SegError(f"{self.folder}: exists and is not a folder; choose another --out")
        foreign = self.foreign()
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            if self.covers is not None:
                raise SegError(f"{self.folder / foreign[0]}: not written by seg {self.command}; seg never replaces "
                               "a file it did not write: move it or choose another --out")
            raise SegError(f"{self.folder / foreign[0]}: not written by seg {self.command}{more}; seg writes "
                           f"only into a new or empty folder or its own earlier {self.what}, and never touches "
                           "your files: move it or choose another --out")

    def claim(self) -> "Output":
        self.check()
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.check()  # another process may have written here between the first check and the lock
            self.clear_stale_temps()
        except BaseException:
            self.release(failed=True)
            raise
        return self

    def clear_stale_temps(self) -> None:
        """Temporaries of this command's own files whose writer died (a kill mid-write)."""
        for rel in self._entries():
            name = rel.rpartition("/")[2]
            if _stale(name) and self._ours(rel):
                (self.folder / rel).unlink(missing_ok=True)

    def _lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise SegError(f"{self.lock_path}: cannot lock it ({exc.strerror}); a file system without "
                                   "POSIX locks (some network mounts) cannot hold a seg output") from None
                if self.wait and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise SegError(f"{self.folder}: in use by another seg {self.command} (pid {holder}); wait for it "
                               "to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self, failed: bool = False) -> None:
        """Unlock; after a failure, a folder this claim created that holds nothing but the lock goes
        again, so that a refused command leaves no trace."""
        if self._fd is None:
            return
        if failed and [p.name for p in self.folder.iterdir()] == [self.lock_path.name]:
            self.lock_path.unlink()
            if self._created:
                self.folder.rmdir()
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "Output":
        return self.claim()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None)
