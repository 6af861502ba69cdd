"""Neighbour entries and the next-hop cache of backends (NEXTHOP_CACHE builds).

Packets never wait for this: until a backend's next hop is in the
``nexthops`` map the program asks the FIB (bpf_fib_lookup), and an
unresolved neighbour goes through the kernel, which resolves it. So the
daemon runs it after answering a change (settle) and periodically (a full
refresh, so route/neighbour/MTU changes reach the cache). It is pyroute2
Python that competes with requests for the GIL: it goes in chunks, with
``pause()`` between them, and netlink runs outside the datapath lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pyroute2 import IPRoute

from l4lb.datapath import netlink
from l4lb.datapath.context import Context
from l4lb.datapath.nexthop import NextHop, Resolver, ip_of
from l4lb.datapath.routes import RouteTable
from l4lb.datapath.slots import Slots
from l4lb.logchange import Condition

log = logging.getLogger(__name__)

SETTLE_CHUNK = 256  # addresses per neighbour round in settle(), between pauses
RESOLVE_CHUNK = 2048  # addresses looked up in a route dump between pauses (pure Python)
NEXTHOP_SLICE = 4096  # next-hop entries written per hold of the lock


class Upkeep:
    def __init__(self, ctx: Context, slots: Slots) -> None:
        self.ctx = ctx
        self.slots = slots
        # Addresses by their exploded text, as backend identities hold them: as
        # dict keys, IPv6Address objects of structured addresses (2001:db8:b:i::j)
        # collide in the hash (int hashes fold mod 2^61-1) and slow a set of 100,000
        # down by a factor of fifty.
        self.known_addrs: set[str] = set()   # neighbour entries ensured
        self.unsettled: set[str] = set()      # backends' addresses settle() has not seen
        # Next hops: address -> what the kernel resolved, and what each backend
        # slot's `nexthops` entry holds (None = no entry: the program uses the FIB).
        self.nh_cache: dict[str, NextHop | None] = {}
        self.nh_written: dict[int, tuple[NextHop, int] | None] = {}
        self.unroutable: set[str] = set()
        # The dumps the cache was last resolved from in full (Resolver.snapshot): while
        # they stay the same, a full refresh resolves only new addresses. 100,000
        # addresses cost ~5 s of Python each time, every stats_interval.
        self._resolved_from: object | None = None
        self.skipped = 0  # full refreshes that found nothing changed (the tests read it)
        self.no_route = Condition(log, "backends have no route (their packets go to the kernel)",
                                  "every backend has a route again")

    def recover(self) -> None:
        """What the ``nexthops`` map holds for each slot (a restart), so that a
        refresh resolving the same next hops rewrites nothing."""
        rows = self.ctx.tables.nexthops.values_array()
        slots = self.slots.backends
        bids = np.fromiter(slots, dtype=np.int64, count=len(slots))
        want_gen = np.fromiter((s.gen for s in slots.values()), dtype=np.int64, count=len(slots))
        have = rows[bids]
        gens = have["gen"].astype(np.int64)
        self.nh_written = dict.fromkeys(bids[gens == 0].tolist())  # no entry: the program asks the FIB
        hops: dict[bytes, NextHop] = {}  # 100,000 slots share a few next hops
        live = np.flatnonzero((gens != 0) & (gens == want_gen))  # others: another generation's, cleared later
        for bid, row, gen in zip(bids[live].tolist(), have[live], gens[live].tolist()):
            key = row.tobytes()[:4] + row.tobytes()[8:]  # all but the generation
            hop = hops.get(key)
            if hop is None:
                hop = hops[key] = NextHop(int(row["ifindex"]), bytes(row["smac"]), bytes(row["dmac"]),
                                          int(row["mtu"]))
            self.nh_written[bid] = (hop, gen)

    def settle(self, timing: Any, pause: Callable[[], None] | None = None) -> None:
        """Neighbour entries and next-hop cache entries for what applies added;
        records its time in ``timing`` (the last apply's)."""
        with self.ctx.lock:
            addrs, self.unsettled = self.unsettled - self.known_addrs, set()
            if not addrs and not self.slots.nh_dirty:
                return  # a drain: nothing new to resolve
        t1 = time.perf_counter()
        todo = sorted(addrs - self.known_addrs)
        if todo:
            try:
                with IPRoute() as ipr:
                    routes = RouteTable(ipr, {4 if "." in a else 6 for a in todo})  # one dump for all of them
                    for i in range(0, len(todo), SETTLE_CHUNK):
                        if pause is not None:
                            pause()
                        netlink.ensure_neighbours(ipr, [ip_of(a) for a in todo[i:i + SETTLE_CHUNK]], routes)
                        self.known_addrs.update(todo[i:i + SETTLE_CHUNK])
            except Exception as e:  # neighbour upkeep must never break an apply
                log.warning("neighbour upkeep failed: %s", e)
        t2 = time.perf_counter()
        self.refresh_nexthops(full=False, pause=pause)
        t3 = time.perf_counter()
        timing.neighbours, timing.nexthops = t2 - t1, t3 - t2
        timing.total += t3 - t1

    def refresh_nexthops(self, full: bool = True, pause: Callable[[], None] | None = None) -> int:
        """Resolve backends' next hops from the kernel and write the ``nexthops``
        map; returns how many entries changed. ``full=False`` handles the slots
        an apply changed, resolving only addresses not seen before; the daemon
        calls the full refresh periodically so route/neighbour/MTU changes reach
        the cache. Either way only slots whose address resolved differently (or
        that changed) are looked at: the periodic refresh of 100,000 backends on
        100 addresses walks 100 addresses, not 100,000 slots, under the lock.
        Netlink runs outside the lock. Best effort: logs, never raises."""
        ctx, slots = self.ctx, self.slots
        if not ctx.cfg.nexthop_cache or ctx.t is None:
            return 0
        with ctx.lock:
            addrs = set(slots.by_addr) if full else {slots.backends[b].ident[0] for b in slots.nh_dirty
                                                     if b in slots.backends}
            todo = addrs if full else {a for a in addrs if a not in self.nh_cache}
            ifindexes = {k.value for k in ctx.tables.ifaces.keys()} if todo else set()
        resolved: dict[str, NextHop | None] = {}
        if todo:
            try:
                with IPRoute() as ipr:
                    # One dump of routes, links and neighbours, then lookups in Python.
                    resolver = Resolver(ipr, {4 if "." in a else 6 for a in todo}, ifindexes)
                    dumps = resolver.snapshot()
                    unchanged = dumps is not None and dumps == self._resolved_from
                    if full and unchanged:
                        todo = todo - self.nh_cache.keys()
                        self.skipped += 1
                    order = sorted(todo)
                    for i in range(0, len(order), RESOLVE_CHUNK):
                        if pause is not None:
                            pause()
                        resolved.update(resolver.resolve(order[i:i + RESOLVE_CHUNK]))
            except Exception as e:  # noqa: BLE001 - the FIB path still forwards
                log.warning("next-hop refresh failed: %s", e)
                return 0
            self.unroutable -= resolved.keys()
            self.unroutable |= resolver.unroutable
            # A partial refresh from other dumps leaves a cache of two: the next full one does it all.
            self._resolved_from = dumps if full or unchanged else None
        if full:
            self.unroutable &= addrs
        self.no_route.update(self.unroutable)
        with ctx.lock:
            moved = {a for a, nh in resolved.items() if self.nh_cache.get(a, "unset") != nh}
            self.nh_cache.update(resolved)
            if full:
                for gone in self.nh_cache.keys() - addrs:
                    del self.nh_cache[gone]
            dirty, slots.nh_dirty = slots.nh_dirty, set()
            for a in moved:
                dirty.update(slots.by_addr.get(a, ()))
        # In slices, each under the lock on its own: 100,000 new slots must not hold
        # a drain up for half a second. A slot changed meanwhile is written as it is
        # now (and is dirty again for the next refresh).
        order, changed = sorted(dirty), 0
        for i in range(0, len(order), NEXTHOP_SLICE):
            if pause is not None and i:
                pause()
            with ctx.lock:
                changed += self._write_nexthops(set(order[i:i + NEXTHOP_SLICE]))
        return changed

    def _write_nexthops(self, bids: set[int]) -> int:
        """Bring the ``nexthops`` entries of ``bids`` in line with the cache (batched)."""
        clears: list[int] = []
        writes: list[tuple[int, NextHop, int]] = []
        written, backends, cache = self.nh_written, self.slots.backends, self.nh_cache
        nh_of: dict[str, NextHop | None] = {}  # per address text: 100,000 slots share few addresses
        for bid in bids:
            slot = backends.get(bid)
            if slot is None:  # a freed slot: clear what we wrote for it
                if written.pop(bid, None) is not None:
                    clears.append(bid)
                continue
            addr = slot.ident[0]
            if addr not in nh_of:
                nh_of[addr] = cache.get(addr)
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
        self.ctx.tables.clear_nexthops(clears)
        self.ctx.tables.write_nexthops(writes)
        return len(clears) + len(writes)
