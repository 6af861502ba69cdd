"""Many BPF_PROG_TEST_RUN calls at little cost per call: the benches' method B.

`l4lb.datapath.libbpf.test_run` builds buffers and options for every call: right
for tests, but its Python costs more than the program it times. :func:`run_frames`
hands a whole batch to a small C loop (bench/c/testrun_batch.c, built by
scripts/setup.sh into build/testrun_batch.so): one ctypes call per batch.

Either way the figure is the kernel's: ``bpf_test_run()`` (net/bpf/test_run.c)
reads the clock just before its repeat loop and again after it, and reports the
time between, divided by repeat. The syscall, the frame copy-in, the xdp_buff
set-up and any caller overhead are outside that window; one clock read's worth
of timer overhead per call is inside (method A spreads it over `repeat` passes).
:func:`python_loop` times the same calls from a Python loop, so a bench can
print what the C loop saves.
"""

from __future__ import annotations

import ctypes as ct
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from l4lb.datapath.libbpf import BpfTestRunOpts, DatapathOSError, XdpMd, _lib

ROOT = Path(__file__).resolve().parents[2]
BATCH_SO = ROOT / "build" / "testrun_batch.so"
XDP_VERDICTS = ("aborted", "drop", "pass", "tx", "redirect")


class _Result(ct.Structure):
    # struct batch_result of bench/c/testrun_batch.c
    _fields_ = [("duration_ns", ct.c_uint64), ("wall_ns", ct.c_uint64), ("verdicts", ct.c_uint64 * 8)]


@dataclass(frozen=True)
class BatchResult:
    calls: int
    mean_ns: float            # mean of the kernel-reported durations (one program run each)
    wall_ns: float            # wall-clock time per call of the C loop (syscall and set-up included)
    verdicts: dict[str, int]  # XDP verdict -> calls


@cache
def _batch() -> ct.CDLL:
    if not BATCH_SO.exists():
        raise FileNotFoundError(f"{BATCH_SO} is missing: scripts/setup.sh (make setup) builds it "
                                "from bench/c/testrun_batch.c")
    lib = ct.CDLL(str(BATCH_SO))
    lib.run_frames.argtypes = [ct.c_int, ct.c_void_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_uint64,
                               ct.POINTER(_Result)]
    lib.run_frames.restype = ct.c_int
    return lib


def run_frames(prog_fd: int, frames: np.ndarray, *, ingress_ifindex: int, calls: int) -> BatchResult:
    """`calls` single runs (repeat 1) of `prog_fd`, on frames[i % len(frames)].

    `frames`: one frame per row, all the same length. Runs on the calling thread
    (pin it for figures that mean something); releases the GIL meanwhile.
    """
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    n, size = frames.shape
    res = _Result()
    rc = _batch().run_frames(prog_fd, frames.ctypes.data, n, size, ingress_ifindex, calls, ct.byref(res))
    if rc < 0:
        raise DatapathOSError(-rc, f"BPF_PROG_TEST_RUN: {os.strerror(-rc)}")
    verdicts = {XDP_VERDICTS[i] if i < len(XDP_VERDICTS) else str(i): int(v)
                for i, v in enumerate(res.verdicts) if v}
    return BatchResult(calls, res.duration_ns / calls, res.wall_ns / calls, verdicts)


def python_loop(prog_fd: int, frame: bytes, *, ingress_ifindex: int, calls: int) -> float:
    """Wall-clock ns per call of the same calls made one by one from a Python ctypes
    loop (one reused options struct, no output copy): what the C loop saves."""
    buf = ct.create_string_buffer(frame, len(frame))
    ctx = XdpMd(data=0, data_end=len(frame), ingress_ifindex=ingress_ifindex)
    opts = BpfTestRunOpts(sz=ct.sizeof(BpfTestRunOpts), data_in=ct.addressof(buf), data_size_in=len(frame),
                          ctx_in=ct.addressof(ctx), ctx_size_in=ct.sizeof(ctx), repeat=1)
    ref, fn, total = ct.byref(opts), _lib().bpf_prog_test_run_opts, 0
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        if fn(prog_fd, ref):
            raise DatapathOSError(ct.get_errno(), "BPF_PROG_TEST_RUN")
        total += opts.duration
    return (time.perf_counter_ns() - t0) / calls
