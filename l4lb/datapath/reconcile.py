"""Reconcile: make the maps hold exactly a list of services, in an order that
keeps packets in flight safe.

Backend entries are written before any Maglev table refers to them; a
service's new table is complete in its spare buffer before the service entry
points at it (rings.py); removed backends are cleared only after no table
points to them any more and an RCU grace period has passed since the last
table did.

Near capacity (old and new sets together do not fit) removed services and
backends are cleared first, and a freed id or slot is reused only after an
RCU grace period, so no packet in flight still reads it (see reconcile()).
Services that did not change are skipped cheaply, and map writes go in
batches: a drain touches one service, a 100,000-backend document takes a
handful of syscalls per map.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from l4lb.datapath.config import DatapathError, DatapathFull
from l4lb.datapath.context import Context
from l4lb.datapath.flags import affinity_prefix, bit, ranges_gen, service_flags
from l4lb.datapath.maglevbuild import TableBuilder, TableSet, table_inputs
from l4lb.datapath.nexthop import IPAddress, ip_of
from l4lb.datapath.rings import Rings
from l4lb.datapath.slots import PROTO, BackendKey, BackendSlot, ServiceEntry, ServiceKey, Slots
from l4lb.datapath.srcranges import SourceRanges, range_of
from l4lb.inplace import replaced_at
from l4lb.models import MAX_SOURCE_RANGES_PER_SERVICE, BackendState, Service

log = logging.getLogger(__name__)

BE_F_DOWN = bit("BE_F_DOWN")
SWAP_CHUNK = 256  # services whose tables are written before their entries are


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
    progress: int = 0                   # slots allocated or cleared, services finished, interim tables set


class Reconciler:
    def __init__(self, ctx: Context, slots: Slots, rings: Rings, builder: TableBuilder) -> None:
        self.ctx = ctx
        self.slots = slots
        self.rings = rings
        self.builder = builder
        self.ranges = SourceRanges(ctx)
        self.timing = ApplyTimings()
        # svc id -> the inputs of the table written (weights, backend ids): a
        # reconcile rebuilds only the tables whose inputs changed.
        self.inputs: dict[int, tuple[Any, ...]] = {}
        # The services finished with exactly this content: a reconcile skips them cheaply.
        self.done: dict[ServiceKey, Service] = {}
        self.clean: Sequence[Service] = ()  # the list of the last successful apply (the one reconciled)
        self._keys: dict[int, ServiceKey] = {}
        self._held: list[Service] = []
        self._want: dict[ServiceKey, Service] = {}  # the last reconcile's services by key
        self._counted: tuple[Sequence[Service], tuple[int, int]] = ((), (0, 0))  # check_capacity's last list, totals
        self.new_addrs: set[str] = set()   # backends' addresses (exploded) the last reconcile added
        self.fail_after_writes: int | None = None  # test hook: fail mid-reconcile
        self.before_write: Callable[[], None] | None = None  # called once before a reconcile's first write

    def forget(self) -> None:
        """Tables in force are unknown again (a restart, a seed change)."""
        self.inputs.clear()
        self.done.clear()
        self.clean = ()
        self.ranges.forget()

    def check_capacity(self, services: Sequence[Service]) -> None:
        if len(services) > self.ctx.cfg.max_services:
            raise DatapathError(f"{len(services)} services exceed the datapath limit of {self.ctx.cfg.max_services}")
        counted, (n_backends, n_ranges) = self._counted
        at = replaced_at(counted, services)
        if at is None:
            n_backends, n_ranges = sum(len(s.backends) for s in services), sum(len(s.source_ranges) for s in services)
        for i in at or ():  # a few replaced: counted from those
            n_backends += len(services[i].backends) - len(counted[i].backends)
            n_ranges += len(services[i].source_ranges) - len(counted[i].source_ranges)
        self._counted = (services, (n_backends, n_ranges))
        n = n_backends
        if n > self.ctx.cfg.max_backends - 1:
            raise DatapathError(f"{n} backends exceed the datapath limit of {self.ctx.cfg.max_backends - 1}")
        n = n_ranges
        room = self.ctx.tables.src_ranges.max_entries - MAX_SOURCE_RANGES_PER_SERVICE  # one service's old and new
        if n > room:
            raise DatapathError(f"{n} source ranges exceed the datapath limit of {room}")

    def ticks(self, n: int) -> int:
        """How many of the next ``n`` writes the test hook lets through (all without a hook)."""
        if self.fail_after_writes is None:
            return n
        ok = max(0, min(n, self.fail_after_writes))
        self.fail_after_writes -= ok
        return ok

    def tick(self) -> None:
        if not self.ticks(1):
            raise DatapathError("injected failure (test hook)")

    def reconcile(self, services: list[Service]) -> None:
        try:
            self._reconcile(services)
        finally:
            self.builder.done()  # what was prefetched for it, if anything, goes with it

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
        clean, self.clean = self.clean, ()
        fast = self._in_place(clean, services)
        if fast is not None:  # a few services replaced by namesakes of the same key: nothing goes
            want, todo = fast
            gone: list[ServiceKey] = []
            orphans: set[int] = set()
        else:
            # Keys of the services of the last reconcile by object: formatting their VIPs
            # was most of the cost of looking at 1,000 services.
            keys = self._keys
            want = {keys.get(id(s)) or s.key: s for s in services}
            self._keys = {id(s): k for k, s in want.items()}
            # Services of the last successful apply, as objects, are unchanged; others
            # are checked. Sorted after filtering: a few keys are sorted, not 1,000.
            clean_ids = {id(s) for s in clean}
            todo = sorted(k for k, s in want.items() if id(s) not in clean_ids and not self._unchanged(k, s))
            gone = sorted(k for k in self.slots.svc_ids if k not in want)
            live = set(self.slots.svc_ids.values())
            orphans = set(self.slots.by_svc) - live  # backends whose service never made it (a crash mid-apply)
        self._held, self._want = services, want  # _held keeps the objects alive, so their ids stay theirs
        for key in (*todo, *gone):
            self.done.pop(key, None)
        if (todo or gone or orphans) and self.before_write is not None:
            self.before_write()
        w = _Work(want, list(todo), gone, {self.slots.svc_ids[k] for k in gone} | orphans)
        for key in todo:
            # Identity -> Maglev weight, in backend order: each backend's identity is computed once.
            w.weights[key] = keep = self.builder.weights_of(want[key])
            sid = self.slots.svc_ids.get(key)
            if sid is not None:
                w.removing.update((bid, None) for ident, bid in self.slots.by_svc.get(sid, {}).items() if ident not in keep)
        for sid in w.freeing_sids:
            w.removing.update((bid, None) for bid in self.slots.by_svc.get(sid, {}).values())
        stage = 0
        while True:
            done_before = w.progress
            self._allocate(w, final=stage >= 2)
            self._finish(w)
            if stage == 0:
                self._remove_services(w, orphans)
            self._clear_unreferenced(w)
            if not w.waiting:
                break
            if stage >= 1:
                self._interim_tables(w)
                self._clear_unreferenced(w)
            if stage >= 2 and w.progress == done_before:
                raise DatapathFull(
                    f"the change does not fit the datapath's maps: {len(w.waiting)} services "
                    f"({', '.join(map(str, w.waiting[:3]))}{', ...' if len(w.waiting) > 3 else ''}) find no free "
                    "slots, even with the others moved over, unless a service ran on none of its backends "
                    f"meanwhile (datapath.max_backends = {self.ctx.cfg.max_backends}); apply it in steps, or raise "
                    "datapath.max_backends")
            g0 = time.perf_counter()
            self.rings.grace(always=True)
            self.timing.grace += time.perf_counter() - g0
            stage += 1
        if fast is None:
            self.ranges.prune(set(self.slots.svc_ids.values()))
        if w.allocated:
            # Forget freed slots that have been handed to someone else since.
            self.slots.freed_be = {k: v for k, v in self.slots.freed_be.items() if v[0] not in self.slots.backends}
            in_use = set(self.slots.svc_ids.values())
            self.slots.freed_svc = {k: v for k, v in self.slots.freed_svc.items() if v not in in_use}
        for key in todo:
            self.done[key] = want[key]
            svc = want[key]
            self.new_addrs.update(ident[0] for b, ident in zip(svc.backends, w.weights[key])
                                  if b.state is not BackendState.maintenance)
        self.timing.reconcile += time.perf_counter() - t0

    def _in_place(self, clean: Sequence[Service], services: list[Service]
                  ) -> tuple[dict[ServiceKey, Service], list[ServiceKey]] | None:
        """The services of the last successful apply (``clean``, the very list it
        reconciled) with a few replaced by namesakes of the same key (a drain):
        (want, todo) worked out from those alone (l4lb/inplace.py). None otherwise."""
        if clean is not self._held or not clean:
            return None
        at = replaced_at(clean, services)
        if at is None:
            return None
        want, keys, todo = dict(self._want), dict(self._keys), []
        for i in at:
            key = keys.pop(id(clean[i]))
            if services[i].key != key:
                return None
            want[key], keys[id(services[i])] = services[i], key
            if not self._unchanged(key, services[i]):
                todo.append(key)
        self._keys = keys
        return want, sorted(todo)

    def _unchanged(self, key: ServiceKey, svc: Service) -> bool:
        prev = self.done.get(key)
        if prev is None or (prev is not svc and prev != svc):
            return False
        sid = self.slots.svc_ids.get(key)
        # Also in the maps as finished: its table (not cleared by a seed change or
        # a restart) and exactly its backends (nothing left over from a failure).
        return sid is not None and sid in self.inputs and len(self.slots.by_svc.get(sid, ())) == len(svc.backends)

    def _allocate(self, w: _Work, final: bool) -> None:
        """Ids for the waiting services and slots for their backends, then one
        batch write of those entries (and of changed flags). Before the last
        pass, a service or backend that remembers a slot still being freed
        waits for it, so an undo gets its old id and generation back."""
        t = self.ctx.tables
        used_sids = set(self.slots.svc_ids.values()) | set(self.slots.by_svc)
        fresh_sid = (i for i in range(self.ctx.cfg.max_services) if i not in used_sids)
        fresh_bid = (i for i in range(1, self.ctx.cfg.max_backends) if i not in self.slots.backends)
        writes: list[tuple[int, BackendSlot, IPAddress]] = []
        zero: list[int] = []
        for key in w.waiting:
            svc = w.want[key]
            sid = self.slots.svc_ids.get(key)
            if sid is None:
                sid = self.slots.freed_svc.get(key)
                if sid is None or sid in used_sids:
                    if sid is not None and sid in w.freeing_sids and not final:
                        continue
                    sid = next(fresh_sid, None)
                    if sid is None:
                        continue
                self.slots.freed_svc.pop(key, None)
                used_sids.add(sid)
                self.slots.set_service(key, sid)  # before any write: a failure leaves it to be removed
                t.percpu_zero(t.svc_stats, sid)
                w.allocated = True
            have = self.slots.by_svc.get(sid, {})
            for b, ident in zip(svc.backends, w.weights[key]):
                flags = BE_F_DOWN if b.state is BackendState.maintenance else 0
                bid = have.get(ident)
                if bid is not None:
                    if self.slots.backends[bid].flags != flags:
                        writes.append((bid, self.slots.set(bid, sid, ident, self.slots.backends[bid].gen, flags), b.address))
                    continue
                old_bid, gen = self.slots.freed_be.get((key, ident), (None, 0))
                if old_bid is not None and old_bid not in self.slots.backends:
                    bid = old_bid
                    del self.slots.freed_be[(key, ident)]
                elif old_bid is not None and old_bid in w.removing and not final:
                    continue
                else:
                    bid = next(fresh_bid, None)
                    if bid is None:
                        continue
                    gen = self.slots.next_gen
                    self.slots.next_gen += 1
                    zero.append(bid)
                # Taken in our books before the write: after a failure the rollback clears it.
                writes.append((bid, self.slots.set(bid, sid, ident, gen, flags), b.address))
                w.allocated = True
        m0 = time.perf_counter()
        if zero:
            t.percpu_zero_many(t.backend_stats, zero)
        ok = self.ticks(len(writes))
        done = writes[:ok]
        t.write_backends([b for b, _, _ in done], [a for _, _, a in done], [s.ident[1] for _, s, _ in done],
                         [s.svc_id for _, s, _ in done], [s.gen for _, s, _ in done], [s.flags for _, s, _ in done])
        self.timing.writes += len(done)
        self.timing.maps += time.perf_counter() - m0
        w.progress += len(zero)
        if ok < len(writes):
            raise DatapathError("injected failure (test hook)")

    def _finish(self, w: _Work) -> None:
        """Tables, then service entries, of every waiting service whose backends all have slots."""
        ready: list[tuple[ServiceKey, int, tuple[Any, ...]]] = []
        for key in w.waiting:
            sid = self.slots.svc_ids.get(key)
            if sid is None:
                continue
            have = self.slots.by_svc.get(sid, {})
            if all(ident in have for ident in w.weights[key]):
                ready.append((key, sid, table_inputs(w.weights[key], have)))
        if not ready:
            return
        rebuild = [(sid, inputs) for _, sid, inputs in ready if self.inputs.get(sid) != inputs]
        b0 = time.perf_counter()  # a bulk change waits here for its prefetched tables
        tables = self.builder.tables_for([inputs[0] for _, inputs in rebuild if not self.rings.has(inputs)])
        self.timing.maglev += time.perf_counter() - b0
        try:
            # In chunks: one outer batch swap each (few fds open), entries right after their tables.
            for i in range(0, len(ready), SWAP_CHUNK):
                chunk = ready[i:i + SWAP_CHUNK]
                self._swap_tables([(sid, inputs) for _, sid, inputs in chunk if self.inputs.get(sid) != inputs],
                                  tables)
                for key, sid, _ in chunk:
                    svc = w.want[key]
                    self.timing.writes += self.ranges.sync(sid, svc.source_ranges)  # before the entry's gen
                    self._write_entry(key, sid, ServiceEntry(service_flags(svc), 0, ranges_gen(svc),
                                                             affinity_prefix(svc) or 0))
        finally:
            tables.close()  # also when a write failed: frees the workers for the rollback
        done = {key for key, _, _ in ready}
        w.waiting = [k for k in w.waiting if k not in done]
        w.progress += len(done)

    def _write_entry(self, key: ServiceKey, sid: int, want: ServiceEntry) -> None:
        """The service entry as ``want`` says, with the ring in force for
        ``sid``; a ring that goes out of force is retired (rings.py)."""
        ring = self.slots.ring[sid]
        entry = want._replace(ring=ring)
        old = self.slots.svc_entry.get(key)
        if old == entry:
            return
        self.tick()
        m0 = time.perf_counter()
        t = self.ctx.tables
        vip, port, proto = key
        k = t.svc_key(ip_of(vip), port, PROTO[proto])
        v = t.services.Leaf()
        v.id, v.flags, v.ring, v.gen, v.affinity_prefix = sid, entry.flags, ring, entry.gen, entry.affinity_prefix
        t.services[k] = v
        t.tables_changed()
        self.slots.svc_entry[key] = entry
        self.rings.use(ring, None if old is None else old.ring)
        self.timing.writes += 1
        self.timing.maps += time.perf_counter() - m0

    def adopt(self, key: ServiceKey, svc: Service) -> bool:
        """Take what the maps hold for ``svc`` as finished, without building its
        table, if the entry and the backend slots are exactly its own (a
        restart whose maps were converged to this very state, l4lb/lifecycle).
        The table in force is trusted to be Maglev of these weights."""
        sid = self.slots.svc_ids.get(key)
        entry = self.slots.svc_entry.get(key)
        if (sid is None or entry is None or entry.flags != service_flags(svc) or entry.gen != ranges_gen(svc)
                or entry.affinity_prefix != (affinity_prefix(svc) or 0) or not self.rings.mapped(entry.ring)
                or self.ranges.of(sid) != {range_of(n) for n in svc.source_ranges}):
            return False
        have = self.slots.by_svc.get(sid, {})
        weights = svc.maglev_weights()
        if len(have) != len(weights) or len(weights) != len(svc.backends):
            return False
        for b, ident in zip(svc.backends, weights):
            bid = have.get(ident)
            if bid is None or self.slots.backends[bid].flags != (BE_F_DOWN if b.state is BackendState.maintenance
                                                                 else 0):
                return False
        inputs = table_inputs(weights, have)
        self.inputs[sid] = inputs
        self.rings.adopt(entry.ring, inputs)
        self.done[key] = svc
        return True

    def in_force(self, key: ServiceKey, sid: int) -> dict[str, Any]:
        """What the maps hold for one service: key, entry flags and affinity
        prefix, source ranges, backend slots (identity, flags) and the table
        in force as backend slots."""
        e = self.slots.svc_entry[key]
        slots = {bid: (self.slots.backends[bid].ident, self.slots.backends[bid].flags)
                 for bid in self.slots.by_svc.get(sid, {}).values()}
        return {"key": key, "flags": e.flags, "affinity_prefix": e.affinity_prefix, "backends": slots,
                "source_ranges": self.ranges.networks(sid, ip_of(key[0]).version), "table": self.rings.read(e.ring)}

    def _swap_tables(self, todo: list[tuple[int, tuple[Any, ...]]], tables: TableSet) -> None:
        """Write the table of each (svc id, inputs) into a spare buffer and point
        services that have an entry at it (new services get theirs from
        _finish). A spare that already holds the table (an undo) is only
        pointed at (rings.py), and its table is not even built."""
        if not todo:
            return
        t = self.ctx.tables
        m0 = time.perf_counter()
        g0 = self.rings.waited
        places = self.rings.reserve(t.maglev_outer.map_fd, [inputs for _, inputs in todo])
        self.timing.grace += self.rings.waited - g0
        self.timing.maps += time.perf_counter() - m0 - (self.rings.waited - g0)
        ok = self.ticks(len(todo))
        for n, ((sid, inputs), (idx, must_write)) in enumerate(zip(todo, places)):
            if n >= ok:
                raise DatapathError("injected failure (test hook)")
            cur = self.slots.ring.get(sid)
            unknown = cur is not None and self.rings.holds(cur) is None  # after a restart
            ids = None
            b0 = time.perf_counter()
            if must_write or unknown:
                # -1 (no backend) indexes the trailing 0: "none" in the datapath.
                ids = np.array([*inputs[1], 0], dtype=np.uint32)[tables.get(inputs[0]).table]
            m0 = time.perf_counter()
            self.timing.maglev += m0 - b0
            if unknown and np.array_equal(self.rings.read(cur), ids):
                # After a restart the table in force is unknown: it is this one already, keep it.
                self.rings.adopt(cur, inputs)
                idx = cur
            elif must_write:
                assert ids is not None
                self.rings.write(idx, ids, inputs)
                self.timing.tables += 1
            self.slots.ring[sid] = idx
            self.inputs[sid] = inputs
            key = self.slots.key_of(sid)
            if key is not None and key in self.slots.svc_entry:
                self._write_entry(key, sid, self.slots.svc_entry[key])
            self.timing.writes += 1
            self.timing.maps += time.perf_counter() - m0

    def _remove_services(self, w: _Work, orphans: set[int]) -> None:
        """Services that go away: entry first, then their table (their slots are cleared after)."""
        t = self.ctx.tables
        m0 = time.perf_counter()
        for key in w.gone:
            sid = self.slots.svc_ids[key]
            vip, port, proto = key
            self.tick()
            try:
                del t.services[t.svc_key(ipaddress.ip_address(vip), port, PROTO[proto])]
            except KeyError:
                pass
            t.tables_changed()  # before its ring is released: no CPU may keep a cached entry pointing at it
            self.ranges.drop(sid)  # after the entry: no new flow is checked against them any more
            # Its buffers stay in maglev_outer for the next service with this id
            # (deleting them would cost a grace period each); no entry points at them.
            self.slots.drop_service(key)
            self.slots.freed_svc[key] = sid
            entry = self.slots.svc_entry.pop(key, None)
            if entry is not None:
                self.rings.release(entry.ring)
            self.slots.ring.pop(sid, None)
            self.inputs.pop(sid, None)
        for sid in orphans:
            self.slots.ring.pop(sid, None)
            self.inputs.pop(sid, None)
        self.timing.maps += time.perf_counter() - m0

    def _clear_unreferenced(self, w: _Work) -> None:
        """Clear the removed slots that no table points at any more, in one batch."""
        if not w.removing:
            return
        live = {sid: key for key, sid in self.slots.svc_ids.items()}
        refs: dict[int, set[int] | None] = {}

        def referenced(bid: int) -> bool:
            sid = self.slots.backends[bid].svc_id
            if sid not in live:
                return False  # its service's entry and table are gone
            if sid not in refs:
                inputs = self.inputs.get(sid)
                refs[sid] = None if inputs is None else set(inputs[1])  # None: table unknown (restart)
            r = refs[sid]
            return r is None or bid in r

        free = [bid for bid in w.removing if not referenced(bid)]
        if not free:
            return
        if self.rings.pending():
            # A buffer or service entry that pointed at these slots may still be
            # read by a packet in flight.
            g0 = time.perf_counter()
            self.rings.grace()
            self.timing.grace += time.perf_counter() - g0
        names = {sid: key for key, sid in self.slots.freed_svc.items()} | live
        ok = self.ticks(len(free))
        m0 = time.perf_counter()
        self.ctx.tables.clear_backends(free[:ok])
        for bid in free[:ok]:
            slot = self.slots.drop(bid)
            del w.removing[bid]
            if slot.svc_id in names:
                self.slots.freed_be[(names[slot.svc_id], slot.ident)] = (bid, slot.gen)
        self.timing.writes += ok
        self.timing.maps += time.perf_counter() - m0
        w.progress += ok
        if ok < len(free):
            raise DatapathError("injected failure (test hook)")

    def _interim_tables(self, w: _Work) -> None:
        """Waiting services that still point at removed slots get a table of
        their wanted backends that have slots already, so those slots free up.
        A service none of whose wanted backends has a slot yet keeps one of
        the backends it runs on now (a bridge, freed once it is finished): a
        service never runs on no backend while slots are moved over."""
        todo: list[tuple[int, tuple[Any, ...]]] = []
        bridged = 0
        for key in w.waiting:
            sid = self.slots.svc_ids.get(key)
            have = self.slots.by_svc.get(sid, {}) if sid is not None else {}
            if sid is None or not any(bid in w.removing for bid in have.values()):
                continue
            weights = {i: wt for i, wt in w.weights[key].items() if i in have}
            if not any(weights.values()):
                bridge = self._bridge(sid, have, w)
                if bridge is not None:
                    weights[bridge[0]] = bridge[1]
                    bridged += 1
            inputs = table_inputs(weights, have)
            if self.inputs.get(sid) != inputs:
                todo.append((sid, inputs))
        if not todo:
            return
        log.info("maps nearly full: %d services run on the part of their backends that has slots (%d on one "
                 "backend they are leaving) while slots are moved over", len(todo), bridged)
        b0 = time.perf_counter()
        tables = self.builder.tables_for([inputs[0] for _, inputs in todo if not self.rings.has(inputs)])
        self.timing.maglev += time.perf_counter() - b0
        try:
            for i in range(0, len(todo), SWAP_CHUNK):
                self._swap_tables(todo[i:i + SWAP_CHUNK], tables)
        finally:
            tables.close()
        w.progress += len(todo)

    def _bridge(self, sid: int, have: dict[BackendKey, int], w: _Work) -> tuple[BackendKey, int] | None:
        """The backend (and weight) of service ``sid`` to keep while none of its
        wanted ones has a slot: the heaviest one in its table in force (the
        first by identity on ties; weight 1 if the table is unknown, after a
        restart), never one in maintenance."""
        now = self.inputs.get(sid)
        if now is not None:
            live = sorted(((ident, wt) for ident, wt in now[0] if wt and ident in have), key=lambda iw: (-iw[1], iw[0]))
            return live[0] if live else None
        up = sorted(i for i, bid in have.items() if bid in w.removing and not self.slots.backends[bid].flags & BE_F_DOWN)
        return (up[0], 1) if up else None
