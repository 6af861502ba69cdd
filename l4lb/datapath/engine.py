"""Datapath: compile, reconcile desired services into the maps, attach.

Reconcile order keeps packets in flight safe: backend entries are written
before any Maglev table refers to them; a service's new table is complete in
its spare buffer before the service entry points at it (rings.py); removed
backends are cleared only after no table points to them any more and an RCU
grace period has passed since the last table did. IDs are
recovered from the pinned maps on start, so a restarted daemon keeps the
flow table's (backend id, generation) pairs valid and connections survive.

Near capacity (old and new sets together do not fit) removed services and
backends are cleared first, and a freed id or slot is reused only after an
RCU grace period, so no packet in flight still reads it (see _reconcile).
Services that did not change are skipped cheaply, and map writes go in
batches: a drain touches one service, a 100,000-backend document takes a
handful of syscalls per map.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from pyroute2 import IPRoute

from l4lb import maglev
from l4lb.datapath import netlink, nexthop
from l4lb.datapath.config import DatapathConfig, DatapathError
from l4lb.datapath.libbpf import prog_fd_by_id, prog_info
from l4lb.datapath.loader import FUNC, Program, compile_program, pin_program, remove_stale_pins
from l4lb.datapath.nexthop import IPAddress, NextHop
from l4lb.datapath.rings import Rings
from l4lb.datapath.tables import Tables, words_addr
from l4lb.models import BackendState, Service

log = logging.getLogger(__name__)

SVC_F_DNAT = 1
SVC_F_NO_SPORT = 2
BE_F_DOWN = 1
CFG_F_SRC_PREFIX4 = 1
CFG_F_SRC_PREFIX6 = 2
PROTO = {"tcp": 6, "udp": 17}
PROTO_NAME = {6: "tcp", 17: "udp"}
SWAP_CHUNK = 256  # services whose tables are written before their entries are
SETTLE_CHUNK = 8  # addresses per pyroute2 round in settle(), between pauses
NEXTHOP_SLICE = 4096  # next-hop entries written per hold of the lock
BUILT_CACHE = 32  # recently built Maglev tables kept (64 KiB each at M = 16381)

ServiceKey = tuple[str, int, str]          # (vip exploded, port, "tcp"/"udp")
BackendKey = tuple[str, int]               # (address exploded, port)


class DatapathStats:
    """Counters summed over CPUs, labelled by service key and backend identity.
    Read as arrays; the per-backend dicts are built only when asked for, so a
    periodic sample of 100,000 backends costs a few batch reads, not 0.5 s of
    Python that would compete with requests for the GIL."""

    def __init__(self, timestamp: float, svc: np.ndarray, be: np.ndarray, why: np.ndarray,
                 labels: tuple[list[tuple[ServiceKey, int]], list[tuple[int, _BackendSlot]]],
                 reasons: list[str]) -> None:
        self.timestamp = timestamp
        self._arrays = (svc, be, why)
        self._labels = labels
        self._reason_names = reasons
        self._built: tuple[dict, dict, dict] | None = None

    def _build(self) -> tuple[dict, dict, dict]:
        if self._built is None:
            svc, be, why = (a.tolist() for a in self._arrays)  # plain ints
            svc_ids, slots = self._labels
            services = {key: {"packets": svc[sid][0], "bytes": svc[sid][1]} for key, sid in svc_ids}
            rev = {sid: key for key, sid in svc_ids}
            backends = {(rev[slot.svc_id], slot.ident): {"packets": be[bid][0], "bytes": be[bid][1]}
                        for bid, slot in slots if slot.svc_id in rev}
            reasons = {name: {"packets": why[i][0], "bytes": why[i][1]} for i, name in enumerate(self._reason_names)}
            self._built = (services, backends, reasons)
        return self._built

    @property
    def services(self) -> dict[ServiceKey, dict[str, int]]:
        return self._build()[0]

    @property
    def backends(self) -> dict[tuple[ServiceKey, BackendKey], dict[str, int]]:
        return self._build()[1]

    @property
    def reasons(self) -> dict[str, dict[str, int]]:
        return self._build()[2]


@dataclass
class _BackendSlot:
    svc_id: int
    ident: BackendKey
    gen: int
    flags: int


@dataclass
class ApplyTimings:
    """Where the last apply() spent its time (seconds), for logs and benches."""

    reconcile: float = 0.0   # everything under the lock, the parts below included
    maglev: float = 0.0      # building tables (waiting for worker processes included)
    maps: float = 0.0        # map writes: backends, tables, service entries, clears
    grace: float = 0.0       # waiting for packets in flight before reusing freed slots
    neighbours: float = 0.0
    nexthops: float = 0.0
    total: float = 0.0
    tables: int = 0          # Maglev tables built
    writes: int = 0          # map elements written

    def summary(self) -> str:
        parts = [f"{k}={getattr(self, k):.3f}s" for k in ("reconcile", "maglev", "maps", "grace", "neighbours",
                                                           "nexthops") if getattr(self, k)]
        return " ".join([*parts, f"tables={self.tables}", f"writes={self.writes}"])


@dataclass
class _Work:
    """One reconcile's to-do list."""

    want: dict[ServiceKey, Service]
    waiting: list[ServiceKey]           # services not finished yet, sorted
    gone: list[ServiceKey]
    freeing_sids: set[int]              # ids of removed services (usable once their slots are clear)
    removing: dict[int, None] = field(default_factory=dict)  # slots to clear (an ordered set)
    weights: dict[ServiceKey, dict[BackendKey, int]] = field(default_factory=dict)  # of the waiting services
    allocated: bool = False


def hash_seed(seed: bytes) -> int:
    """32-bit flow-hash seed derived from the Maglev seed: same config, same
    hashing on every box."""
    return int.from_bytes(hashlib.blake2b(seed, digest_size=4, person=b"l4lb-flow").digest(), "little")


class Datapath:
    def __init__(self, cfg: DatapathConfig) -> None:
        self.cfg = cfg
        self.prog: Program | None = None
        self.t: Tables | None = None
        self._lock = threading.RLock()
        self._svc_ids: dict[ServiceKey, int] = {}
        # What each service entry in the map holds: (flags, ring), and the
        # buffer each service id's table is in force in (the entry's ring).
        self._svc_entry: dict[ServiceKey, tuple[int, int]] = {}
        self._keys: dict[int, ServiceKey] = {}
        self._clean: set[int] = set()  # ids of the services of the last successful apply
        self._weights: dict[int, tuple[Service, dict[BackendKey, int]]] = {}  # from prefetch(), by object
        self._prefetched: tuple[bytes, threading.Thread, dict[tuple[Any, ...], maglev.MaglevTable]] | None = None
        self._labels: tuple[list[tuple[ServiceKey, int]], list[tuple[int, _BackendSlot]]] | None = None
        self._keys_held: list[Service] = []
        self._ring: dict[int, int] = {}
        self._rings = Rings(cfg.maglev_m, 2 * cfg.max_services)  # maps.h: maglev_outer
        self._backends: dict[int, _BackendSlot] = {}
        # svc id -> the inputs of the table written (weights, backend ids): an
        # apply rebuilds only the tables whose inputs changed.
        self._tables: dict[int, tuple[Any, ...]] = {}
        self._next_gen = 1
        self._applied: list[Service] = []
        # Slots freed by the last changes: re-adding the same service/backend
        # (an undo, a rollback) gets the same id and generation back, so flow
        # entries pinned to it stay valid and the maps end up byte-identical.
        self._freed_svc: dict[ServiceKey, int] = {}
        self._freed_be: dict[tuple[ServiceKey, BackendKey], tuple[int, int]] = {}
        # _backends by owner (svc id -> identity -> slot), and the services
        # finished with exactly this content: a reconcile skips them cheaply.
        self._by_svc: dict[int, dict[BackendKey, int]] = {}
        self._done: dict[ServiceKey, Service] = {}
        self._built: OrderedDict[tuple[bytes, tuple[Any, ...]], maglev.MaglevTable] = OrderedDict()
        self._known_addrs: set[IPAddress] = set()   # neighbour entries ensured
        self._new_addrs: set[IPAddress] = set()
        self._unsettled: set[IPAddress] = set()      # backends' addresses settle() has not seen
        self._timing = ApplyTimings()
        self.last_timings = ApplyTimings()          # of the last successful apply()
        self._attached: dict[str, str] = {}
        # Next hops: address -> what the kernel resolved, and what each backend
        # slot's `nexthops` entry holds (None = no entry: the program uses the FIB).
        self._nh_cache: dict[IPAddress, NextHop | None] = {}
        self._nh_written: dict[int, tuple[NextHop, int] | None] = {}
        self._nh_dirty: set[int] = set()  # slots changed since the last refresh (see _set_slot)
        self._by_addr: dict[str, set[int]] = {}  # backend address (exploded) -> its slots
        self.fail_after_writes: int | None = None  # test hook: fail mid-reconcile

    # --- load -----------------------------------------------------------------
    def load(self) -> None:
        with self._lock:
            self.prog = compile_program(self.cfg)
            self.t = Tables(self.prog.bpf)
            self._write_config()
            self._recover()

    def update_runtime(self, cfg: DatapathConfig) -> None:
        """Apply run-time knobs (outer source prefixes, ICMP rate, seed) without
        recompiling; layout changes need a new load()."""
        from l4lb.datapath.loader import layout_cflags

        if layout_cflags(cfg) != layout_cflags(self.cfg):
            raise DatapathError("map layout changed (M, limits): a restart with a new program is needed")
        with self._lock:
            seed_changed = cfg.maglev_seed != self.cfg.maglev_seed
            self.cfg = cfg
            self._write_config()
            if seed_changed:
                self._tables.clear()
                self._clean = set()
                self._rings.forget_contents()
                self._reconcile(list(self._applied))

    @property
    def prog_fd(self) -> int:
        assert self.prog is not None, "load() first"
        return self.prog.fd

    @property
    def tables(self) -> Tables:
        assert self.t is not None, "load() first"
        return self.t

    def _write_config(self) -> None:
        t = self.tables
        c = t.config.Leaf()
        c.hash_seed = hash_seed(self.cfg.maglev_seed)
        c.icmp_rate = self.cfg.icmp_rate
        c.icmp_burst = max(1, self.cfg.icmp_rate // 10)
        flags = 0
        if self.cfg.outer_src_v4 is not None:
            net = self.cfg.outer_src_v4
            c.src4_prefix = int.from_bytes(net.network_address.packed, "little")
            c.src4_hostmask = int.from_bytes(net.hostmask.packed, "little")
            flags |= CFG_F_SRC_PREFIX4
        if self.cfg.outer_src_v6 is not None:
            net6 = self.cfg.outer_src_v6
            pre, host = net6.network_address.packed, net6.hostmask.packed
            for i in range(4):
                c.src6_prefix[i] = int.from_bytes(pre[4 * i:4 * i + 4], "little")
                c.src6_hostmask[i] = int.from_bytes(host[4 * i:4 * i + 4], "little")
            flags |= CFG_F_SRC_PREFIX6
        c.flags = flags
        t.config[t.config.Key(0)] = c

    def _recover(self) -> None:
        """Rebuild id allocation from pinned maps (a restart keeps flows valid)."""
        t = self.tables
        self._svc_ids.clear()
        self._labels = None
        self._svc_entry.clear()
        self._ring.clear()
        for (vip, port, proto), (sid, flags, ring) in t.read_services().items():
            key = (vip, port, PROTO_NAME.get(proto, str(proto)))
            self._svc_ids[key] = sid
            self._svc_entry[key] = (flags, ring)
            self._ring[sid] = ring
        self._rings.recover(t.maglev_outer.map_fd, list(self._ring.values()))
        self._backends.clear()
        for bid, v in t.read_backends().items():
            addr = words_addr(v.addr, v.family)
            self._backends[bid] = _BackendSlot(v.svc_id, (addr.exploded, _ntohs(v.port)), v.gen, v.flags)
            self._next_gen = max(self._next_gen, v.gen + 1)
        self._reindex()
        self._tables.clear()
        self._done.clear()
        self._clean = set()
        if self._svc_ids:
            log.info("recovered %d services and %d backends from pinned maps",
                     len(self._svc_ids), len(self._backends))

    # --- reconcile --------------------------------------------------------------
    def apply(self, services: Sequence[Service], *, settle: bool = True) -> None:
        """Make the maps hold exactly `services`. All or nothing: on failure
        the previous set is written back before the error is raised.
        ``settle=False`` leaves the neighbour entries and next-hop cache of new
        backends to a later settle() (see there)."""
        t0 = time.perf_counter()
        with self._lock:
            previous = list(self._applied)
            self._timing = timing = ApplyTimings()
            self._new_addrs = set()
            try:
                self._check_capacity(services)
                self._reconcile(list(services))
            except Exception as e:
                self.fail_after_writes = None
                try:
                    self._reconcile(previous)
                except Exception:  # pragma: no cover - logged, the original error matters
                    log.exception("rollback to the previous service set failed")
                if isinstance(e, DatapathError):
                    raise
                raise DatapathError(f"datapath update failed: {e}") from e
            self._applied = list(services)  # also keeps the objects, so their ids stay theirs
            self._clean = {id(s) for s in self._applied}
            self._unsettled |= self._new_addrs
            self._new_addrs = set()
        self._rings.grace_soon()  # so the buffers retired now are writable by the next change
        timing.total = time.perf_counter() - t0
        self.last_timings = timing
        if settle:
            self.settle()

    def settle(self, pause: Callable[[], None] | None = None) -> None:
        """Neighbour entries and next-hop cache entries for what applies added.
        Packets do not depend on it: until it has run they take the FIB path
        (bpf_fib_lookup), and an unresolved neighbour goes through the kernel,
        which resolves it. So the daemon runs it right after answering, and a
        100,000-backend PUT does not wait for it (~0.5 s). The work is pyroute2
        Python that would slow requests down through the GIL, so it goes in
        small chunks and ``pause()`` runs between them (the daemon's waits
        while a write is in progress)."""
        with self._lock:
            addrs, self._unsettled = self._unsettled - self._known_addrs, set()
            timing = self.last_timings
            if not addrs and not self._nh_dirty:
                return  # a drain: nothing new to resolve
        t1 = time.perf_counter()
        todo = sorted(addrs, key=lambda a: (a.version, a.packed))
        for i in range(0, len(todo), SETTLE_CHUNK):
            if pause is not None:
                pause()
            self._neighbours(set(todo[i:i + SETTLE_CHUNK]))
        t2 = time.perf_counter()
        self.refresh_nexthops(full=False, pause=pause)
        t3 = time.perf_counter()
        timing.neighbours, timing.nexthops = t2 - t1, t3 - t2
        timing.total += t3 - t1

    def _check_capacity(self, services: Sequence[Service]) -> None:
        if len(services) > self.cfg.max_services:
            raise DatapathError(f"{len(services)} services exceed the datapath limit of {self.cfg.max_services}")
        n = sum(len(s.backends) for s in services)
        if n > self.cfg.max_backends - 1:
            raise DatapathError(f"{n} backends exceed the datapath limit of {self.cfg.max_backends - 1}")

    def _ticks(self, n: int) -> int:
        """How many of the next ``n`` writes the test hook lets through (all without a hook)."""
        if self.fail_after_writes is None:
            return n
        ok = max(0, min(n, self.fail_after_writes))
        self.fail_after_writes -= ok
        return ok

    def _tick(self) -> None:
        if not self._ticks(1):
            raise DatapathError("injected failure (test hook)")

    def _reconcile(self, services: list[Service]) -> None:
        """Write ``services`` into the maps in a packet-safe order (module docstring).

        Services whose content is what they were last finished with are
        skipped, so a drain touches one service. New ids and slots come from
        free ones while there are any. Near capacity (the old and the new set
        together do not fit) a second pass reuses what removed services and
        backends freed, and a third first swaps the still-waiting services to
        interim tables of their backends that already have slots, which frees
        their removed ones. A slot is reused only once no table points at it
        and packets in flight have finished (an RCU grace period)."""
        t0 = time.perf_counter()
        # Keys of the services of the last reconcile by object: a drain passes the
        # same 1,000 objects but one again, and formatting their VIPs was most of its cost.
        keys = self._keys
        want = {keys.get(id(s)) or s.key: s for s in services}
        self._keys = {id(s): k for k, s in want.items()}
        self._keys_held = services  # keeps the objects alive, so their ids stay theirs
        # Services of the last successful apply, as objects, are unchanged; others
        # are checked. Sorted after filtering: a drain sorts one key, not 1,000.
        clean, self._clean = self._clean, set()
        todo = sorted(k for k, s in want.items() if id(s) not in clean and not self._unchanged(k, s))
        gone = sorted(k for k in self._svc_ids if k not in want)
        for key in (*todo, *gone):
            self._done.pop(key, None)
        live = set(self._svc_ids.values())
        orphans = set(self._by_svc) - live  # backends whose service never made it (a crash mid-apply)
        w = _Work(want, list(todo), gone, {self._svc_ids[k] for k in gone} | orphans)
        for key in todo:
            # Identity -> Maglev weight, in backend order: each backend's identity is computed once.
            hit = self._weights.get(id(want[key]))
            w.weights[key] = keep = hit[1] if hit is not None and hit[0] is want[key] else want[key].maglev_weights()
            sid = self._svc_ids.get(key)
            if sid is not None:
                w.removing.update((bid, None) for ident, bid in self._by_svc.get(sid, {}).items() if ident not in keep)
        for sid in w.freeing_sids:
            w.removing.update((bid, None) for bid in self._by_svc.get(sid, {}).values())
        for stage in range(3):
            self._allocate(w, final=stage == 2)
            self._finish(w)
            if stage == 0:
                self._remove_services(w, orphans)
            self._clear_unreferenced(w)
            if not w.waiting:
                break
            if stage == 2:
                raise DatapathError(f"no free slot for {', '.join(map(str, w.waiting))} (datapath maps full)")
            if stage == 1:
                self._interim_tables(w)
                self._clear_unreferenced(w)
            g0 = time.perf_counter()
            self._rings.grace(always=True)
            self._timing.grace += time.perf_counter() - g0
        if w.allocated:
            # Forget freed slots that have been handed to someone else since.
            self._freed_be = {k: v for k, v in self._freed_be.items() if v[0] not in self._backends}
            in_use = set(self._svc_ids.values())
            self._freed_svc = {k: v for k, v in self._freed_svc.items() if v not in in_use}
        self._weights = {}
        for key in todo:
            self._done[key] = want[key]
            svc = want[key]
            self._new_addrs.update(b.address for b in svc.backends if b.state is not BackendState.maintenance)
        self._timing.reconcile += time.perf_counter() - t0

    def _unchanged(self, key: ServiceKey, svc: Service) -> bool:
        prev = self._done.get(key)
        if prev is None or (prev is not svc and prev != svc):
            return False
        sid = self._svc_ids.get(key)
        # Also in the maps as finished: its table (not cleared by a seed change or
        # a restart) and exactly its backends (nothing left over from a failure).
        return sid is not None and sid in self._tables and len(self._by_svc.get(sid, ())) == len(svc.backends)

    def _allocate(self, w: _Work, final: bool) -> None:
        """Ids for the waiting services and slots for their backends, then one
        batch write of those entries (and of changed flags). Before the last
        pass, a service or backend that remembers a slot still being freed
        waits for it, so an undo gets its old id and generation back."""
        t = self.tables
        used_sids = set(self._svc_ids.values()) | set(self._by_svc)
        fresh_sid = (i for i in range(self.cfg.max_services) if i not in used_sids)
        fresh_bid = (i for i in range(1, self.cfg.max_backends) if i not in self._backends)
        writes: list[tuple[int, _BackendSlot, IPAddress]] = []
        zero: list[int] = []
        for key in w.waiting:
            svc = w.want[key]
            sid = self._svc_ids.get(key)
            if sid is None:
                sid = self._freed_svc.get(key)
                if sid is None or sid in used_sids:
                    if sid is not None and sid in w.freeing_sids and not final:
                        continue
                    sid = next(fresh_sid, None)
                    if sid is None:
                        continue
                self._freed_svc.pop(key, None)
                used_sids.add(sid)
                self._svc_ids[key] = sid  # before any write: a failure leaves it to be removed
                self._labels = None
                t.percpu_zero(t.svc_stats, sid)
                w.allocated = True
            have = self._by_svc.get(sid, {})
            for b, ident in zip(svc.backends, w.weights[key]):
                flags = BE_F_DOWN if b.state is BackendState.maintenance else 0
                bid = have.get(ident)
                if bid is not None:
                    if self._backends[bid].flags != flags:
                        writes.append((bid, self._set_slot(bid, sid, ident, self._backends[bid].gen, flags), b.address))
                    continue
                old_bid, gen = self._freed_be.get((key, ident), (None, 0))
                if old_bid is not None and old_bid not in self._backends:
                    bid = old_bid
                    del self._freed_be[(key, ident)]
                elif old_bid is not None and old_bid in w.removing and not final:
                    continue
                else:
                    bid = next(fresh_bid, None)
                    if bid is None:
                        continue
                    gen = self._next_gen
                    self._next_gen += 1
                    zero.append(bid)
                # Taken in our books before the write: after a failure the rollback clears it.
                writes.append((bid, self._set_slot(bid, sid, ident, gen, flags), b.address))
                w.allocated = True
        m0 = time.perf_counter()
        if zero:
            t.percpu_zero_many(t.backend_stats, zero)
        ok = self._ticks(len(writes))
        done = writes[:ok]
        t.write_backends([b for b, _, _ in done], [a for _, _, a in done], [s.ident[1] for _, s, _ in done],
                         [s.svc_id for _, s, _ in done], [s.gen for _, s, _ in done], [s.flags for _, s, _ in done])
        self._timing.writes += len(done)
        self._timing.maps += time.perf_counter() - m0
        if ok < len(writes):
            raise DatapathError("injected failure (test hook)")

    def _finish(self, w: _Work) -> None:
        """Tables, then service entries, of every waiting service whose backends all have slots."""
        ready: list[tuple[ServiceKey, int, tuple[Any, ...]]] = []
        for key in w.waiting:
            sid = self._svc_ids.get(key)
            if sid is None:
                continue
            have = self._by_svc.get(sid, {})
            if all(ident in have for ident in w.weights[key]):
                ready.append((key, sid, self._table_inputs(w.weights[key], have)))
        if not ready:
            return
        rebuild = [(sid, inputs) for _, sid, inputs in ready if self._tables.get(sid) != inputs]
        tables = self._tables_for([inputs[0] for _, inputs in rebuild])
        try:
            # In chunks: one outer batch swap each (few fds open), entries right after their tables.
            for i in range(0, len(ready), SWAP_CHUNK):
                chunk = ready[i:i + SWAP_CHUNK]
                self._swap_tables([(sid, inputs) for _, sid, inputs in chunk if self._tables.get(sid) != inputs],
                                  tables)
                for key, sid, _ in chunk:
                    self._write_entry(key, sid, self._flags(w.want[key]))
        finally:
            tables.close()  # also when a write failed: frees the workers for the rollback
        done = {key for key, _, _ in ready}
        w.waiting = [k for k in w.waiting if k not in done]

    def _write_entry(self, key: ServiceKey, sid: int, flags: int) -> None:
        """The service entry with ``flags`` and the ring in force for ``sid``;
        a ring that goes out of force is retired (rings.py)."""
        ring = self._ring[sid]
        old = self._svc_entry.get(key)
        if old == (flags, ring):
            return
        self._tick()
        m0 = time.perf_counter()
        t = self.tables
        vip, port, proto = key
        k = t.svc_key(_ip(vip), port, PROTO[proto])
        v = t.services.Leaf()
        v.id, v.flags, v.ring = sid, flags, ring
        t.services[k] = v
        self._svc_entry[key] = (flags, ring)
        self._rings.use(ring, None if old is None else old[1])
        self._timing.writes += 1
        self._timing.maps += time.perf_counter() - m0

    @staticmethod
    def _flags(svc: Service) -> int:
        return (SVC_F_DNAT if svc.options.l4_dnat else 0) | (0 if svc.options.hash_src_port else SVC_F_NO_SPORT)

    def prefetch(self, services: Sequence[Service]) -> None:
        """Start building the Maglev tables that applying ``services`` will need,
        in the worker processes and a background thread, so that they build while
        the caller diffs and stages the change (a 1,000-service PUT). The next
        apply takes them; tables are a pure function of (weights, M, seed), so a
        prefetch that turns out useless costs only CPU. Small changes skip it."""
        with self._lock:
            seed, m = self.cfg.maglev_seed, self.cfg.maglev_m
            done, keys = dict(self._done), self._keys
        todo = []
        self._weights = {}
        for s in services:
            if done.get(keys.get(id(s)) or s.key) is s:
                continue
            weights = s.maglev_weights()
            self._weights[id(s)] = (s, weights)  # the apply needs them too (a 1,000-service PUT: ~0.15 s)
            w = tuple(sorted(weights.items()))  # = _table_inputs(...)[0]
            if (seed, w) not in self._built:
                todo.append(w)
        todo = list(dict.fromkeys(todo))
        if len(todo) < maglev.PARALLEL_MIN:
            return
        results: dict[tuple[Any, ...], maglev.MaglevTable] = {}

        def build() -> None:
            try:
                for w, table in zip(todo, maglev.build_many([dict(w) for w in todo], m, seed)):
                    results[w] = table
            except Exception as e:  # noqa: BLE001 - the apply builds what is missing
                log.warning("Maglev prefetch failed: %s", e)

        thread = threading.Thread(target=build, name="l4lb-maglev-prefetch", daemon=True)
        thread.start()
        self._prefetched = (seed, thread, results)

    def _tables_for(self, weights: list[tuple[Any, ...]]) -> Generator[maglev.MaglevTable, None, None]:
        """The Maglev table for each weights tuple, in order: prefetched ones,
        recently built ones from a small cache (a drain's undo, a rollback,
        services with the same backends), the others built (by worker processes
        when there are many)."""
        seed = self.cfg.maglev_seed
        have = {k: self._built[(seed, k)] for k in weights if (seed, k) in self._built}
        if self._prefetched is not None:
            pseed, thread, results = self._prefetched
            self._prefetched = None
            thread.join()
            if pseed == seed:
                have.update((k, results[k]) for k in weights if k in results)
        missing = list(dict.fromkeys(k for k in weights if k not in have))
        fresh = maglev.build_many([dict(k) for k in missing], self.cfg.maglev_m, seed)
        try:
            for k in weights:
                if k not in have:
                    have[k] = next(fresh)
                    self._built[(seed, k)] = have[k]
                    while len(self._built) > BUILT_CACHE:
                        self._built.popitem(last=False)
                elif (seed, k) in self._built:
                    self._built.move_to_end((seed, k))
                yield have[k]
        finally:
            fresh.close()

    @staticmethod
    def _table_inputs(weights: dict[BackendKey, int], slots: dict[BackendKey, int]) -> tuple[Any, ...]:
        """What a table is a function of: (identity, weight) pairs and their slots."""
        items = tuple(sorted(weights.items()))
        return items, tuple(slots[ident] for ident, _ in items)

    def _swap_tables(self, todo: list[tuple[int, tuple[Any, ...]]], tables: Iterator[maglev.MaglevTable]) -> None:
        """Take the next built table for each (svc id, inputs), write it into a
        spare buffer and point services that have an entry at it (new services
        get theirs from _finish). A spare that already holds the table (an undo)
        is only pointed at (rings.py)."""
        if not todo:
            return
        t = self.tables
        m0 = time.perf_counter()
        g0 = self._rings.waited
        places = self._rings.reserve(t.maglev_outer.map_fd, [inputs for _, inputs in todo])
        self._timing.grace += self._rings.waited - g0
        self._timing.maps += time.perf_counter() - m0 - (self._rings.waited - g0)
        ok = self._ticks(len(todo))
        names = {sid: key for key, sid in self._svc_ids.items()}
        for n, ((sid, inputs), (idx, must_write)) in enumerate(zip(todo, places)):
            b0 = time.perf_counter()
            table = next(tables).table
            m0 = time.perf_counter()
            self._timing.maglev += m0 - b0
            if n >= ok:
                raise DatapathError("injected failure (test hook)")
            cur = self._ring.get(sid)
            # -1 (no backend) indexes the trailing 0: "none" in the datapath.
            ids = np.array([*inputs[1], 0], dtype=np.uint32)[table]
            if cur is not None and self._rings.holds(cur) is None and np.array_equal(self._rings.read(cur), ids):
                # After a restart the table in force is unknown: it is this one already, keep it.
                self._rings.adopt(cur, inputs)
                idx = cur
            elif must_write:
                self._rings.write(idx, ids, inputs)
                self._timing.tables += 1
            self._ring[sid] = idx
            self._tables[sid] = inputs
            key = names.get(sid)
            if key is not None and key in self._svc_entry:
                self._write_entry(key, sid, self._svc_entry[key][0])
            self._timing.writes += 1
            self._timing.maps += time.perf_counter() - m0

    def _remove_services(self, w: _Work, orphans: set[int]) -> None:
        """Services that go away: entry first, then their table (their slots are cleared after)."""
        t = self.tables
        m0 = time.perf_counter()
        for key in w.gone:
            sid = self._svc_ids[key]
            vip, port, proto = key
            self._tick()
            try:
                del t.services[t.svc_key(ipaddress.ip_address(vip), port, PROTO[proto])]
            except KeyError:
                pass
            # Its buffers stay in maglev_outer for the next service with this id
            # (deleting them would cost a grace period each); no entry points at them.
            del self._svc_ids[key]
            self._labels = None
            self._freed_svc[key] = sid
            entry = self._svc_entry.pop(key, None)
            if entry is not None:
                self._rings.release(entry[1])
            self._ring.pop(sid, None)
            self._tables.pop(sid, None)
        for sid in orphans:
            self._ring.pop(sid, None)
            self._tables.pop(sid, None)
        self._timing.maps += time.perf_counter() - m0

    def _clear_unreferenced(self, w: _Work) -> None:
        """Clear the removed slots that no table points at any more, in one batch."""
        live = {sid: key for key, sid in self._svc_ids.items()}
        refs: dict[int, set[int] | None] = {}

        def referenced(bid: int) -> bool:
            sid = self._backends[bid].svc_id
            if sid not in live:
                return False  # its service's entry and table are gone
            if sid not in refs:
                inputs = self._tables.get(sid)
                refs[sid] = None if inputs is None else set(inputs[1])  # None: table unknown (restart)
            r = refs[sid]
            return r is None or bid in r

        free = [bid for bid in w.removing if not referenced(bid)]
        if not free:
            return
        if self._rings.pending():
            # A buffer or service entry that pointed at these slots may still be
            # read by a packet in flight.
            g0 = time.perf_counter()
            self._rings.grace()
            self._timing.grace += time.perf_counter() - g0
        names = {sid: key for key, sid in self._freed_svc.items()} | live
        ok = self._ticks(len(free))
        m0 = time.perf_counter()
        self.tables.clear_backends(free[:ok])
        for bid in free[:ok]:
            slot = self._drop_slot(bid)
            del w.removing[bid]
            if slot.svc_id in names:
                self._freed_be[(names[slot.svc_id], slot.ident)] = (bid, slot.gen)
        self._timing.writes += ok
        self._timing.maps += time.perf_counter() - m0
        if ok < len(free):
            raise DatapathError("injected failure (test hook)")

    def _interim_tables(self, w: _Work) -> None:
        """Waiting services that still point at removed slots get a table of
        their wanted backends that have slots already, so those slots free up."""
        for key in w.waiting:
            sid = self._svc_ids.get(key)
            have = self._by_svc.get(sid, {}) if sid is not None else {}
            if sid is None or not any(bid in w.removing for bid in have.values()):
                continue
            weights = {i: wt for i, wt in w.weights[key].items() if i in have}
            inputs = self._table_inputs(weights, have)
            if self._tables.get(sid) != inputs:
                log.info("maps nearly full: service %s runs on %d of its backends while slots are freed",
                         key, len(weights))
                tables = self._tables_for([inputs[0]])
                try:
                    self._swap_tables([(sid, inputs)], tables)
                finally:
                    tables.close()

    def _set_slot(self, bid: int, sid: int, ident: BackendKey, gen: int, flags: int) -> _BackendSlot:
        slot = _BackendSlot(sid, ident, gen, flags)
        old = self._backends.get(bid)
        if old is not None and (old.svc_id, old.ident) != (sid, ident):
            self._drop_slot(bid)
        self._backends[bid] = slot
        self._labels = None
        self._by_svc.setdefault(sid, {})[ident] = bid
        self._by_addr.setdefault(ident[0], set()).add(bid)
        self._nh_dirty.add(bid)
        return slot

    def _drop_slot(self, bid: int) -> _BackendSlot:
        slot = self._backends.pop(bid)
        self._labels = None
        mine = self._by_svc[slot.svc_id]
        del mine[slot.ident]
        if not mine:
            del self._by_svc[slot.svc_id]
        same = self._by_addr[slot.ident[0]]
        same.discard(bid)
        if not same:
            del self._by_addr[slot.ident[0]]
        self._nh_dirty.add(bid)
        return slot

    def _reindex(self) -> None:
        self._by_svc = {}
        self._by_addr = {}
        for bid, slot in self._backends.items():
            self._by_svc.setdefault(slot.svc_id, {})[slot.ident] = bid
            self._by_addr.setdefault(slot.ident[0], set()).add(bid)

    def _neighbours(self, addrs: set[IPAddress]) -> None:
        """Managed neighbour entries for backends not seen before (the kernel
        keeps them resolved, so a drain does not walk every backend again)."""
        todo = sorted(addrs - self._known_addrs, key=lambda a: (a.version, a.packed))
        if not todo:
            return
        try:
            with IPRoute() as ipr:
                netlink.ensure_neighbours(ipr, todo)
            self._known_addrs.update(todo)
        except Exception as e:  # neighbour upkeep must never break an apply
            log.warning("neighbour upkeep failed: %s", e)

    # --- attach -------------------------------------------------------------------
    def attach(self, interfaces: Sequence[str], mode: str = "auto") -> dict[str, str]:
        if mode not in ("native", "generic", "auto"):
            raise DatapathError(f"XDP mode must be native, generic or auto, not {mode!r}")
        with self._lock, IPRoute() as ipr:
            t = self.tables
            infos = [netlink.iface_addrs(ipr, name) for name in interfaces]
            # Interface table and devmap first: the program may redirect to any
            # of them as soon as it runs.
            for slot, (name, info) in enumerate(zip(interfaces, infos)):
                t.tx_ports[ctypes.c_int(slot)] = ctypes.c_int(info.ifindex)
                v = t.ifaces.Leaf()
                flags = 0
                if info.v4 is not None:
                    v.v4 = int.from_bytes(info.v4.packed, "little")
                    flags |= 1
                if info.v6 is not None:
                    raw = info.v6.packed
                    for i in range(4):
                        v.v6[i] = int.from_bytes(raw[4 * i:4 * i + 4], "little")
                    flags |= 2
                v.tx_slot = slot
                v.flags = flags
                t.ifaces[t.ifaces.Key(info.ifindex)] = v
                # NO_NEIGH hands the encapsulated packet (our own source) to the
                # kernel; accept_local lets IPv4 forward it instead of calling it martian.
                netlink.set_sysctl(f"/proc/sys/net/ipv4/conf/{name}/accept_local", "1")
            result = {}
            for name, info in zip(interfaces, infos):
                current = netlink.xdp_state(ipr, info.ifindex)
                expected = None
                if current.prog_id:
                    expected = self._replaceable_fd(name, current.prog_id)
                try:
                    result[name] = netlink.attach(ipr, name, self.prog_fd, mode, expected, current)
                finally:
                    if expected is not None:
                        os.close(expected)
                if current.prog_id:
                    log.info("%s: replaced XDP program id %d atomically (%s)", name, current.prog_id, result[name])
                else:
                    log.info("%s: attached XDP (%s)", name, result[name])
            self._attached.update(result)
            assert self.prog is not None
            pin_program(self.prog)
            remove_stale_pins(self.cfg, self.prog.pin_dir)
        self.refresh_nexthops()
        return result

    def _replaceable_fd(self, name: str, prog_id: int) -> int:
        fd = prog_fd_by_id(prog_id)
        info = prog_info(fd)
        if info.name.decode() != FUNC[:15]:
            os.close(fd)
            raise DatapathError(
                f"{name} already runs XDP program {info.name.decode()!r} (id {prog_id}), not l4lb; refusing to replace it"
            )
        return fd

    def detach(self, interfaces: Sequence[str]) -> None:
        with self._lock, IPRoute() as ipr:
            for name in interfaces:
                netlink.detach(ipr, name)
                self._attached.pop(name, None)

    # --- next hops (NEXTHOP_CACHE) -------------------------------------------------------
    def refresh_nexthops(self, full: bool = True, pause: Callable[[], None] | None = None) -> int:
        """Resolve backends' next hops from the kernel and write the ``nexthops``
        map; returns how many entries changed. ``full=False`` handles the slots
        an apply changed, resolving only addresses not seen before; the daemon
        calls the full refresh periodically so route/neighbour/MTU changes reach
        the cache. Either way only slots whose address resolved differently (or
        that changed) are looked at: the periodic refresh of 100,000 backends on
        100 addresses walks 100 addresses, not 100,000 slots, under the lock.
        Netlink runs outside the lock. Best effort: logs, never raises."""
        if not self.cfg.nexthop_cache or self.t is None:
            return 0
        with self._lock:
            texts = self._by_addr if full else {self._backends[b].ident[0] for b in self._nh_dirty if b in self._backends}
            addrs = {_ip(a) for a in texts}
            todo = addrs if full else {a for a in addrs if a not in self._nh_cache}
            ifindexes = {k.value for k in self.tables.ifaces.keys()} if todo else set()
        resolved: dict[IPAddress, NextHop | None] = {}
        if todo:
            order = sorted(todo, key=lambda a: (a.version, a.packed))
            try:
                with IPRoute() as ipr:
                    for i in range(0, len(order), SETTLE_CHUNK):
                        if pause is not None:
                            pause()
                        resolved.update(nexthop.resolve(ipr, order[i:i + SETTLE_CHUNK], ifindexes))
            except Exception as e:  # noqa: BLE001 - the FIB path still forwards
                log.warning("next-hop refresh failed: %s", e)
                return 0
        with self._lock:
            moved = {a for a, nh in resolved.items() if self._nh_cache.get(a, "unset") != nh}
            self._nh_cache.update(resolved)
            if full:
                for gone in [a for a in self._nh_cache if a not in addrs]:
                    del self._nh_cache[gone]
            dirty, self._nh_dirty = self._nh_dirty, set()
            for a in moved:
                dirty.update(self._by_addr.get(a.exploded, ()))
        # In slices, each under the lock on its own: 100,000 new slots must not hold
        # a drain up for half a second. A slot changed meanwhile is written as it is
        # now (and is dirty again for the next refresh).
        order, changed = sorted(dirty), 0
        for i in range(0, len(order), NEXTHOP_SLICE):
            if pause is not None and i:
                pause()
            with self._lock:
                changed += self._write_nexthops(set(order[i:i + NEXTHOP_SLICE]))
        return changed

    def _write_nexthops(self, bids: set[int]) -> int:
        """Bring the ``nexthops`` entries of ``bids`` in line with the cache (batched)."""
        clears: list[int] = []
        writes: list[tuple[int, NextHop, int]] = []
        written, backends, cache = self._nh_written, self._backends, self._nh_cache
        nh_of: dict[str, NextHop | None] = {}  # per address text: 100,000 slots share few addresses
        for bid in bids:
            slot = backends.get(bid)
            if slot is None:  # a freed slot: clear what we wrote for it
                if written.pop(bid, None) is not None:
                    clears.append(bid)
                continue
            addr = slot.ident[0]
            if addr not in nh_of:
                nh_of[addr] = cache.get(_ip(addr))
            nh = nh_of[addr]
            want = None if nh is None else (nh, slot.gen)
            # "unset" (never written by us, e.g. after a restart) is cleared too.
            if written.get(bid, "unset") == want:
                continue
            if want is None:
                clears.append(bid)
            else:
                writes.append((bid, nh, slot.gen))
            written[bid] = want
        self.tables.clear_nexthops(clears)
        self.tables.write_nexthops(writes)
        return len(clears) + len(writes)

    # --- recorder: whole-program replacement (l4lb/datapath/recorder.py) -------------
    def replace_program(self, extra_cflags: Sequence[str],
                        prepare: "Callable[[Program], None] | None" = None) -> Program | None:
        """Compile again with ``extra_cflags`` (e.g. a new recorder mask set), let ``prepare``
        fill the new program's unpinned maps, then swap it in atomically on every attached
        interface (XDP_FLAGS_REPLACE via attach()). Pinned maps are shared, so flows survive.
        Returns the old Program, still open: the caller drains and closes it."""
        from dataclasses import replace

        with self._lock:
            old, old_t, old_cfg = self.prog, self.t, self.cfg
            cfg = replace(self.cfg, extra_cflags=tuple(extra_cflags))
            prog = compile_program(cfg)
            try:
                if prepare is not None:
                    prepare(prog)
                self.prog, self.t, self.cfg = prog, Tables(prog.bpf), cfg
                if self._attached:
                    self.attach(list(self._attached), "auto")
            except BaseException:
                self.prog, self.t, self.cfg = old, old_t, old_cfg
                prog.bpf.cleanup()
                raise
            return old

    def id_names(self) -> tuple[dict[int, str], dict[int, str]]:
        """(service id -> "vip:port/proto", backend id -> "addr:port"), for capture comments."""
        with self._lock:
            svcs = {sid: f"{_hostport(vip, port)}/{proto}" for (vip, port, proto), sid in self._svc_ids.items()}
            bes = {bid: _hostport(*slot.ident) for bid, slot in self._backends.items()}
            return svcs, bes

    # --- read side ---------------------------------------------------------------------
    def stats(self) -> DatapathStats:
        # Under the lock only the labels (snapshotted once per change of ids, not
        # per read). The counters are read after it: at 100,000 backends that is
        # ~3 MB and 10-20 ms that a drain must not wait for. A slot reused in
        # between reads as a counter reset, which rates already treat as "no rate".
        with self._lock:
            t = self.tables
            labels = self._labels
            if labels is None:
                labels = self._labels = (list(self._svc_ids.items()), list(self._backends.items()))
            assert self.prog is not None
            reasons = list(self.prog.reasons)
        try:
            arrays = t.percpu_sums(t.svc_stats), t.percpu_sums(t.backend_stats), t.percpu_sums(t.reason_stats)
        except OSError:  # the program (and these fds) replaced meanwhile: read under the lock
            with self._lock:
                t = self.tables
                arrays = t.percpu_sums(t.svc_stats), t.percpu_sums(t.backend_stats), t.percpu_sums(t.reason_stats)
        return DatapathStats(time.time(), *arrays, labels, reasons)

    def backend_id(self, service: ServiceKey, ident: BackendKey) -> int | None:
        sid = self._svc_ids.get(service)
        return None if sid is None else self._by_svc.get(sid, {}).get(ident)

    def service_id(self, service: ServiceKey) -> int | None:
        return self._svc_ids.get(service)

    def status(self) -> dict[str, Any]:
        with self._lock:
            assert self.prog is not None
            info = prog_info(self.prog.fd)
            ifaces = {}
            try:
                with IPRoute() as ipr:
                    for name in self._attached:
                        st = netlink.xdp_state(ipr, netlink.ifindex(ipr, name))
                        ifaces[name] = {"mode": st.mode, "prog_id": st.prog_id}
            except Exception as e:
                log.warning("interface status: %s", e)
            return {
                "program_id": info.id,
                "program_tag": bytes(info.tag).hex(),
                "pin_dir": str(self.prog.pin_dir),
                "interfaces": ifaces,
                "maglev_m": self.cfg.maglev_m,
                "maps": {
                    "services": {"used": len(self._svc_ids), "max": self.cfg.max_services},
                    "backends": {"used": len(self._backends), "max": self.cfg.max_backends - 1},
                    "flows": {"max": self.cfg.flow_table_size},
                },
            }

    def maglev_table(self, sid: int) -> np.ndarray | None:
        """The table in force for service id ``sid`` (backend ids), as packets see it."""
        with self._lock:
            ring = self._ring.get(sid)
            return None if ring is None else self._rings.read(ring)

    def close(self) -> None:
        with self._lock:
            self._rings.close()
            if self.prog is not None:
                self.prog.bpf.cleanup()
                self.prog = None
                self.t = None


def _hostport(addr: str, port: int) -> str:
    a = ipaddress.ip_address(addr)
    return f"[{a.compressed}]:{port}" if a.version == 6 else f"{a.compressed}:{port}"


# Backend identities hold exploded address strings; parsing them again on every
# refresh is what made a drain walk 100,000 backends slowly.
_ip = lru_cache(maxsize=1 << 17)(ipaddress.ip_address)


def _ntohs(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


__all__ = ["Datapath", "DatapathStats", "hash_seed"]
