"""Maglev tables for the reconcile: built ahead for bulk changes (prefetch),
kept in a small cache of recent ones (an undo, a rollback, services with the
same backends), built by the worker processes when there are many.

Tables are a pure function of (weights, M, seed), so a prefetch that turns out
useless costs only CPU.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Generator, Sequence
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
            if done.get(keys.get(id(s)) or s.key) is s:
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

    def tables_for(self, weights: list[tuple[Any, ...]]) -> Generator[maglev.MaglevTable, None, None]:
        """The Maglev table for each weights tuple, in order: prefetched ones,
        recently built ones from a small cache, the others built (by worker
        processes when there are many)."""
        seed = self.ctx.cfg.maglev_seed
        have = {k: self._built[(seed, k)] for k in weights if (seed, k) in self._built}
        if self.prefetched is not None:
            pseed, thread, results = self.prefetched
            self.prefetched = None
            thread.join()
            # Kept for the rest of the reconcile (done()): near capacity, services
            # finish over several rounds, and each round must not build them again.
            self._fetched = results if pseed == seed else {}
        have.update((k, self._fetched[k]) for k in weights if k in self._fetched)
        missing = list(dict.fromkeys(k for k in weights if k not in have))
        fresh = maglev.build_many([dict(k) for k in missing], self.ctx.cfg.maglev_m, seed)
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
