"""An exclusive lock on a directory, so that two seg processes never fill the same output at once."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from seg.runtime.errors import SegError


class DirLock:
    """A POSIX record lock (lockf) on `<directory>/<name>`, holding the owner's pid. The kernel drops
    it when the process dies, so a killed run leaves no stale lock; unlike flock it is not inherited
    by forked loader workers, which may outlive a killed parent for a moment."""

    def __init__(self, directory: Path, name: str, what: str) -> None:
        self.path = Path(directory) / name
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> "DirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):  # not held by another process: say what it is
                os.close(fd)
                raise SegError(f"{self.path}: cannot lock it for the {self.what} ({exc.strerror}); a file system "
                               "without POSIX locks (some network mounts) cannot hold a seg output") from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SegError(f"{self.path.parent}: in use by another seg {self.what} (pid {holder}); "
                           "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
