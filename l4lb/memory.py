"""Give freed memory back to the system.

A 1,000 x 100 document passes through the daemon as a 4 MB request body, its
parsed form, the validated models and a 20 MB plan answer. Two things kept
that memory after the request:

* the control core freezes the objects alive after a whole-document write
  (gc.freeze, so later collections do not scan a million objects), and at that
  moment the request is still being answered: its cyclic garbage was frozen
  with them, for good, one request's worth per PUT. ``maybe_trim()``, run by
  the daemon's sampler after the answer, unfreezes, collects once and freezes
  what is really alive: once per ``freeze()`` (counted here), not whenever
  gc.get_freeze_count() moved. That count drops every time a frozen object is
  freed (a drain replaces a service of the frozen document), and a collection
  of ~10^6 unfrozen objects holds the GIL for 0.3-0.7 s: run every sample
  after any write, it was the tail of the drain latency;
* glibc keeps freed heap: ``trim()`` asks for it back (malloc_trim(3)) when
  resident anonymous memory has grown by more than ``slack`` since last time.

And one thing that cost time: while a whole document is parsed, validated, planned
and applied, the ~10^6 new objects it makes trigger the collector again and again,
and each full collection scans every unfrozen object made so far: ~1 s of a PUT of
1,000 x 100 (measured with gc.callbacks in the daemon under bench/apply.py).
``collections_paused()`` holds the collector off for such a request; reference
counting still frees what it drops, the request's cycles wait for the freeze()
and maybe_trim() that follow a whole-document write anyway.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SLACK = 32 << 20  # bytes of growth worth a trim

_freezes = 0  # freeze() calls so far: a Trimmer refreezes once after each


def freeze() -> None:
    """gc.freeze() what is alive now (after a whole-document write), and note
    it, so the next maybe_trim() sorts the request's garbage out of it."""
    global _freezes
    gc.freeze()
    _freezes += 1


_pause_lock = threading.Lock()
_pauses = 0          # collections_paused() blocks running now (threads may overlap)
_was_enabled = True  # the collector's switch when the first of them began


@contextmanager
def collections_paused() -> Iterator[None]:
    """No cyclic garbage collection inside this block (see the module's doc), nor
    in other threads meanwhile: the switch is the interpreter's. Nests and overlaps
    across threads; the collector is back on when the last block ends, unless it
    was off before the first began."""
    global _pauses, _was_enabled
    with _pause_lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


def anon_bytes() -> int:
    """Resident anonymous memory of this process (RssAnon)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def settle_heap() -> None:
    """Freeze what is alive (a start, once the stored state is in force): unfrozen,
    a big state's objects are scanned by every full collection, which then takes
    0.3-0.7 s under the GIL in the middle of some request. No collection first: it
    would cost the start as much, and a start leaves little cyclic garbage."""
    gc.freeze()


class Trimmer:
    def __init__(self, slack: int = SLACK) -> None:
        self.slack = slack
        self._after_last = anon_bytes()
        self._frozen = _freezes

    def maybe_trim(self) -> int:
        """Refreeze after a new freeze, trim if anonymous memory grew by more than ``slack``;
        bytes given back."""
        if _freezes != self._frozen:
            self._frozen = _freezes
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        before = anon_bytes()
        if before - self._after_last <= self.slack:
            return 0
        return self.trim(before)

    def trim(self, before: int | None = None) -> int:
        before = anon_bytes() if before is None else before
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        self._after_last = anon_bytes()
        freed = max(0, before - self._after_last)
        if freed > self.slack:
            log.info("gave %d MB of freed heap back to the system", freed >> 20)
        return freed
