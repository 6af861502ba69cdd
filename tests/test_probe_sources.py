"""The LB's source address towards backends (tunnel probes bind it), in a netns:
the batch lookup (l4lb/datapath/sources.py) answers what ``ip route get`` and a
probe's own TCP socket get, and the netlink watch (l4lb/datapath/netwatch.py)
calls once per burst of changes, debounced. No daemon; one namespace."""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from l4lb.datapath.netwatch import Debounce, NetWatch
from l4lb.datapath.sources import sources_towards
from l4lb.lab import netns

pytestmark = [pytest.mark.netns]

SETUP = """
link add a0 type veth peer name a0p
link add a1 type veth peer name a1p
link set lo up
link set a0 up
link set a0p up
link set a1 up
link set a1p up
addr add 192.0.2.1/24 dev a0
addr add 192.0.2.2/24 dev a0
addr add 198.51.100.1/24 dev a1
route add 203.0.113.0/28 via 192.0.2.254
route add 203.0.113.16/28 via 192.0.2.254 src 192.0.2.2
route add 203.0.113.32/28 dev a1 src 198.51.100.1
route add blackhole 203.0.113.48/28
route add unreachable 203.0.113.64/28
route add prohibit 203.0.113.80/28
route add throw 203.0.113.112/28
rule add to 203.0.113.96/28 lookup 100 pref 500
route add 203.0.113.96/28 via 198.51.100.254 table 100
rule add fwmark 0x4C480000/0xffff0000 lookup 19528 pref 1000
route add default dev a1 src 198.51.100.1 table 19528
"""
SETUP6 = """
addr add 2001:db8:1::1/64 dev a0 nodad
addr add 2001:db8:1::3/64 dev a0 nodad preferred_lft 0
addr add 2001:db8:9::1/64 dev a1 nodad
route add 2001:db8:2::/64 via 2001:db8:1::fe
route add 2001:db8:3::/64 dev a0 src 2001:db8:1::3
route add unreachable 2001:db8:4::/64
route add blackhole 2001:db8:5::/64
route add prohibit 2001:db8:6::/64
rule add to 2001:db8:7::/64 lookup 100 pref 500
route add 2001:db8:7::/64 via 2001:db8:9::fe table 100
rule add fwmark 0x4C480000/0xffff0000 lookup 19528 pref 1000
route add default dev a1 table 19528
"""
# What each case stands for, and the source it must get (None: no route).
CASES = {
    "192.0.2.5": "192.0.2.1",          # connected, two addresses on the interface: the primary
    "203.0.113.1": "192.0.2.1",        # via a gateway, no src
    "203.0.113.17": "192.0.2.2",       # via a gateway, src the secondary
    "203.0.113.33": "198.51.100.1",    # another interface, with src
    "203.0.113.49": None,              # blackhole
    "203.0.113.65": None,              # unreachable
    "203.0.113.81": None,              # prohibit
    "203.0.113.97": "198.51.100.1",    # a policy rule's table
    "203.0.113.113": None,             # throw, and nothing after it
    "203.0.113.200": None,             # no route (the probes' fwmark rule has a default: not for us)
    "2001:db8:1::5": "2001:db8:1::1",  # on-link: the preferred address, not the deprecated one
    "2001:db8:2::1": "2001:db8:1::1",  # via a gateway
    "2001:db8:3::1": "2001:db8:1::3",  # a route's src wins, deprecated or not
    "2001:db8:4::1": None,             # unreachable
    "2001:db8:5::1": None,             # blackhole
    "2001:db8:6::1": None,             # prohibit
    "2001:db8:7::1": "2001:db8:9::1",  # a policy rule's table
    "2001:db8:ff::1": None,            # no route
}


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    name = f"l4src-{os.getpid()}"
    netns.add(name)
    try:
        netns.run(name, "ip", "-batch", "-", input=SETUP)
        netns.run(name, "ip", "-6", "-batch", "-", input=SETUP6)
        yield name
    finally:
        netns.delete(name)


def route_get(ns: str, address: str) -> str | None:
    cp = netns.run(ns, "ip", "-j", "route", "get", address, check=False)
    return json.loads(cp.stdout)[0].get("prefsrc") if cp.returncode == 0 else None


def tcp_source(address: str) -> str | None:
    """What an unbound, unmarked TCP socket gets (it sends a SYN that goes nowhere)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as s:
        try:
            s.connect((address, 80))
        except BlockingIOError:
            pass
        except OSError:
            return None
        return s.getsockname()[0]


def test_batch_lookup_answers_what_ip_route_get_and_a_tcp_socket_get(ns: str) -> None:
    batch = netns.call_in_netns(ns, sources_towards, list(CASES))
    assert batch == CASES
    assert {a: route_get(ns, a) for a in CASES} == CASES
    assert {a: netns.call_in_netns(ns, tcp_source, a) for a in CASES} == CASES
    # Order does not matter (each answer is the kernel's afresh, not the socket's previous one).
    rev = netns.call_in_netns(ns, sources_towards, list(reversed(CASES)))
    assert rev == CASES


# --- debounce (pure) ------------------------------------------------------------------------------


def test_debounce_takes_a_burst_along_and_bounds_the_rate_under_churn() -> None:
    d = Debounce(settle=0.2, min_gap=2.0, cost_factor=10)
    assert d.due_at() is None
    d.changed(100.0)
    d.changed(100.1)                       # the same burst
    assert d.due_at() == pytest.approx(100.2)
    d.acted(100.2)
    assert d.due_at() is None
    d.changed(100.5)                       # churn: not before the gap
    assert d.due_at() == pytest.approx(102.2)
    for t in itertools.count(100.6, 0.1):  # changes keep coming: acted on all the same (not starved)
        if t > 102.2:
            break
        d.changed(t)
    assert d.due_at() == pytest.approx(102.2)
    d.acted(102.2)
    d.cost(0.5)                            # an expensive recheck stretches the gap to 10x its cost
    d.changed(102.3)
    assert d.due_at() == pytest.approx(107.2)


# --- the watch, on real netlink events --------------------------------------------------------------


def test_netwatch_calls_once_per_burst_of_address_and_route_changes(ns: str) -> None:
    calls: list[float] = []
    called = threading.Event()

    def on_change() -> None:
        calls.append(time.monotonic())
        called.set()

    w = netns.call_in_netns(ns, NetWatch, on_change, Debounce(settle=0.1, min_gap=0.3))
    try:
        assert not called.wait(0.3), "called without a change"
        # A burst: an address and a route with it, then both gone: one call.
        netns.run(ns, "ip", "-batch", "-", input="addr add 192.0.2.9/24 dev a0\n"
                  "route add 203.0.113.128/28 via 192.0.2.254 src 192.0.2.9\naddr del 192.0.2.9/24 dev a0\n")
        assert called.wait(5), "no call after an address change"
        time.sleep(0.5)
        assert len(calls) == 1 and w.events >= 1, (calls, w.events)
        # An IPv6 address deprecated (its preferred lifetime ends): announced too.
        called.clear()
        netns.run(ns, "ip", "-6", "addr", "change", "2001:db8:9::1/64", "dev", "a1", "nodad", "preferred_lft", "0")
        assert called.wait(5), "no call after an IPv6 address was deprecated"
        # A rule: announced as well.
        called.clear()
        netns.run(ns, "ip", "rule", "add", "to", "203.0.113.144/28", "lookup", "100", "pref", "600")
        assert called.wait(5), "no call after a rule was added"
    finally:
        w.close()
        netns.run(ns, "ip", "rule", "del", "pref", "600", check=False)
        netns.run(ns, "ip", "-6", "addr", "change", "2001:db8:9::1/64", "dev", "a1", "nodad", "preferred_lft",
                  "forever", check=False)


def test_netwatch_works_with_its_descriptor_above_1023(ns: str) -> None:
    """The daemon raises its descriptor limit and may hold thousands (perf rings,
    connections): the watch must not depend on select()'s 1024-descriptor ceiling."""
    held = [os.dup(0) for _ in range(1100)]
    called = threading.Event()
    try:
        w = netns.call_in_netns(ns, NetWatch, called.set, Debounce(settle=0.05, min_gap=0.1))
        try:
            assert w._sock.fileno() > 1023
            netns.run(ns, "ip", "route", "add", "203.0.113.160/28", "via", "192.0.2.254")
            assert called.wait(5), "no call after a route change (descriptor above 1023)"
        finally:
            w.close()
            netns.run(ns, "ip", "route", "del", "203.0.113.160/28", check=False)
    finally:
        for fd in held:
            os.close(fd)
