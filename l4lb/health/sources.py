"""Tunnel probes follow the box's own source address towards their backends.

A tunnel probe binds the LB's address towards its backend (the reply comes
back to it). When that address changes (renumbering, an address removed or
deprecated, a route with another ``src``), a probe still bound to the old one
fails to bind, or its replies go to an address the box no longer has: every
check would fail or stop, a box-wide false outage, until a restart. So the
health room watches for address, route and rule changes
(l4lb/datapath/netwatch.py: netlink events, debounced), looks every tunnel
backend's source up again in one batch (l4lb/datapath/sources.py) and
re-routes exactly the probes whose source moved. One that lost its route
fails its checks ("connect: no route from the LB to ...": client traffic to
it cannot leave either); one that got a route back runs from its source again.

The manager calls ``due()`` every round of its thread, and ``follow()`` when
it says so; everything here runs in that thread except ``_changed`` (the
watch's thread: it sets a flag and wakes the manager).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

log = logging.getLogger("l4lbd.health")

LOG_MOVES = 10   # distinct "old -> new" lines per change; the rest are summed up


class Rechecks(Protocol):
    def recheck_sources(self) -> dict[str, tuple[str | None, str | None]]: ...


class SourceFollower:
    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._due = threading.Event()
        self.watch: Any = None
        self.rechecks = 0

    def start(self) -> None:
        """Subscribe to changes: before the first lookups, so none falls between."""
        if self.watch is not None:
            return
        from l4lb.datapath.netwatch import NetWatch

        try:
            self.watch = NetWatch(self._changed)
        except OSError as e:
            log.error("health: cannot watch address and route changes (%s): tunnel probes keep the source "
                      "addresses they have until the daemon restarts", e)

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    def _changed(self) -> None:
        self._due.set()
        self._wake()

    def due(self) -> bool:
        return self._due.is_set()

    def follow(self, tunnel: Rechecks, routes: dict[str, tuple[int, str | None]],
               tunnel_probes: Mapping[str, str]) -> set[str]:
        """Look the sources up again; update ``routes`` (address -> (mark, source))
        in place and return the keys of the probes to re-route.
        ``tunnel_probes``: probe key -> backend address, for the tunnel probes."""
        self._due.clear()
        t0 = time.monotonic()
        moved = tunnel.recheck_sources()
        took = time.monotonic() - t0
        self.rechecks += 1
        if self.watch is not None:
            self.watch.cost(took)
        if not moved:
            log.debug("health: addresses or routes changed; probe sources unchanged (%.1f ms)", took * 1000)
            return set()
        for address, (_, new) in moved.items():
            if address in routes:
                routes[address] = (routes[address][0], new)
        keys = {k for k, a in tunnel_probes.items() if a in moved}
        _log_moves(moved, tunnel_probes, keys, took)
        return keys


def _text(source: str | None) -> str:
    return source if source is not None else "no route"


def _log_moves(moved: dict[str, tuple[str | None, str | None]], tunnel_probes: Mapping[str, str],
               keys: set[str], took: float) -> None:
    """One line per distinct old -> new source (backends and probes counted),
    at most LOG_MOVES of them, then a sum: a renumbering logs a line, not one per probe."""
    per_addr: dict[str, int] = {}
    for k in keys:
        a = tunnel_probes[k]
        per_addr[a] = per_addr.get(a, 0) + 1
    groups: dict[tuple[str | None, str | None], list[str]] = {}
    for address, change in moved.items():
        groups.setdefault(change, []).append(address)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), _text(kv[0][0]), _text(kv[0][1])))
    if len(ordered) > 1:
        log.warning("health: the LB's source address towards %d backends changed; %d tunnel probes re-routed",
                    len(moved), len(keys))
    for (old, new), addrs in ordered[:LOG_MOVES]:
        probes = sum(per_addr.get(a, 0) for a in addrs)
        sample = ", ".join(sorted(addrs)[:3]) + (", ..." if len(addrs) > 3 else "")
        log.warning("health: source address %s -> %s towards %d backend(s) (%s): %d tunnel probe(s) re-routed "
                    "(sources looked up in %.1f ms)", _text(old), _text(new), len(addrs), sample, probes,
                    took * 1000)
    if len(ordered) > LOG_MOVES:
        rest = ordered[LOG_MOVES:]
        log.warning("health: and %d more source change(s) for %d backend(s)", len(rest),
                    sum(len(a) for _, a in rest))
