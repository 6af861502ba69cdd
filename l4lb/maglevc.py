"""The compiled Maglev rounds (l4lb/maglev_assign.c), loaded with ctypes.

setuptools builds the C file as an extension module (``l4lb._maglev_assign``, see
setup.py), so pip puts the shared object next to this file, editable or not. It
uses no Python API: ctypes calls its one function on numpy arrays' buffers. When
it is absent (a checkout nobody pip-installed, no compiler), :func:`assign`
answers False and maglev.py runs the same rounds in numpy, about twice the time
per table (bench/maglev_build.py); the daemon says so once in its log.
"""

from __future__ import annotations

import ctypes as ct
import logging
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_P = ct.c_void_p
_I64 = ct.c_int64


@cache
def library() -> ct.CDLL | None:
    """The loaded shared object, or None (said once)."""
    found = sorted(Path(__file__).resolve().parent.glob("_maglev_assign*.so"))
    if not found:
        log.warning("l4lb/_maglev_assign*.so is not built (pip install the project): "
                    "Maglev tables are built in numpy, about twice as slow")
        return None
    lib = ct.CDLL(str(found[0]))
    fn = lib.l4lb_maglev_assign
    fn.argtypes = [_I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P]
    fn.restype = ct.c_int
    return lib


def _buf(a: np.ndarray, dtype: type, writable: bool = False) -> int:
    if a.dtype != dtype or not a.flags.c_contiguous or (writable and not a.flags.writeable):
        raise TypeError(f"maglevc: expected a contiguous {'writable ' if writable else ''}{np.dtype(dtype)} array")
    return a.ctypes.data


def assign(owner: np.ndarray, wf: np.ndarray, need: np.ndarray, offset: np.ndarray, skip: np.ndarray,
           clock: np.ndarray, pi: np.ndarray, pi_inv: np.ndarray) -> bool:
    """maglev._assign in C: fills ``owner`` and consumes ``need``. False (nothing
    touched) when the library is not built."""
    lib = library()
    if lib is None:
        return False
    m, n = len(owner), len(wf)
    if not (len(need) == len(offset) == len(skip) == n and len(clock) == len(pi) == len(pi_inv) == m):
        raise ValueError("maglevc: array lengths disagree")
    rc = lib.l4lb_maglev_assign(
        m, n, _buf(wf, np.float64), _buf(need, np.int64, True), _buf(offset, np.int64), _buf(skip, np.int64),
        _buf(clock, np.float64), _buf(pi, np.int64), _buf(pi_inv, np.int64), _buf(owner, np.int32, True))
    if rc == -1:
        raise MemoryError("Maglev builder: out of memory")
    if rc:
        raise AssertionError("Maglev builder stalled")
    return True
