"""How many bytes the recordings may still write, and why no more.

Three bounds, all on bytes of capture files on disk (file headers and closing blocks
included; the small metadata files are not counted):

* ``max_recording_bytes``: one recording's files together (a ring's files as they are now);
* ``max_total_bytes``: every file in the recorder directory, stopped recordings included
  (delete old recordings to make room);
* ``min_free_bytes``: free space the recorder leaves on its file system, for everything
  else on it (the state store, logs). Free space is read with ``statvfs`` on every drain
  tick (0.2 s) and what was written since is subtracted, so a burst between two ticks
  cannot eat the reserve either. 0 means no reserve: recordings write until the kernel
  answers ENOSPC (the writer then cuts the file back to its last whole packet).

A recording asks for :meth:`DiskBudget.room` before each batch and stops with the reason
of the bound it meets: ``max_recording_bytes``, ``max_total_bytes`` or ``disk_full`` (the
reserve, or a real ``ENOSPC``). A new recording is refused while less than ``MIN_START``
bytes are left.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MIN_START = 64 << 10
CAPTURE_SUFFIXES = (".pcapng", ".pcap")
GiB = 1 << 30


@dataclass(frozen=True)
class DiskLimits:
    max_total_bytes: int = 4 * GiB
    max_recording_bytes: int = 1 * GiB
    min_free_bytes: int = 1 * GiB


class DiskBudget:
    def __init__(self, directory: Path, limits: DiskLimits,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> None:
        self.directory = Path(directory)
        self.limits = limits
        self._statvfs = statvfs
        self._lock = threading.Lock()
        self.used = 0                 # bytes of all files in the directory
        self._free = 0                # free bytes at the last refresh
        self._used_at_refresh = 0
        self.rescan()

    def rescan(self) -> None:
        """Sum the directory's capture files again (after a delete; now and then for drift).
        Metadata files (a few hundred bytes per recording) are left out, as in the writes' count."""
        total = 0
        with os.scandir(self.directory) as it:
            for entry in it:
                if not entry.name.endswith(CAPTURE_SUFFIXES):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
        with self._lock:
            self.used = total
        self.refresh()

    def refresh(self) -> None:
        st = self._statvfs(str(self.directory))
        with self._lock:
            self._free = st.f_bavail * st.f_frsize
            self._used_at_refresh = self.used

    def add(self, delta: int) -> None:
        with self._lock:
            self.used += delta

    def room(self) -> tuple[int, str]:
        """Bytes all recordings together may still write, and the bound that sets it."""
        with self._lock:
            total = self.limits.max_total_bytes - self.used
            if not self.limits.min_free_bytes:
                return total, "max_total_bytes"     # no reserve: write until the kernel says ENOSPC
            disk = self._free - (self.used - self._used_at_refresh) - self.limits.min_free_bytes
        return min((total, "max_total_bytes"), (disk, "disk_full"))

    def refuse_start(self) -> str | None:
        """Why a new recording cannot start now (None: it can)."""
        self.refresh()
        with self._lock:
            free, used = self._free, self.used
        if free - self.limits.min_free_bytes < MIN_START:      # checked even without a reserve
            return (f"the recorder's file system has less than recorder.min_free_bytes = "
                    f"{self.limits.min_free_bytes} bytes free (plus {MIN_START} to record): delete old recordings")
        if self.limits.max_total_bytes - used < MIN_START:
            return (f"the recordings use {used} bytes of recorder.max_total_bytes = "
                    f"{self.limits.max_total_bytes}: delete old recordings")
        return None

    def refuse_spec(self, max_bytes: int | None, ring_bytes: int | None) -> str | None:
        """Why a recording asking for this much can never fit (None: it can)."""
        cap = self.limits.max_recording_bytes
        if max_bytes is not None and max_bytes > cap:
            return f"stop.bytes = {max_bytes} is more than recorder.max_recording_bytes = {cap}"
        if ring_bytes is not None and ring_bytes > cap:
            return f"rotate.size x rotate.count = {ring_bytes} is more than recorder.max_recording_bytes = {cap}"
        return None
