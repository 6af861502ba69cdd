"""The flow table read back: how full it is, and per backend slot how many
flows were seen lately (active) or not (inactive), like ipvsadm's
ActiveConn/InActConn -- estimated, since the table is a cache of flows, not
a connection tracker.

This is the ONE place that knows the flow entry's layout on the user-space
side (bpf_src/lib/maps.h: struct flow_bucket, lib/flowcache.h): it reads the
map with BCC's generated type of the bucket as a numpy dtype, so a new layout
changes `_count` and nothing else.

* An entry is a way whose tag is not 0. It counts for a backend only while its
  generation is the one the backend slot holds now: a removed or replaced
  backend's entries still take room (``stale``) until overwritten, but no
  longer count for anybody.
* Active: its last-used stamp (jiffies of the last packet that hit it, or of
  its insertion) is at most ``window`` seconds old. Embryonic entries (a SYN
  and nothing since) count like any other: a SYN flood shows as active flows.
* Cost: the map is read in chunks of 8,192 buckets (~3.6 MB, one batch syscall
  each) and counted with numpy: ~1 ms per 65,536 entries here, ~50 ms for the
  default 2^20. FlowWatch caches a scan for a second and lets one caller scan
  while the others wait for its result, so scrapes, status and stats never
  queue up scans; callers are worker threads, never the API's event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from l4lb.datapath import libbpf
from l4lb.datapath.jiffies import KernelClock
from l4lb.datapath.slots import BackendKey, Labels, ServiceKey

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
    returns (entries used, entries stale) in the chunk."""
    used = rows["tag"] != 0
    ways = rows["way"]
    bid = ways["backend_id"][used]
    gen = ways["gen"][used]
    age = (np.uint32(now) - rows["used"][used]).astype(np.uint32)   # mod 2^32, as the datapath compares
    ok = bid < len(gens)
    ok[ok] &= gens[bid[ok]] == gen[ok]
    ok &= gen != 0
    active = age <= window_ticks
    n = len(gens)
    acc[:, 0] += np.bincount(bid[ok & active], minlength=n)[:n]
    acc[:, 1] += np.bincount(bid[ok & ~active], minlength=n)[:n]
    return int(used.sum()), int((~ok).sum())


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
    """Scans of one datapath's flow table, cached for ``ttl`` seconds. ``source``
    returns the flow map and the labels in force (Datapath.flow_source); a
    program replaced under a scan (its fds closed) is read again once."""

    def __init__(self, source: Callable[[], tuple[object, Labels]], *, ttl: float = CACHE_SECONDS,
                 window: float = ACTIVE_WINDOW, clock: KernelClock | None = None) -> None:
        self._source = source
        self.ttl, self.window = ttl, window
        self._clock = clock or KernelClock()
        self._lock = threading.Lock()
        self._last: FlowScan | None = None

    def get(self) -> FlowScan:
        with self._lock:  # one scan at a time; who waited gets its result
            last = self._last
            if last is not None and time.monotonic() - last.at < self.ttl:
                return last
            try:
                res = scan(*self._source(), self._clock, self.window)
            except OSError:
                res = scan(*self._source(), self._clock, self.window)
            self._last = res
            return res

    def close(self) -> None:
        self._clock.close()


__all__ = ["ACTIVE_WINDOW", "FlowScan", "FlowWatch", "scan"]
