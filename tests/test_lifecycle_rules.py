"""The pure (or nearly) parts of the lifecycle work, each against an independent
oracle: what a start may do (guard.py), weights recovered from a Maglev table
(adopt.py, against maglev.build itself), route lookups on one dump (routes.py,
against the kernel's own `route get` in a namespace), address texts
(addrtext.py, against ipaddress), the instance lock (lock.py, held by another
process), and summarised conditions (logchange.py)."""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb import maglev
from l4lb.addrtext import exploded, exploded_packed, exploded_rows, from_exploded
from l4lb.lifecycle.adopt import desired_from_maps
from l4lb.lifecycle.guard import Action, MapFacts, Mode, StoreFacts, decide
from l4lb.lifecycle.lock import InstanceLock, LockHeld
from l4lb.logchange import Condition

SEED = "s33d"


# --- guard -------------------------------------------------------------------------------------------------------


def store(revision: int = 5, store_id: str | None = "A", fresh: bool = False) -> StoreFacts:
    return StoreFacts(Path("/var/lib/l4lbd/state.sqlite3"), fresh, None if fresh else store_id, revision, 3)


def maps(services: int = 3, rec: dict | None = None, current: bool = True) -> MapFacts:
    return MapFacts(Path("/sys/fs/bpf/l4lb/maps-x"), services, rec, current)


REC = {"store_id": "A", "revision": 5, "clean": True, "seed": SEED}


@pytest.mark.parametrize("facts, words", [
    ((store(fresh=True), maps(rec=REC)), ["is missing", "hold 3 services", "store A at revision 5"]),
    ((store(revision=0), maps(rec=REC)), ["empty (revision 0"]),
    ((store(store_id="B"), maps(rec=REC)), ["is not the one the maps were converged from", "--trust-store"]),
    ((store(revision=4), maps(rec=REC)), ["at revision 4, behind the maps", "--trust-store"]),
    ((store(fresh=True), maps(rec=None)), ["is missing"]),
])
def test_a_start_that_would_empty_or_roll_back_the_maps_is_refused(facts, words) -> None:
    d = decide(*facts, Mode.normal, SEED)
    assert d.refused
    for w in ("--adopt-datapath", "--reset", "Nothing was changed", *words):
        assert w in (d.refusal or ""), d.refusal


def test_what_a_start_may_do() -> None:
    # Same store, at or past the maps' revision: converge; trusted only when exactly it, clean, same seed.
    assert decide(store(), maps(rec=REC), Mode.normal, SEED) == decide(store(), maps(rec=REC), Mode.normal, SEED)
    assert decide(store(), maps(rec=REC), Mode.normal, SEED).trusted
    assert not decide(store(revision=6), maps(rec=REC), Mode.normal, SEED).trusted
    assert not decide(store(), maps(rec={**REC, "clean": False}), Mode.normal, SEED).trusted
    assert not decide(store(), maps(rec=REC), Mode.normal, "another seed").trusted
    assert not decide(store(), maps(rec=REC, current=False), Mode.normal, SEED).trusted
    # Maps without services (or none at all): nothing to lose.
    for m in (None, maps(services=0, rec=REC)):
        d = decide(store(fresh=True), m, Mode.normal, SEED)
        assert d.action is Action.converge and not d.refused
    # Maps of a daemon from before records: converge, and say so.
    d = decide(store(), maps(rec=None), Mode.normal, SEED)
    assert not d.refused and d.note and "no converged record" in d.note
    # The ways out.
    assert decide(store(fresh=True), maps(rec=REC), Mode.adopt, SEED).action is Action.adopt
    assert decide(store(store_id="B"), maps(rec=REC), Mode.reset, SEED).action is Action.reset
    d = decide(store(revision=4), maps(rec=REC), Mode.trust, SEED)
    assert d.action is Action.converge and not d.refused and not d.trusted
    d = decide(store(fresh=True), maps(rec=REC, current=False), Mode.adopt, SEED)
    assert d.refused and "other datapath settings" in (d.refusal or "")
    assert "an l4lb version with another map layout" in (d.refusal or "")


# --- adopt: weights from the table in force --------------------------------------------------------------------

M = 1021
MSEED = b"adopt-seed-1"


def in_force(weights: dict[str, int], down: set[str] = frozenset(), draining: set[str] = frozenset()) -> dict:
    """What Datapath.in_force() gives for one service built from ``weights`` (slot i+1 per backend)."""
    idents = {a: (ipaddress.ip_address(a).exploded, 80) for a in weights}
    slot = {a: i + 1 for i, a in enumerate(sorted(weights))}
    live = {idents[a]: w for a, w in weights.items() if a not in down and a not in draining}
    t = maglev.build(live, M, MSEED)
    ids = np.array([*(slot[next(a for a in weights if idents[a] == i)] for i in t.identities), 0], dtype=np.uint32)
    return {"key": ("198.51.100.10", 80, "tcp"), "flags": 0,
            "backends": {slot[a]: (idents[a], 1 if a in down else 0) for a in weights}, "table": ids[t.table]}


@pytest.mark.parametrize("weights, back", [
    ({"192.0.2.1": 100, "192.0.2.2": 100, "192.0.2.3": 100}, {"192.0.2.1": 100, "192.0.2.2": 100, "192.0.2.3": 100}),
    ({"192.0.2.1": 200, "192.0.2.2": 100, "192.0.2.3": 100}, {"192.0.2.1": 200, "192.0.2.2": 100, "192.0.2.3": 100}),
    ({"192.0.2.1": 3, "192.0.2.2": 1}, {"192.0.2.1": 300, "192.0.2.2": 100}),
    ({"192.0.2.1": 7, "192.0.2.2": 5, "192.0.2.3": 3}, {"192.0.2.1": 700, "192.0.2.2": 500, "192.0.2.3": 300}),
])
def test_weights_come_back_as_ratios_that_rebuild_the_table_in_force(weights, back) -> None:
    got = desired_from_maps([in_force(weights)], M, MSEED)
    (svc,) = got.state.services
    assert {b.address.compressed: b.weight for b in svc.backends} == back
    assert got.exact == 1 and not got.inexact
    assert svc.name == "tcp-198.51.100.10-80"


def test_states_ports_and_options_come_back() -> None:
    entry = in_force({"192.0.2.1": 100, "192.0.2.2": 100, "192.0.2.3": 100, "192.0.2.4": 100},
                     down={"192.0.2.3"}, draining={"192.0.2.4"})
    entry["flags"] = 1 | 2 | 4  # DNAT, client-IP affinity, drop without backends (no ping: no 8)
    b4 = next(s for s, (i, _) in entry["backends"].items() if i[0] == "192.0.2.4")
    entry["backends"][b4] = (("192.0.2.4", 8080), 0)  # a DNAT port
    (svc,) = desired_from_maps([entry], M, MSEED).state.services
    assert svc.options.l4_dnat and not svc.options.hash_src_port
    assert svc.options.no_backend == "drop" and not svc.options.answer_ping
    entry["flags"] = 1 | 8  # DNAT (the port above), answer pings
    (svc,) = desired_from_maps([entry], M, MSEED).state.services
    assert svc.options.answer_ping and svc.options.no_backend == "reject" and svc.options.hash_src_port
    assert {b.address.compressed: (b.state.value, b.port) for b in svc.backends} == {
        "192.0.2.1": ("active", None), "192.0.2.2": ("active", None), "192.0.2.3": ("maintenance", None),
        "192.0.2.4": ("draining", 8080)}


# --- routes: one dump against the kernel's route get ----------------------------------------------------------

ROUTES = [
    "link add r0 type veth peer name r0p", "link add r1 type veth peer name r1p",
    "link set r0 up", "link set r1 up", "link set r0p up", "link set r1p up", "link set lo up",
    "addr add 192.0.2.1/24 dev r0", "addr add 198.51.100.1/25 dev r1",
    "addr add 2001:db8:1::1/64 dev r0 nodad", "addr add 2001:db8:2::1/64 dev r1 nodad",
    "route add 203.0.113.0/24 via 192.0.2.9", "route add 203.0.113.128/25 via 198.51.100.9",
    "route add 203.0.113.200/32 via 192.0.2.7 metric 10", "route add 203.0.113.200/32 via 198.51.100.7 metric 5",
    "route add blackhole 203.0.113.64/26", "route add unreachable 198.51.100.200/32",
    "route add 198.51.100.128/25 nexthop via 192.0.2.2 nexthop via 198.51.100.2",
    "route add 192.0.2.128/25 via 192.0.2.3 mtu 1400",
    "route add throw 203.0.113.16/28", "route add 203.0.113.16/28 via 192.0.2.8 table default",
    "route add 2001:db8:b::/48 via 2001:db8:1::9", "route add 2001:db8:b:1::/64 via 2001:db8:2::9",
    "route add blackhole 2001:db8:dead::/48",
]


def _lookups(policy: bool) -> tuple[list, int]:
    from pyroute2 import IPRoute

    from l4lb.datapath.routes import UNSURE, RouteTable

    probes = ["192.0.2.5", "192.0.2.200", "198.51.100.5", "198.51.100.200", "203.0.113.5", "203.0.113.130",
              "203.0.113.200", "203.0.113.70", "203.0.113.20", "198.51.100.150", "192.0.2.1", "127.0.0.1", "8.8.8.8",
              "2001:db8:1::5", "2001:db8:b::5", "2001:db8:b:1::5", "2001:db8:dead::1", "2001:db8:2::1", "2001:db9::1"]
    out = []
    with IPRoute() as ipr:
        table = RouteTable(ipr, (4, 6))
        for text in probes:
            addr = ipaddress.ip_address(text)
            fast = table.lookup(addr)
            try:
                kernel = ipr.route("get", dst=text)[0]
                truth = (kernel["type"], kernel.get_attr("RTA_OIF"), kernel.get_attr("RTA_GATEWAY"))
            except Exception:  # noqa: BLE001 - unreachable/blackhole: the kernel answers with an error
                truth = None
            got = None if fast is None or fast is UNSURE else (fast.type, fast.oif, fast.gateway)
            out.append((text, fast is UNSURE, got, truth, None if fast in (None, UNSURE) else fast.mtu,
                        None if fast in (None, UNSURE) else fast.multipath))
        return out, table.asked


def test_route_lookups_on_one_dump_agree_with_the_kernel(tmp_path: Path) -> None:
    from l4lb.lab import netns

    ns = f"l4rt-{os.getpid()}"
    netns.add(ns)
    try:
        netns.ip_batch(ns, ROUTES)
        results, _ = netns.call_in_netns(ns, _lookups, False)
        for text, unsure, got, truth, mtu, multipath in results:
            assert not unsure, text  # a plain table: every answer from the dump
            if multipath:
                assert text == "198.51.100.150", text  # ECMP: the kernel picks per flow, the FIB must decide
                continue
            if truth is None or truth[0] != 1:
                assert got is None or got[0] != 1, (text, got, truth)  # blackhole, unreachable, local...
            else:
                assert got == truth, (text, got, truth)
        by = {r[0]: r for r in results}
        assert by["192.0.2.200"][4] == 1400  # the route's MTU
        assert by["198.51.100.150"][5]  # ECMP: marked, left to the FIB
        assert by["203.0.113.200"][2][2] == "198.51.100.7"  # lowest metric wins
        assert by["203.0.113.20"][2][2] == "192.0.2.8"  # thrown from main to the default table
        # The health probes' rule (fwmark/mask -> own table, as probes.py sets it): mark-0 lookups never match
        # it, so answers stay on the dump; a mark the mask clears, or `not fwmark`, does match: the kernel's.
        probe_rule = ["rule add fwmark 0x10000/0xffff0000 table 200 priority 1000",
                      "route add default dev r1 table 200", "route add ::/0 dev r1 table 200"]
        netns.ip_batch(ns, probe_rule)
        netns.run(ns, "ip", "-6", "rule", "add", "fwmark", "0x10000/0xffff0000", "table", "200", "priority", "1000")
        results, asked = netns.call_in_netns(ns, _lookups, False)
        assert not any(r[1] for r in results) and [r[2] for r in results] == [r[2] for r in by.values()]
        for matching in ("fwmark 0x10000/0xffff", "not fwmark 0x10000/0xffff0000"):
            netns.ip_batch(ns, [f"rule add {matching} table 200 priority 900"])
            results, asked = netns.call_in_netns(ns, _lookups, True)
            assert all(r[1] for r in results if ":" not in r[0]), matching  # IPv4: every lookup unsure
            netns.ip_batch(ns, ["rule del priority 900"])
        netns.ip_batch(ns, ["rule add from 192.0.2.0/24 table 100 priority 100"])
        results, asked = netns.call_in_netns(ns, _lookups, True)
        assert all(r[1] for r in results if ":" not in r[0]) and asked == 0  # IPv4: every lookup unsure now
    finally:
        netns.delete(ns)


# --- address texts ------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_address_texts_agree_with_ipaddress(addr) -> None:
    assert exploded(addr) == addr.exploded
    assert exploded_packed(addr.packed) == addr.exploded
    assert from_exploded(addr.exploded) == addr


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), max_size=40))
def test_address_rows_agree_with_ipaddress(addrs) -> None:
    """exploded_rows (a restart's 100,000 backend slots at once) as ipaddress spells each."""
    raw = np.frombuffer(b"".join(a.packed.ljust(16, b"\0") for a in addrs), dtype=np.uint8).reshape(len(addrs), 16)
    assert exploded_rows(raw, np.array([a.version == 4 for a in addrs], dtype=bool)) == [a.exploded for a in addrs]


# --- the instance lock ---------------------------------------------------------------------------------------------


def test_a_held_lock_names_its_holder_and_is_free_when_it_dies(tmp_path: Path) -> None:
    state = tmp_path / "state"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from l4lb.lifecycle.lock import InstanceLock\n"
        f"InstanceLock(Path({str(tmp_path)!r}), Path({str(state)!r})).acquire(); print('held', flush=True)\n"
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"another l4lbd \\(pid {holder.pid}\\) holds the lock on {tmp_path},"):
            InstanceLock(tmp_path, state).acquire()
        other = tmp_path / "other-bpffs"
        other.mkdir()
        with pytest.raises(LockHeld, match=f"pid {holder.pid}\\) holds the lock on {state}/l4lbd.lock"):
            InstanceLock(other, state).acquire()
        assert (state / "l4lbd.lock").read_text().strip() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    lock = InstanceLock(tmp_path, state)  # kill -9 left nothing to clean up
    lock.acquire()
    lock.release()


# --- summarised conditions ------------------------------------------------------------------------------------------


def test_a_condition_is_logged_when_it_changes_not_when_it_repeats(caplog: pytest.LogCaptureFixture) -> None:
    c = Condition(logging.getLogger("t"), "backends have no route", "every backend has a route again")
    with caplog.at_level(logging.INFO, logger="t"):
        lines = [c.update([f"192.0.2.{i}" for i in range(100)]) for _ in range(50)]
        lines += [c.update(["192.0.2.1"]), c.update(["192.0.2.1"]), c.update([])]
    said = [line for line in lines if line]
    assert said == ["100 backends have no route: 192.0.2.0, 192.0.2.1, 192.0.2.10, +97 more",
                    "1 backends have no route (was 100): 192.0.2.1", "every backend has a route again"]
    assert len(caplog.records) == 3
    time.sleep(0)
