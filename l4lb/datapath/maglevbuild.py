"""Maglev tables for the reconcile: built ahead for bulk changes (prefetch),
kept in a small cache of recent ones (an undo, a rollback, services with the
same backends), built by the worker processes when there are many.

Tables are a pure function of (weights, M, seed), so a prefetch that turns out
useless costs only CPU.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from typing import Any

from l4lb import maglev
from l4lb.datapath.context import Context
from l4lb.datapath.slots import BackendKey, ServiceKey
from l4lb.models import Service

log = logging.getLogger(__name__)

BUILT_CACHE = 32  # recently built Maglev tables kept (64 KiB each at M = 16381)


def table_inputs(weights: dict[BackendKey, int], slots: dict[BackendKey, int]) -> tuple[Any, ...]:
    """What a table is a function of: (identity, weight) pairs and their slots."""
    items = tuple(sorted(weights.items()))
    return items, tuple(slots[ident] for ident, _ in items)


class TableBuilder:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.weights: dict[int, tuple[Service, dict[BackendKey, int]]] = {}  # from prefetch(), by object
        self.prefetched: tuple[bytes, threading.Thread, dict[tuple[Any, ...], maglev.MaglevTable]] | None = None
        self._built: OrderedDict[tuple[bytes, tuple[Any, ...]], maglev.MaglevTable] = OrderedDict()
        self._fetched: dict[tuple[Any, ...], maglev.MaglevTable] = {}  # the prefetch, while a reconcile runs

    def prefetch(self, services: Sequence[Service], done: dict[ServiceKey, Service],
                 keys: dict[int, ServiceKey]) -> None:
        """Start building the tables that applying ``services`` will need, in the
        worker processes and a background thread. ``done``/``keys``: the services
        already finished (skipped) and the keys of the last reconcile's objects."""
        seed, m = self.ctx.cfg.maglev_seed, self.ctx.cfg.maglev_m
        todo = []
        self.weights = {}
        for s in services:
            prev = done.get(keys.get(id(s)) or s.key)
            # Equal, not only the same object: a document PUT again is parsed into new
            # objects, and building its 1,000 unchanged tables took seconds of CPU.
            if prev is s or prev == s:
                continue
            weights = s.maglev_weights()
            self.weights[id(s)] = (s, weights)  # the apply needs them too (a 1,000-service PUT: ~0.15 s)
            w = tuple(sorted(weights.items()))  # = table_inputs(...)[0]
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
        self.prefetched = (seed, thread, results)

    def done(self) -> None:
        """A reconcile ended: what was fetched for it goes (the small cache stays)."""
        self.weights = {}
        self._fetched = {}

    def weights_of(self, svc: Service) -> dict[BackendKey, int]:
        """Identity -> Maglev weight, in backend order (from the prefetch when it saw this object)."""
        hit = self.weights.get(id(svc))
        return hit[1] if hit is not None and hit[0] is svc else svc.maglev_weights()

    def tables_for(self, expect: Sequence[tuple[Any, ...]]) -> "TableSet":
        """The Maglev tables of one reconcile step, by weights tuple (TableSet):
        the ``expect``ed ones not prefetched or cached are built ahead by the
        worker processes when there are many."""
        if self.prefetched is not None:
            pseed, thread, results = self.prefetched
            self.prefetched = None
            thread.join()
            # Kept for the rest of the reconcile (done()): near capacity, services
            # finish over several rounds, and each round must not build them again.
            self._fetched = results if pseed == self.ctx.cfg.maglev_seed else {}
        return TableSet(self, expect)

    def _known(self, k: tuple[Any, ...]) -> maglev.MaglevTable | None:
        """A table built already: prefetched for this reconcile, or recently built."""
        hit = self._fetched.get(k)
        if hit is not None:
            return hit
        key = (self.ctx.cfg.maglev_seed, k)
        hit = self._built.get(key)
        if hit is not None:
            self._built.move_to_end(key)
        return hit

    def _remember(self, k: tuple[Any, ...], table: maglev.MaglevTable) -> None:
        self._built[(self.ctx.cfg.maglev_seed, k)] = table
        while len(self._built) > BUILT_CACHE:
            self._built.popitem(last=False)


class TableSet:
    """Tables asked for by weights tuple, in any order: prefetched or cached
    ones as they are, the ones expected in bulk from the worker processes (in
    the order expected), any other built here when it is asked for. A table
    never asked for is never built here: a drain's undo, whose table a spare
    buffer still holds (rings.py), costs no build."""

    def __init__(self, builder: TableBuilder, expect: Sequence[tuple[Any, ...]]) -> None:
        self._builder = builder
        self._m, self._seed = builder.ctx.cfg.maglev_m, builder.ctx.cfg.maglev_seed
        missing = [k for k in dict.fromkeys(expect) if builder._known(k) is None]
        self._queue: deque[tuple[Any, ...]] = deque()
        self._fresh: Iterator[maglev.MaglevTable] | None = None
        if len(missing) >= maglev.PARALLEL_MIN:  # a few are built one by one, when asked for
            self._queue.extend(missing)
            self._fresh = maglev.build_many([dict(k) for k in missing], self._m, self._seed)
        self._queued = set(self._queue)
        self._ahead: dict[tuple[Any, ...], maglev.MaglevTable] = {}  # came from the workers before asked for

    def get(self, k: tuple[Any, ...]) -> maglev.MaglevTable:
        table = self._builder._known(k) or self._ahead.pop(k, None)
        if table is not None:
            return table
        if k in self._queued:
            assert self._fresh is not None
            while True:
                got = self._queue.popleft()
                self._queued.discard(got)
                table = next(self._fresh)
                if got == k:
                    break
                self._ahead[got] = table
        else:
            table = maglev.build(dict(k), self._m, self._seed)
        self._builder._remember(k, table)
        return table

    def close(self) -> None:
        """Done asking (also after a failure: frees the workers for the rollback)."""
        if self._fresh is not None:
            self._fresh.close()  # type: ignore[attr-defined]  # a generator
