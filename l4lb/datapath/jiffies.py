"""The kernel's jiffies, as the flow table stamps its entries (bpf_jiffies64(),
truncated to 32 bits), and HZ, to turn a window in seconds into ticks.

User space has no direct read of jiffies (only /proc/timer_list, root-only and
large) and no HZ (sysconf's CLK_TCK is USER_HZ, always 100). So: a
two-instruction XDP program (call bpf_jiffies64; exit) run with
BPF_PROG_TEST_RUN returns the low 32 bits as its verdict -- the very clock
the datapath uses, read in a few microseconds with no compile. HZ is measured
once against CLOCK_MONOTONIC over ~60 ms and snapped to the values kernels
are built with.
"""

from __future__ import annotations

import os
import struct
import threading
import time

from l4lb.datapath import libbpf

BPF_FUNC_JIFFIES64 = 118   # include/uapi/linux/bpf.h, __BPF_FUNC_MAPPER
# call bpf_jiffies64 (r0 = jiffies); exit (verdict = low 32 bits of r0)
_PROGRAM = struct.pack("<BBhi", 0x85, 0, 0, BPF_FUNC_JIFFIES64) + struct.pack("<BBhi", 0x95, 0, 0, 0)
_FRAME = bytes(64)                      # XDP test runs want at least an Ethernet header
KERNEL_HZ = (100, 250, 300, 1000)       # CONFIG_HZ choices
CALIBRATE_SECONDS = 0.06                # 6 ticks at HZ=100, 60 at 1000: no two choices overlap


class KernelClock:
    """jiffies (low 32 bits) and HZ of this kernel. Thread-safe; HZ is measured
    on first use (one ~60 ms pause, in the caller's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._hz: int | None = None

    def now(self) -> int:
        with self._lock:
            if self._fd < 0:
                self._fd = libbpf.prog_load_raw(libbpf.BPF_PROG_TYPE_XDP, "l4lb_jiffies", _PROGRAM)
            return libbpf.test_run(self._fd, _FRAME, out_size=len(_FRAME))[0]

    @property
    def hz(self) -> int:
        if self._hz is None:
            j0, t0 = self.now(), time.monotonic()
            time.sleep(CALIBRATE_SECONDS)
            j1, t1 = self.now(), time.monotonic()
            measured = ((j1 - j0) & 0xFFFFFFFF) / (t1 - t0)
            self._hz = min(KERNEL_HZ, key=lambda hz: abs(hz - measured))
        return self._hz

    def ticks(self, seconds: float) -> int:
        return max(1, round(seconds * self.hz))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
