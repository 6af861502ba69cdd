"""Maglev table buffers in ``maglev_outer`` (bpf_src/lib/maps.h).

Each service entry names the buffer (outer index) its table is in force in.
A change fills a buffer nobody uses, then the caller points the service entry
at it. Buffers are inner maps created once and kept: no outer-map write is
needed for a change, which matters because the kernel waits for an RCU grace
period (~10-15 ms here) after every outer write — alone more than a drain's
20 ms budget allows.

A buffer that just went out of force may still be read by packets in flight,
so it is written again only after a grace period that started after it was
retired. ``grace_soon()`` runs one in the background after an apply, and a
change takes a buffer that is already writable, so a drain (and its undo, and
the next drain) rarely waits; only when every spare buffer was retired within
the last grace period does a change wait, or create buffers (in one batch).
A buffer also remembers what it holds: going back to a previous table (a
drain's undo, a rollback) points at it again without writing anything.

Every buffer is pinned (``<pin dir>/maglev/<index>``) when it is created, so
a restarted daemon opens it by path: reopening an inner map by its id would
need CAP_SYS_ADMIN.
"""

from __future__ import annotations

import ctypes as ct
import logging
import mmap
import os
import threading
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np

from l4lb.background import Background
from l4lb.datapath import libbpf
from l4lb.datapath.config import DatapathError

log = logging.getLogger(__name__)

SPARES = 8  # buffers kept beyond those in force (64 KiB each at M = 16381)


class Rings:
    def __init__(self, m: int, capacity: int, spares: int = SPARES) -> None:
        self.m = m
        self.capacity = capacity  # maglev_outer's max_entries
        self.spares = spares
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}  # outer index -> mapping, view of the u32s
        self.busy: set[int] = set()  # buffers some service entry points at
        self._holds: dict[int, Hashable] = {}  # buffer -> inputs of the table it holds (absent: unknown)
        self._by_inputs: dict[Hashable, int] = {}
        # Retirement in "flip numbers": a buffer retired at flip n is out of reach
        # once a grace period that started at or after n has ended. Buffers found
        # at start count as retired at flip 1 (the previous daemon may have
        # flipped away from one just before it died); new ones are never reachable.
        self._flips = 1
        self._retired: dict[int, int] = {}
        self._safe = 0
        self._grace_lock = threading.Lock()
        self._bg = Background(self._grace_all, "l4lb-rcu-grace")
        self.waited = 0.0  # seconds callers spent waiting for grace periods
        self.pin_dir: Path | None = None  # where buffers are pinned (None: not pinned, e.g. a test's outer map)
        self._foreign: set[int] = set()  # outer slots holding a buffer we could not open: never overwritten

    # --- grace periods ---------------------------------------------------------------------
    def pending(self) -> bool:
        return self._flips > self._safe

    def writable(self, idx: int) -> bool:
        return idx not in self.busy and self._retired.get(idx, 1) <= self._safe

    def grace(self, always: bool = False) -> None:
        """Wait until every buffer retired so far is out of reach of packets
        (``always``: wait for a grace period even if none was retired)."""
        with self._grace_lock:
            target = self._flips
            if target <= self._safe and not always:
                return
            libbpf.synchronize_rcu()
            self._safe = max(self._safe, target)

    def grace_soon(self) -> None:
        """grace() in a background thread: the caller answers now, and the
        buffers it retired become writable for the next change."""
        if self.pending():
            self._bg.kick()

    def _grace_all(self) -> None:
        while self.pending():
            self.grace()

    # --- which buffer is in force -------------------------------------------------------------
    def recover(self, outer_fd: int, in_force: Sequence[int]) -> None:
        """Map every buffer the outer map holds (a restart); ``in_force`` are busy."""
        pinned = {p.name: p for p in self._pins().iterdir()} if self.pin_dir is not None else {}
        for idx in range(self.capacity):
            pin = pinned.pop(str(idx), None)
            if idx in self._maps:
                continue
            map_id = ct.c_uint32()
            if not (libbpf.map_lookup(outer_fd, ct.c_int(idx), map_id) and map_id.value):
                if pin is not None:
                    os.unlink(pin)  # pinned, but never inserted (a crash in between)
                continue
            fd = self._open(idx, map_id.value, pin)
            if fd is None:
                self._foreign.add(idx)
                continue
            try:
                self._map(idx, fd)
            finally:
                os.close(fd)
        for stale in pinned.values():
            os.unlink(stale)
        missing = [i for i in in_force if i not in self._maps]
        if missing:
            log.warning("service entries point at missing Maglev buffers %s: they get new tables", missing)
        self.busy = {i for i in in_force if i in self._maps}

    def _pins(self) -> Path:
        assert self.pin_dir is not None
        self.pin_dir.mkdir(mode=0o700, exist_ok=True)
        return self.pin_dir

    def _open(self, idx: int, map_id: int, pin: Path | None) -> int | None:
        """An fd of the buffer at ``idx``: by its pin, or (buffers of an older
        daemon that did not pin them) by id, then pinned. None if neither works."""
        if pin is not None:
            fd = libbpf.obj_get(str(pin))
            if libbpf.map_info(fd).id == map_id:
                return fd
            os.close(fd)
            os.unlink(pin)  # a pin of a buffer that was replaced in the outer map
        try:
            fd = libbpf.map_fd_by_id(map_id)
        except OSError as e:
            log.warning("Maglev buffer %d is not pinned and cannot be opened by id (%s): it is left alone", idx, e)
            return None
        if self.pin_dir is not None:
            libbpf.obj_pin(fd, str(self._pins() / str(idx)))
        return fd

    def use(self, new: int, old: int | None) -> None:
        """A service entry now points at ``new`` instead of ``old``."""
        self.busy.add(new)
        self._retired.pop(new, None)
        if old is not None and old != new:
            self.release(old)

    def release(self, idx: int) -> None:
        """No service entry points at ``idx`` any more."""
        self.busy.discard(idx)
        self._flips += 1
        self._retired[idx] = self._flips

    def forget_contents(self) -> None:
        """Tables depend on the seed, which the inputs do not include."""
        self._holds.clear()
        self._by_inputs.clear()

    # --- buffers -------------------------------------------------------------------------------
    def reserve(self, outer_fd: int, wanted: Sequence[Hashable]) -> list[tuple[int, bool]]:
        """A buffer for each table (by inputs): (index, whether it must be
        written). One that already holds the table is taken as it is; others
        get writable spares, created in one batch when there are too few; only
        when that is impossible does this wait for a grace period."""
        out: list[tuple[int, bool] | None] = []
        taken: set[int] = set()
        for inputs in wanted:
            idx = self._by_inputs.get(inputs)
            if idx is not None and idx not in self.busy and idx not in taken:
                out.append((idx, False))
                taken.add(idx)
            else:
                out.append(None)
        need = sum(1 for o in out if o is None)
        if need:
            free = self._spares(taken)
            if len(free) < need:
                # With `spares` more: a change takes a writable spare and retires the
                # buffer it replaces, so this many changes within one grace period
                # (~10-15 ms) go through without waiting or creating.
                unused = [i for i in range(self.capacity) if i not in self._maps and i not in self._foreign]
                free += self._create(outer_fd, unused[:need - len(free) + self.spares])
            if len(free) < need:
                t0 = time.perf_counter()
                self.grace()
                self.waited += time.perf_counter() - t0
                free = self._spares(taken)
            if len(free) < need:
                raise DatapathError(f"no Maglev table buffer free ({len(self.busy)} in use of {self.capacity})")
            spare = iter(free)
            out = [o if o is not None else (next(spare), True) for o in out]
        return [o for o in out if o is not None]

    def _spares(self, taken: set[int]) -> list[int]:
        # Buffers holding nothing known first, so remembered tables stay for undos.
        free = [i for i in self._maps if i not in taken and self.writable(i)]
        return sorted(free, key=lambda i: (i in self._holds, i))

    def _create(self, outer_fd: int, idxs: list[int]) -> list[int]:
        """New inner maps at ``idxs``, inserted with one outer batch update."""
        if not idxs:
            return []
        fds: list[int] = []
        try:
            for idx in idxs:
                # Same shape and flags as maps.h's maglev_inner template.
                fds.append(libbpf.array_create(f"maglev_{idx}", 4, self.m, libbpf.BPF_F_MMAPABLE))
                if self.pin_dir is not None:  # pinned before it is reachable: never an unpinned buffer in force
                    path = self._pins() / str(idx)
                    if path.exists():
                        os.unlink(path)
                    libbpf.obj_pin(fds[-1], str(path))
            try:
                libbpf.update_batch(outer_fd, np.array(idxs, dtype=np.uint32), np.array(fds, dtype=np.uint32),
                                    "Maglev buffers batch insert")
            except OSError:
                for idx in idxs[:len(fds)] if self.pin_dir is not None else ():
                    (self._pins() / str(idx)).unlink(missing_ok=True)
                raise
            for idx, fd in zip(idxs, fds):
                self._map(idx, fd)
                self._retired[idx] = 0  # never reachable yet: writable at once
        finally:
            for fd in fds:
                os.close(fd)
        return list(idxs)

    def _map(self, idx: int, fd: int) -> None:
        # The kernel keeps array elements 8 bytes apart; the mapping keeps the map alive.
        size = -(-self.m * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._maps[idx] = (mm, np.frombuffer(mm, dtype="<u4", count=2 * self.m)[::2])

    def write(self, idx: int, ids: np.ndarray, inputs: Hashable) -> None:
        """Fill buffer ``idx`` (reserved, writable) with one table."""
        if not self.writable(idx):
            raise DatapathError(f"Maglev buffer {idx} written while packets may still read it")
        old = self._holds.pop(idx, None)  # a failure half-way must not leave a false claim
        if old is not None and self._by_inputs.get(old) == idx:
            del self._by_inputs[old]
        self._maps[idx][1][:] = ids
        self.adopt(idx, inputs)

    def adopt(self, idx: int, inputs: Hashable) -> None:
        """Record that buffer ``idx`` holds the table of ``inputs``."""
        self._holds[idx] = inputs
        self._by_inputs[inputs] = idx

    def has(self, inputs: Hashable) -> bool:
        """A buffer out of force holds the table of ``inputs`` (reserve() takes it as it is)."""
        idx = self._by_inputs.get(inputs)
        return idx is not None and idx not in self.busy

    def mapped(self, idx: int) -> bool:
        """Buffer ``idx`` exists and is ours to read and write."""
        return idx in self._maps

    def holds(self, idx: int) -> Hashable | None:
        return self._holds.get(idx)

    def read(self, idx: int) -> np.ndarray | None:
        hit = self._maps.get(idx)
        return None if hit is None else hit[1].copy()

    def close(self) -> None:
        for idx in list(self._maps):
            mm, view = self._maps.pop(idx)
            del view
            try:
                mm.close()
            except BufferError:  # a reader still holds a view: the GC closes it later
                pass
