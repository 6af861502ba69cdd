"""One l4lbd per bpffs directory and per state directory.

An exclusive flock(2) on the bpffs directory itself (every daemon that would
share the pinned maps shares it; a bpffs holds no plain files, but a directory
can be locked) and on ``<state_dir>/l4lbd.lock``, taken before anything
touches maps, programs or the store. The kernel drops both when the process
dies, kill -9 included, so there is nothing stale to clean up. The holder's pid
comes from /proc/locks (and the state directory's lock file, which holds it).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "l4lbd.lock"


class LockHeld(RuntimeError):
    """Another process holds one of the locks."""


def holder(fd: int) -> int | None:
    """Pid of the process holding a flock on the file of ``fd`` (from /proc/locks)."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2c:1 0 EOF" ("->" marks a waiter)
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[-3] == want and parts[4].isdigit():
            return int(parts[4])
    return None


class InstanceLock:
    def __init__(self, bpffs: Path, state_dir: Path) -> None:
        self.bpffs = bpffs
        self.state_dir = state_dir
        self._fds: list[int] = []

    def acquire(self) -> None:
        """Take both locks or neither; LockHeld names the holder."""
        try:
            self._take(os.open(self.bpffs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), self.bpffs,
                       "bpffs directory (its pinned maps and program)")
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = self.state_dir / LOCK_FILE
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._take(fd, path, "state directory (its store)")
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            self.release()
            raise

    def _take(self, fd: int, path: Path, what: str) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder(fd)
            os.close(fd)
            who = f"pid {pid}" if pid is not None else "a process whose pid is not visible here"
            raise LockHeld(f"another l4lbd ({who}) holds the lock on {path}, the {what}: only one daemon may "
                           "use it. Stop that one first (nothing was changed)") from None
        self._fds.append(fd)

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing drops the flock
        self._fds = []
