"""Notice when the box's addresses, routes or policy rules change (netlink events).

A thread listens on a netlink socket subscribed to the kernel's multicast
groups for links, IPv4/IPv6 addresses, routes and rules, and next-hop
objects, and calls ``on_change`` once per burst of changes, debounced
(``Debounce``). It never parses a message: any message, or a lost one (the
socket's buffer overflowed: ENOBUFS), means "something changed, look again".
That keeps it cheap when a routing daemon churns through thousands of routes
a second, and it is exact: every change that can move a source address
(an address added, removed or deprecated, a route or its ``src`` replaced, a
rule added, an interface going down) is announced on one of these groups.
Links are watched as well because IPv4 drops the routes of an interface that
goes down, or of a removed address, without a route message of its own.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Legacy multicast group bits (rtnetlink.h: RTMGRP_*, or 1 << (RTNLGRP_* - 1)).
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV4_RULE = 0x80
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RTNLGRP_IPV6_RULE_BIT = 1 << (19 - 1)
RTNLGRP_NEXTHOP_BIT = 1 << (32 - 1)
GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE | RTMGRP_IPV6_IFADDR
          | RTMGRP_IPV6_ROUTE | RTNLGRP_IPV6_RULE_BIT | RTNLGRP_NEXTHOP_BIT)

SETTLE = 0.2        # s after the first change of a burst: its other messages (an address and its routes) arrive
MIN_GAP = 2.0       # s between two calls at least, whatever the churn (a flapping route, a BGP daemon)
COST_FACTOR = 10    # ... and at least this many times what the last recheck cost: at most ~10% of a core


class Debounce:
    """When to act on changes (pure; times are monotonic seconds, given by the caller).

    The first change of a burst is acted on ``settle`` seconds later (so the
    rest of the burst is taken along), and never sooner than ``gap`` after the
    last action, where ``gap`` is ``min_gap`` or ``cost_factor`` times what
    that action cost, whichever is longer. Changes that keep coming (churn)
    are therefore acted on at a bounded rate, never starved: the due time runs
    from the first change not yet acted on, not from the last one."""

    def __init__(self, settle: float = SETTLE, min_gap: float = MIN_GAP, cost_factor: float = COST_FACTOR) -> None:
        self.settle, self.min_gap, self.cost_factor = settle, min_gap, cost_factor
        self._first: float | None = None     # first change not acted on yet
        self._last = -float("inf")           # last action
        self._gap = min_gap

    def changed(self, now: float) -> None:
        if self._first is None:
            self._first = now

    def due_at(self) -> float | None:
        """When to act (None: nothing to act on)."""
        if self._first is None:
            return None
        return max(self._first + self.settle, self._last + self._gap)

    def acted(self, now: float) -> None:
        """The action starts now: changes from here on wait for the next one."""
        self._first = None
        self._last = now

    def cost(self, seconds: float) -> None:
        """What the last action took: the next waits ``cost_factor`` times as long at least."""
        self._gap = max(self.min_gap, self.cost_factor * seconds)


class NetWatch:
    """Calls ``on_change()`` (from its own thread) after the box's addresses,
    routes or rules changed, debounced. Open it *before* reading what it
    guards, so that no change falls between the read and the subscription."""

    def __init__(self, on_change: Callable[[], None], debounce: Debounce | None = None) -> None:
        self.on_change = on_change
        self.debounce = debounce or Debounce()
        self.events = 0          # netlink messages (or overflows) seen: for tests and logs
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   socket.NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self._sock.bind((0, GROUPS))
        except OSError:
            self._sock.close()
            raise
        # poll, not select: a daemon holding many descriptors gets this one above 1023.
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)
        self._thread = threading.Thread(target=self._run, name="l4lb-netwatch", daemon=True)
        self._thread.start()

    def cost(self, seconds: float) -> None:
        with self._lock:
            self.debounce.cost(seconds)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _drain(self) -> bool:
        """Read everything queued; True if anything (or an overflow) was there."""
        seen = False
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return seen
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                data = b"overflow"   # messages were lost: a change all the same
            if not data:
                return seen
            seen = True
            self.events += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                due = self.debounce.due_at()
            wait = 1.0 if due is None else min(1.0, max(0.0, due - time.monotonic()))
            try:
                ready = self._poll.poll(wait * 1000)
                if ready and self._drain():
                    with self._lock:
                        self.debounce.changed(time.monotonic())
            except (OSError, ValueError) as e:
                if self._stop.is_set():
                    return
                log.error("watching address and route changes failed (%s); looking again in 1 s", e)
                time.sleep(1.0)
                with self._lock:
                    self.debounce.changed(time.monotonic())   # something may have been missed
                continue
            now = time.monotonic()
            with self._lock:
                due = self.debounce.due_at()
                fire = due is not None and now >= due
                if fire:
                    self.debounce.acted(now)
            if fire:
                try:
                    self.on_change()
                except Exception:  # noqa: BLE001 - the watch must outlive a failing consumer
                    log.exception("reacting to an address or route change failed")
