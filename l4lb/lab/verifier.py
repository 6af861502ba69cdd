"""How complex a loaded program is to the kernel: for the benches' complexity table.

* xlated instructions: what the kernel keeps after verification and rewriting
  (``bpf_prog_info.xlated_prog_len`` / 8) of the program that is loaded.
* verified instructions: the verifier's "processed N insns" (every instruction
  of every path it walked; its limit is 1,000,000). BCC loads without a log, so
  the same instructions (BCC's module still holds them, map fds already in place)
  are loaded a second time with BPF_LOG_STATS, which logs only the summary,
  into our own buffer; that copy is closed at once.
"""

from __future__ import annotations

import ctypes as ct
import os
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from l4lb.datapath.libbpf import prog_info

BPF_PROG_TYPE_XDP = 6
BPF_LOG_STATS = 4
_PROCESSED = re.compile(rb"processed (\d+) insns")


@dataclass(frozen=True)
class Complexity:
    xlated: int          # instructions after verification (the loaded program)
    verified: int | None  # instructions the verifier processed (None: not in the log)
    log: str             # the stats log, for when `verified` is None


@cache
def _bcc() -> Any:
    from bcc.libbcc import lib  # the library BCC itself loads

    # bcc_prog_load (libbcc's src/cc/libbpf.c): returns the fd; logs into log_buf
    # when log_level > 0 and a buffer is given, printing nothing on success.
    lib.bcc_prog_load.argtypes = [ct.c_int, ct.c_char_p, ct.c_void_p, ct.c_int, ct.c_char_p, ct.c_uint,
                                  ct.c_int, ct.c_char_p, ct.c_uint]
    lib.bcc_prog_load.restype = ct.c_int
    return lib


def complexity(bpf: Any, func: str, prog_fd: int) -> Complexity:
    """Of `func` in the ``bcc.BPF`` `bpf`, loaded as `prog_fd`."""
    lib, name = _bcc(), func.encode()
    buf = ct.create_string_buffer(1 << 16)
    fd = lib.bcc_prog_load(BPF_PROG_TYPE_XDP, name, lib.bpf_function_start(bpf.module, name),
                           lib.bpf_function_size(bpf.module, name), lib.bpf_module_license(bpf.module),
                           lib.bpf_module_kern_version(bpf.module), BPF_LOG_STATS, buf, len(buf))
    if fd >= 0:
        os.close(fd)
    m = _PROCESSED.search(buf.value)
    return Complexity(prog_info(prog_fd).xlated_prog_len // 8, int(m.group(1)) if m else None,
                      buf.value.decode(errors="replace").strip())
