"""The flow table read back: how full it is, and per backend slot how many
flows were seen lately (active) or not (inactive), like ipvsadm's
ActiveConn/InActConn -- estimated, since the table is a cache of flows, not
a connection tracker.

This is the ONE place that knows the flow entry's layout on the user-space
side (bpf_src/lib/maps.h: struct flow_bucket, lib/flowcache.h): it reads the
map with BCC's generated type of the bucket as a numpy dtype, so a new layout
changes `_count` and nothing else.

* An entry is a way whose tag is not 0. It counts for a backend only while its
  generation is the one the backend slot holds now (plus its service's
  source-range gen: the labels come from Slots.flow_labels): a removed or
  replaced backend's entries still take room (``stale``) until overwritten, but
  no longer count for anybody; nor do those made before a change of the
  service's source ranges, until their next packet checks them again.
* Active: its last-used stamp (jiffies of the last packet that hit it, or of
  its insertion) is at most ``window`` seconds old. Embryonic entries (a SYN
  and nothing since) count like any other: a SYN flood shows as active flows.
* Cost (bench/flowscan.py): the map is read in chunks of 8,192 buckets (~3.6 MB,
  one batch syscall each; the GIL is free during the syscall) and each chunk is
  counted with numpy in a few ms. The whole read is dominated by copying the
  buckets out of the kernel (448 bytes per 8 entries). FlowWatch caches a scan
  and never makes callers queue behind one; callers are the API's worker
  threads, never its event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from l4lb.datapath import libbpf
from l4lb.datapath.jiffies import KernelClock
from l4lb.datapath.slots import BackendKey, Labels, ServiceKey

log = logging.getLogger(__name__)

ACTIVE_WINDOW = 10.0      # seconds: the ActiveConn/InActConn line
CACHE_SECONDS = 1.0
CHUNK_BUCKETS = 8192


@dataclass(frozen=True)
class FlowScan:
    capacity: int                       # entries (buckets x ways)
    used: int                           # entries holding a flow
    stale: int                          # of those, made for a backend slot generation no longer in force
    window: float                       # seconds: active = last used at most this long ago
    backends: dict[tuple[ServiceKey, BackendKey], tuple[int, int]] = field(default_factory=dict)  # (active, inactive)
    seconds: float = 0.0                # how long the scan took
    at: float = 0.0                     # time.monotonic() of the scan

    @property
    def active(self) -> int:
        return sum(a for a, _ in self.backends.values())


def _count(rows: np.ndarray, gens: np.ndarray, now: int, window_ticks: int,
           acc: np.ndarray) -> tuple[int, int]:
    """Add one chunk of buckets to ``acc`` ([slot, 0] active, [slot, 1] inactive);
    returns (entries used, entries stale) in the chunk. One bincount over every
    way (no boolean gathers of the strided fields: ~3x faster)."""
    n = len(gens)
    used = rows["tag"] != 0
    ways = rows["way"]
    bid = ways["backend_id"]
    gen = ways["gen"]
    ok = used & (gens[np.minimum(bid, n - 1)] == gen) & (bid < n) & (gen != 0)
    inactive = (np.uint32(now) - rows["used"]) > np.uint32(window_ticks)   # ages mod 2^32, as the datapath's
    idx = np.where(ok, 2 * bid.astype(np.int64) + inactive, 2 * n)
    counts = np.bincount(idx.ravel(), minlength=2 * n + 1)
    acc += counts[:2 * n].reshape(n, 2)
    n_used = int(np.count_nonzero(used))
    return n_used, n_used - int(counts[:2 * n].sum())


def scan(flows: object, labels: Labels, clock: KernelClock, window: float = ACTIVE_WINDOW,
         chunk: int = CHUNK_BUCKETS) -> FlowScan:
    """Read the flow table ``flows`` (a MapHandle of the pinned map) and label its
    counts with ``labels`` (the engine's slot books: service ids, backend slots)."""
    t0 = time.monotonic()
    svc_ids, slots = labels
    n = 1 + max((bid for bid, _ in slots), default=0)
    gens = np.zeros(n, dtype=np.uint32)
    for bid, slot in slots:
        gens[bid] = slot.gen
    acc = np.zeros((n, 2), dtype=np.int64)
    dtype = np.dtype(flows.Leaf)  # type: ignore[attr-defined]
    ways = dtype["tag"].shape[0]
    now, window_ticks = clock.now(), clock.ticks(window)
    used = stale = 0
    for raw in libbpf.array_lookup_chunks(flows.map_fd, flows.max_entries, dtype.itemsize,  # type: ignore[attr-defined]
                                          min(chunk, flows.max_entries)):  # type: ignore[attr-defined]
        u, s = _count(raw.view(dtype).reshape(-1), gens, now, window_ticks, acc)
        used, stale = used + u, stale + s
    rev = {sid: key for key, sid in svc_ids}
    counts = acc.tolist()
    backends = {(rev[slot.svc_id], slot.ident): (counts[bid][0], counts[bid][1])
                for bid, slot in slots if slot.svc_id in rev}
    return FlowScan(capacity=flows.max_entries * ways, used=used, stale=stale,  # type: ignore[attr-defined]
                    window=window, backends=backends, seconds=time.monotonic() - t0, at=time.monotonic())


class FlowWatch:
    """Scans of one datapath's flow table, cached. ``source`` returns the flow map
    and the labels in force (Datapath.flow_source); a program replaced under a
    scan (its fds closed) is read again once.

    A scan is reused for ``ttl`` seconds, or ten times as long as it took (a
    2^26-entry table takes seconds: scans then take at most a tenth of a core).
    While one thread scans, the others get the previous scan at once rather than
    wait for it; only the very first callers wait."""

    def __init__(self, source: Callable[[], tuple[object, Labels]], *, ttl: float = CACHE_SECONDS,
                 window: float = ACTIVE_WINDOW, clock: KernelClock | None = None) -> None:
        self._source = source
        self.ttl, self.window = ttl, window
        self._clock = clock or KernelClock()
        self._lock = threading.Lock()
        self._last: FlowScan | None = None
        self._failed_at = -1e9
        self._error: str | None = None

    def _fresh(self) -> FlowScan | None:
        last = self._last
        if last is not None and time.monotonic() - last.at < max(self.ttl, 10 * last.seconds):
            return last
        return None

    def get(self) -> FlowScan | None:
        """The latest scan; None if the table cannot be read (logged once per
        distinct error, tried again a ttl later): stats and metrics go on without it."""
        if (res := self._fresh()) is not None:
            return res
        last = self._last
        if not self._lock.acquire(blocking=last is None):
            assert last is not None
            return last                 # another thread is scanning: no waiting behind it
        try:
            if (res := self._fresh()) is not None:
                return res
            if time.monotonic() - self._failed_at < self.ttl:
                return None
            try:
                try:
                    res = scan(*self._source(), self._clock, self.window)
                except OSError:         # the program replaced under the scan: its fds closed
                    res = scan(*self._source(), self._clock, self.window)
            except Exception as e:  # noqa: BLE001 - counters must not fail with the flow table
                self._failed_at = time.monotonic()
                if str(e) != self._error:
                    log.warning("flow table not readable: %s: %s (active flows and fill not shown)",
                                type(e).__name__, e)
                    self._error = str(e)
                return None
            self._last, self._error = res, None
            return res
        finally:
            self._lock.release()

    def close(self) -> None:
        self._clock.close()


__all__ = ["ACTIVE_WINDOW", "FlowScan", "FlowWatch", "scan"]
