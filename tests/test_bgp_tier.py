"""A tier of three l4lb boxes behind a real ECMP router, VIPs over BGP (issue 13).

One lab for the module: a router namespace running BIRD 2 (BFD, ``merge
paths on``, L4 ECMP hashing), a client behind it, three LB namespaces each
running l4lbd + its own BIRD, three shared backends. Every box gets the same
seed and the same document. What is proven, with real BGP sessions, real
kernel routes and real traffic:

* every box announces; the router installs one route per VIP with a next hop
  per box, and the boxes' digests are identical;
* flows spread over the boxes, and each flow's backend is the same whichever
  box handles it;
* kill -9 of one l4lbd (and its restart) withdraws nothing from either router and
  fails no request (curl over IPv4 and IPv6);
* a service without a usable backend on one box is withdrawn from that box only
  (and ``fleet status`` flags that box's table);
* ``box drain`` moves new traffic off the box while its route still exists
  (graceful shutdown), then withdraws it; ``undrain`` brings it back;
* losing a box (its link down) is detected by BFD, the router drops its next
  hop, and 100 long-lived connections, some of which ECMP moves to the
  surviving boxes, keep working (0 broken). The convergence time is printed;
* ``l4lbd --detach`` (stopping for good) withdraws the box's VIPs;
* health checks in the tier: a box that loses its routes to the backends (the
  others keep theirs) fails its tunnel checks with "no route"; with
  ``on_all_down: fail_closed`` it withdraws the VIP, the router drops exactly its
  next hop and the other boxes serve every request, and it comes back with the
  routes; with ``fail_open`` it keeps announcing and says it is failing open.

FRR: a second router runs FRR 8.4 with the README's FRR example, peering
with the same boxes: it installs the same ECMP routes (IPv6 via the boxes'
global addresses), carries traffic to every box, moves off a draining box in
its graceful phase and drops a lost box by BFD.

IPv6 (the lab is dual-stack): every box also peers with the router over IPv6
and announces the IPv6 VIPs there; the router's IPv6 route per VIP has a next
hop per box; UDP and TCP (curl -6) flows reach the backends (IP6IP6) through
several boxes, replies go straight to the client, each flow keeps its backend
whichever box handles it; an IPv6 VIP without a usable backend on one box is
withdrawn from that box only (``/v1/bgp``, ``fleet status``); drain, box loss
and ``--detach`` withdraw the IPv6 VIPs as well.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from l4lb.lab import netns
from l4lb.lab.frr import FrrRouter
from l4lb.lab.tier import BFD_MS, BFD_MULT, Box, Tier
from l4lb.lab.topology import VIPS4, Lab

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

L4LBCTL = str(Path(os.sys.executable).with_name("l4lbctl"))
UDP = 5353
# Two more IPv4 VIPs held by the backends, each with a health-checked service of its own
# (on_all_down fail_closed and fail_open), put on the tier by TestHealthInTheTier only.
HC_CLOSED, HC_OPEN = "198.51.100.12", "198.51.100.13"


@pytest.fixture(scope="module")
def tier(bpffs: Path, lab_decap):
    if shutil.which("bird") is None:
        pytest.fail("BIRD 2 is not installed: run scripts/setup.sh (apt-get install bird2)", pytrace=False)
    if FrrRouter.missing():
        pytest.fail(FrrRouter.missing(), pytrace=False)
    with Lab(clients=1, backends=3, lbs=3, router=True, routers=2, prefix="l4bgp", decap=lab_decap,
             vips4=(*VIPS4, HC_CLOSED, HC_OPEN)) as lab:
        addrs = [h.ip4 for h in lab.backends.values()]
        addrs6 = [h.ip6 for h in lab.backends.values()]
        services = [
            {"name": "web10", "vip": lab.vips4[0], "port": 80, "backends": [{"address": a} for a in addrs]},
            {"name": "dns10", "vip": lab.vips4[0], "port": UDP, "protocol": "udp",
             "backends": [{"address": a} for a in addrs]},
            {"name": "web11", "vip": lab.vips4[1], "port": 80, "backends": [{"address": a} for a in addrs]},
            # IPv6 VIPs with IPv6 backends (IP6IP6), announced over the IPv6 sessions.
            {"name": "web6", "vip": lab.vips6[0], "port": 80, "backends": [{"address": a} for a in addrs6]},
            {"name": "dns6", "vip": lab.vips6[0], "port": UDP, "protocol": "udp",
             "backends": [{"address": a} for a in addrs6]},
            {"name": "web61", "vip": lab.vips6[1], "port": 80, "backends": [{"address": a} for a in addrs6]},
        ]
        work = Path(tempfile.mkdtemp(prefix="l4bgp-"))
        t = Tier(lab, work, bpffs, services)
        try:
            t.up()
            for prefix, hops in every_prefix(t):
                t.wait_nexthops(prefix, hops)
                t.wait_nexthops(prefix, hops, router="router2")
            yield t
        finally:
            t.down()
            shutil.rmtree(work, ignore_errors=True)


def all_boxes(t: Tier) -> set[str]:
    return {b.ip for b in t.boxes.values()}


def every_prefix(t: Tier) -> list[tuple[str, set[str]]]:
    """Every VIP prefix of the tier's services, with the router's next hops when every box announces it."""
    return ([(f"{v}/32", t.addresses(4)) for v in VIPS4]
            + [(f"{v}/128", t.addresses(6)) for v in t.lab.vips6])


def ctl(t: Tier, *args: str, boxes: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    socks = [a for n in (boxes or list(t.boxes)) for a in ("-s", str(t.boxes[n].l4lbd.socket))]
    return subprocess.run([L4LBCTL, *socks, *args], capture_output=True, text=True, timeout=60)


def udp_backends(t: Tier, ports: range) -> dict[int, str | None]:
    """One datagram per client port through the VIP; which backend answered each."""
    lab = t.lab
    out = {}
    for p in ports:
        r = lab.udp("c1", lab.vips4[0], port=UDP, sport=p)
        out[p] = r.backend if r else None
    return out


def packets(t: Tier, box: str, service: str) -> int:
    with t.boxes[box].l4lbd.client() as c:
        return next(s["packets"] for s in c.get("/v1/stats").json()["services"] if s["name"] == service)


def test_every_box_announces_and_the_router_has_one_next_hop_per_box(tier: Tier) -> None:
    for prefix, hops in every_prefix(tier):
        assert tier.nexthops(prefix) == hops, prefix
    for name, box in tier.boxes.items():
        want = {prefix: "announced" for prefix, _ in every_prefix(tier)}
        deadline = time.monotonic() + 5  # the daemon reads the speaker back every poll_interval
        with box.l4lbd.client() as c:
            while True:
                bgp = c.get("/v1/bgp").json()
                if {p["prefix"]: p["state"] for p in bgp["prefixes"]} == want:
                    break
                assert time.monotonic() < deadline, (name, bgp)
                time.sleep(0.1)
            status = c.get("/v1/status").json()
            metrics = c.get("/metrics").text
        # One session per family and router (BIRD's and FRR's), each over its own family.
        routers = (tier.lab.router_ip4, tier.lab.router_ip6, *tier.lab.router2_ips)
        assert {s["peer"]: s["bgp_state"] for s in bgp["sessions"]} == dict.fromkeys(routers, "Established"), (
            name, bgp)
        assert status["bgp"]["announced"] == sorted(want)
        for peer in (tier.lab.router_ip4, tier.lab.router_ip6):
            assert f'l4lb_bgp_session_established{{peer="{peer}",state="Established"}} 1.0' in metrics
        assert 'l4lb_bgp_prefix_announced{prefix="198.51.100.10/32",reason="serving",state="announced"} 1.0' in metrics
        assert ('l4lb_bgp_prefix_announced{prefix="2001:db8:0:100::10/128",reason="serving",state="announced"} 1.0'
                in metrics)
    cp = ctl(tier, "fleet", "status")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.count(" same") == 3 and "DIFFERS" not in cp.stdout, cp.stdout
    table = ctl(tier, "status", boxes=["lb2"])
    assert ("Announced:     198.51.100.10/32, 198.51.100.11/32, 2001:db8:0:100::10/128, 2001:db8:0:100::11/128"
            in table.stdout), table.stdout


def test_frr_router_installs_the_same_ecmp_routes_and_carries_traffic_to_every_box(tier: Tier) -> None:
    lab, frr = tier.lab, tier.frr
    assert frr is not None
    for prefix, hops in every_prefix(tier):
        assert tier.nexthops(prefix, "router2") == hops, (prefix, frr.bgp_route(prefix))
    # zebra installed them (proto bgp), one route with a next hop per box; IPv6 via global addresses.
    routes = netns.ip(lab.ns_of("router2"), "-6", "route", "show", f"{lab.vips6[0]}/128").stdout
    assert "proto bgp" in routes and "fe80" not in routes, routes
    summary = frr.vtysh("show bgp summary")
    for state in ("Idle", "Connect", "Active", "OpenSent", "OpenConfirm"):
        assert state not in summary, summary
    bfd = frr.vtysh("show bfd peers brief")
    assert sum(line.split()[-1:] == ["up"] for line in bfd.splitlines()) == 2 * len(tier.boxes), bfd
    # Traffic through FRR's router: the client routes the VIP via router2 for a moment.
    ports = range(43100, 43160)
    before = {n: packets(tier, n, "dns10") for n in tier.boxes}
    lab.run("c1", "ip", "route", "replace", f"{lab.vips4[0]}/32", "via", lab.router2_ips[0])
    try:
        answered = udp_backends(tier, ports)
    finally:
        lab.run("c1", "ip", "route", "del", f"{lab.vips4[0]}/32")
    assert None not in answered.values(), answered
    got = {n: packets(tier, n, "dns10") - before[n] for n in tier.boxes}
    assert sum(got.values()) == len(ports) and all(v > 0 for v in got.values()), got


def test_flows_spread_over_boxes_and_keep_their_backend_whichever_box(tier: Tier) -> None:
    lab, ports = tier.lab, range(41000, 41060)
    before = {n: packets(tier, n, "dns10") for n in tier.boxes}
    via_router = udp_backends(tier, ports)
    assert None not in via_router.values(), via_router
    got = {n: packets(tier, n, "dns10") - before[n] for n in tier.boxes}
    assert sum(got.values()) == len(ports) and all(v > 0 for v in got.values()), got
    # The router's own hash says which box had each flow; the boxes' counters agree.
    c1 = lab.clients["c1"].ip4
    chosen = {p: tier.box_of_flow(c1, p, lab.vips4[0], UDP) for p in ports}
    assert {n: list(chosen.values()).count(n) for n in tier.boxes} == got
    # The same flows pinned to each box in turn (a /32 route on the client) land on the same backends.
    for name, box in tier.boxes.items():
        lab.run("c1", "ip", "route", "replace", f"{lab.vips4[0]}/32", "via", box.ip)
        try:
            assert udp_backends(tier, ports) == via_router, f"{name} picks other backends"
        finally:
            lab.run("c1", "ip", "route", "del", f"{lab.vips4[0]}/32")


def forwarded6(t: Tier, host: str) -> int:
    """IPv6 datagrams the kernel of ``host`` forwarded (XDP_TX does not count: the kernel never sees those)."""
    def read() -> int:
        text = Path("/proc/thread-self/net/snmp6").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("Ip6OutForwDatagrams")))
    return t.lab.call(host, read)


def handed_for_neighbour(t: Tier, box: str) -> int:
    """Packets the box's datapath gave its kernel to resolve a next hop on the way (NO_NEIGH)."""
    with t.boxes[box].l4lbd.client() as c:
        reasons = c.get("/v1/stats").json()["reasons"]
    assert any("neigh" in k for k in reasons), sorted(reasons)
    return sum(v["packets"] for k, v in reasons.items() if "neigh" in k)


def test_ipv6_flows_spread_over_boxes_reach_the_backends_and_replies_go_direct(tier: Tier) -> None:
    lab, vip, ports = tier.lab, tier.lab.vips6[0], range(43000, 43040)
    c1 = lab.clients["c1"].ip6
    before = {n: packets(tier, n, "dns6") for n in tier.boxes}
    fwd = {h: forwarded6(tier, h) for h in ["router", *tier.boxes]}
    neigh = {n: handed_for_neighbour(tier, n) for n in tier.boxes}
    replies = {p: lab.udp("c1", vip, port=UDP, sport=p) for p in ports}
    assert all(r is not None and r.backend in lab.backends and r.peer[0] == vip for r in replies.values()), replies
    got = {n: packets(tier, n, "dns6") - before[n] for n in tier.boxes}
    # (No `ip route get` prediction here as for IPv4: the sender's kernel gives an IPv6 skb a
    # random-seeded L4 hash for its flow label, and the router, on the same kernel, reuses it.)
    assert sum(got.values()) == len(ports) and all(v > 0 for v in got.values()), got
    # Replies go from the backend straight to the client: the router forwarded the requests
    # only, and a box's kernel forwarded only what its datapath handed it for neighbour
    # resolution (requests leave a box by XDP_TX, which the kernel does not count).
    after = {h: forwarded6(tier, h) for h in fwd}
    assert after["router"] - fwd["router"] == len(ports), (fwd, after)
    assert {n: after[n] - fwd[n] for n in tier.boxes} == {n: handed_for_neighbour(tier, n) - neigh[n]
                                                          for n in tier.boxes}, (fwd, after)
    b1 = lab.backends["b1"]
    route = json.loads(lab.run(b1.ns, "ip", "-j", "-6", "route", "get", c1, "from", vip).stdout)[0]
    assert "gateway" not in route and route["dev"] == "eth0", route
    # TCP (curl -6): every connection served, the backend sees the client's own address.
    web_before = {n: packets(tier, n, "web6") for n in tier.boxes}
    for _ in range(15):   # ephemeral client ports: a fixed one can be in TIME_WAIT from an earlier test
        r = lab.curl("c1", lab.url(vip), args=["-6"])
        assert r.ok and r.backend in lab.backends, (r.returncode, r.stderr)
        assert (r.fields["client_ip"], r.fields["local_ip"]) == (c1, vip), r.fields
    via = {n for n in tier.boxes if packets(tier, n, "web6") > web_before[n]}
    assert len(via) > 1, via
    # The same flows pinned to each box in turn (a /128 on the client) land on the same backends.
    first = {p: r.backend for p, r in replies.items()}
    for name, box in tier.boxes.items():
        lab.run("c1", "ip", "-6", "route", "replace", f"{vip}/128", "via", box.ip6)
        try:
            assert {p: lab.udp("c1", vip, port=UDP, sport=p).backend for p in ports} == first, name
        finally:
            lab.run("c1", "ip", "-6", "route", "del", f"{vip}/128")


class Traffic(threading.Thread):
    """curl through a VIP, one connection after another, until stopped."""

    def __init__(self, t: Tier, vip: str) -> None:
        super().__init__(daemon=True)
        self.t, self.url = t, t.lab.url(vip)
        self.ok, self.failed = 0, []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            r = self.t.lab.curl("c1", self.url)
            if r.ok:
                self.ok += 1
            else:
                self.failed.append(r.stderr.strip() or r.fields)


class HopWatch(threading.Thread):
    """Polls a router's next hops for a prefix; records every distinct set."""

    def __init__(self, t: Tier, prefix: str, router: str = "router") -> None:
        super().__init__(daemon=True)
        self.t, self.prefix, self.router = t, prefix, router
        self.seen: list[set[str]] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            hops = self.t.nexthops(self.prefix, self.router)
            if not self.seen or self.seen[-1] != hops:
                self.seen.append(hops)
            time.sleep(0.02)


def test_kill9_of_l4lbd_withdraws_nothing_and_fails_no_request(tier: Tier) -> None:
    box, lab = tier.boxes["lb2"], tier.lab
    include = box.include.read_text()
    prefix, prefix6 = f"{lab.vips4[0]}/32", f"{lab.vips6[0]}/128"
    traffic = [Traffic(tier, lab.vips4[0]), Traffic(tier, lab.vips6[0])]   # curl over IPv4 and IPv6
    watches = {(p, r): HopWatch(tier, p, r) for p in (prefix, prefix6) for r in ("router", "router2")}
    threads = [*traffic, *watches.values()]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        box.l4lbd.kill9()
        time.sleep(1.5)                      # no daemon at all; its BIRD goes on
        box.l4lbd.start()                    # compiles, converges, attaches, then plans
        time.sleep(1.5)
    finally:
        for t in threads:
            t.stop_flag.set()
        for t in threads:
            t.join(60)
    for t in traffic:
        assert t.failed == [] and t.ok > 0, (t.url, t.failed[:3])
    for (p, router), w in watches.items():
        want = all_boxes(tier) if p == prefix else tier.addresses(6)
        assert w.seen == [want], f"{router}'s next hops for {p} changed: {w.seen}"
    assert box.include.read_text() == include


def drain_every_backend(box: Box, service: str, addresses: list[str]) -> dict[str, Any]:
    """Drain every backend of ``service`` on one box only; the box's document before it."""
    with box.l4lbd.client() as c:
        doc = c.get("/v1/state").json()
        for a in addresses:
            r = c.patch(f"/v1/services/{service}/backends/{a}", json={"state": "draining"})
            assert r.status_code == 200, r.text
    return doc


def test_service_without_usable_backend_is_withdrawn_from_that_box_only(tier: Tier) -> None:
    vip10, vip11 = (f"{v}/32" for v in VIPS4)
    box = tier.boxes["lb3"]
    doc = drain_every_backend(box, "web11", [b.ip4 for b in tier.lab.backends.values()])
    try:
        tier.wait_nexthops(vip11, all_boxes(tier) - {box.ip})
        assert tier.nexthops(vip10) == all_boxes(tier)
        with box.l4lbd.client() as c:
            p11 = next(p for p in c.get("/v1/bgp").json()["prefixes"] if p["prefix"] == vip11)
        assert (p11["state"], p11["reason"]) == ("withdrawn", "no usable backend: web11")
        cp = ctl(tier, "fleet", "status")
        boxes_table, _, prefixes_table = cp.stdout.partition("\n\n")
        rows = {line.split()[0]: line for line in boxes_table.splitlines()[1:]}
        announced_by = {line.split()[0]: line.split()[1:] for line in prefixes_table.splitlines()[1:]}
        assert announced_by[vip11] == ["2/3", f"unix:{box.l4lbd.socket}"] and announced_by[vip10] == ["3/3"], cp.stdout
        assert cp.returncode == 1 and f"boxes differ: unix:{box.l4lbd.socket}" in cp.stderr, cp.stdout + cp.stderr
        assert rows.pop(f"unix:{box.l4lbd.socket}").endswith("DIFFERS: web11 table"), cp.stdout
        assert all(r.endswith("same") for r in rows.values()), cp.stdout
    finally:
        # One document to the whole tier: the other boxes have nothing to change.
        path = box.dir / "state.json"
        path.write_text(json.dumps({"services": doc["services"]}))
        cp = ctl(tier, "apply", "-f", str(path))
        assert cp.returncode == 0 and cp.stdout.count("no changes") == 2, cp.stdout + cp.stderr
    tier.wait_nexthops(vip11, all_boxes(tier))
    assert ctl(tier, "fleet", "status").returncode == 0
    # A refused document stops the rollout at the first box; the others are not tried.
    path.write_text(json.dumps({"services": [{"name": "bad", "vip": "198.51.100.10", "port": 0}]}))
    cp = ctl(tier, "apply", "-f", str(path))
    assert cp.returncode == 1 and "not tried: unix:" in cp.stderr and cp.stderr.count("unix:") == 3, cp.stderr
    cp = ctl(tier, "apply", "--continue", "-f", str(path))
    assert cp.returncode == 1 and cp.stdout.count("FAILED") == 3 and "not tried" not in cp.stderr, cp.stderr


def test_ipv6_vip_without_usable_backend_is_withdrawn_from_that_box_only(tier: Tier) -> None:
    vip60, vip61 = (f"{v}/128" for v in tier.lab.vips6)
    box = tier.boxes["lb2"]
    doc = drain_every_backend(box, "web61", [b.ip6 for b in tier.lab.backends.values()])
    try:
        tier.wait_nexthops(vip61, tier.addresses(6) - {box.ip6})
        for prefix, hops in every_prefix(tier):
            if prefix != vip61:
                assert tier.nexthops(prefix) == hops, prefix
        with box.l4lbd.client() as c:
            prefixes = {p["prefix"]: p for p in c.get("/v1/bgp").json()["prefixes"]}
        assert (prefixes[vip61]["state"], prefixes[vip61]["reason"]) == ("withdrawn", "no usable backend: web61")
        assert prefixes[vip60]["state"] == "announced", prefixes[vip60]
        cp = ctl(tier, "fleet", "status")
        rows = {line.split()[0]: line.split()[1:] for line in cp.stdout.partition("\n\n")[2].splitlines()[1:]}
        assert rows[vip61] == ["2/3", f"unix:{box.l4lbd.socket}"], cp.stdout
        assert rows[vip60] == ["3/3"] and rows["198.51.100.11/32"] == ["3/3"], cp.stdout
        js = json.loads(ctl(tier, "-o", "json", "fleet", "status").stdout)
        assert js["prefixes"][vip61] == sorted(f"unix:{b.l4lbd.socket}" for b in tier.boxes.values() if b is not box)
    finally:
        path = box.dir / "state6.json"
        path.write_text(json.dumps({"services": doc["services"]}))
        cp = ctl(tier, "apply", "-f", str(path), boxes=["lb2"])
        assert cp.returncode == 0, cp.stdout + cp.stderr
    tier.wait_nexthops(vip61, tier.addresses(6))


# --- health checks in the tier: a box that cannot reach its backends ----------------------------------------

# fall x interval (1.5 s) well beyond the route watch's reaction (0.2 s): the checks go down because
# they fail with "no route", not because the checks in flight at the change timed out.
HC_INTERVAL, HC_FALL, HC_RISE = 0.5, 3, 2


def hc_services(lab: Lab) -> list[dict[str, Any]]:
    """A service on each of the two extra VIPs, tunnel tcp checks to VIP:80 on every backend."""
    backends = [{"address": b.ip4} for b in lab.backends.values()]
    check = {"type": "tcp", "interval": HC_INTERVAL, "rise": HC_RISE, "fall": HC_FALL}
    return [{"name": "hc12", "vip": HC_CLOSED, "port": 80, "backends": backends,
             "health": {**check, "on_all_down": "fail_closed"}},
            {"name": "hc13", "vip": HC_OPEN, "port": 80, "backends": backends,
             "health": {**check, "on_all_down": "fail_open"}}]


def hc_report(box: Box, service: str) -> dict[str, Any]:
    """``service``'s entry of the box's GET /v1/health, with the report's own fail_open list."""
    with box.l4lbd.client() as c:
        rep = c.get("/v1/health").json()
    svc = next(s for s in rep["services"] if s["name"] == service)
    return {**svc, "report_fail_open": rep["fail_open"], "backends": {b["address"]: b for b in svc["backends"]}}


def bgp_prefix(box: Box, prefix: str) -> dict[str, Any]:
    with box.l4lbd.client() as c:
        return next(p for p in c.get("/v1/bgp").json()["prefixes"] if p["prefix"] == prefix)


def wait_until(what: str, ok: Callable[[], bool], timeout: float, box: Box | None = None,
               t: Tier | None = None) -> float:
    """Poll ``ok`` every 50 ms; the seconds it took, or AssertionError naming ``what`` (and what the box says)."""
    t0 = time.monotonic()
    while not ok():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s" + (hc_said(box, t) if box else ""))
        time.sleep(0.05)
    return time.monotonic() - t0


def hc_said(box: Box, t: Tier | None) -> str:
    """What a box says about its checks (for a failure message)."""
    with box.l4lbd.client() as c:
        rep = c.get("/v1/health").json()
    # Whether the checks still run (checks, last_check_at) and what they say, per backend.
    checks = {s["name"]: {b["address"]: {k: b.get(k) for k in ("health", "checks", "last_check_at", "last_result",
                                                               "last_error", "not_run", "not_run_reason", "source")}
                          for b in s["backends"]}
              for s in rep["services"] if s["name"] in ("hc12", "hc13")}
    routes = t.lab.run(box.ns, "ip", "route", "show").stdout if t is not None else ""
    return (f"\n--- {box.name}'s checks (at {time.time():.3f}) ---\n{json.dumps(checks, indent=1)}\n"
            f"tunnel: {rep.get('tunnel')}\nchecks: {rep.get('checks')}\n"
            f"--- {box.name}'s routes ---\n{routes}--- {box.name}'s l4lbd ---\n{box.l4lbd.log_tail(30)}")


def every_backend(box: Box, service: str, health: str) -> bool:
    return all(b["health"] == health for b in hc_report(box, service)["backends"].values())


def failing_for_no_route(box: Box, service: str, addresses: list[str]) -> dict[str, Any]:
    """Wait until every backend of ``service`` is down on ``box`` and its checks fail for want of a
    route (not "not run"); the service's health entry then.

    The first failures may be timeouts: a check in flight when the route went lost its packets.
    Once the box's route watch has re-routed the probes (0.2 s after the change when quiet,
    later under load), every check fails at once with "no route"."""
    want = {a: ("down", f"connect: no route from the LB to {a}", None) for a in addresses}
    got: dict[str, Any] = {}

    def now() -> bool:
        got.update(hc_report(box, service))
        return {a: (b["health"], b["last_error"], b["not_run_reason"]) for a, b in got["backends"].items()} == want
    try:
        wait_until(f"{box.name}: {service}'s checks fail with no route", now, 10, box)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{got}") from None
    return got


@contextmanager
def unreachable_from(t: Tier, box: Box, addresses: list[str]) -> Iterator[float]:
    """The box (alone) loses its routes to ``addresses`` (``ip route add unreachable``); yields the
    monotonic time of the change; the routes come back on the way out."""
    t0 = time.monotonic()
    for a in addresses:
        t.lab.run(box.ns, "ip", "route", "add", "unreachable", f"{a}/32")
    try:
        yield t0
    finally:
        for a in addresses:
            t.lab.run(box.ns, "ip", "route", "del", "unreachable", f"{a}/32", check=False)


@pytest.fixture(scope="class")
def hc(tier: Tier) -> Iterator[list[str]]:
    """The two health-checked services applied to every box (one document, ``l4lbctl apply``),
    every check passing and both VIPs announced by every box; the tier's document again after."""
    with tier.boxes["lb"].l4lbd.client() as c:
        services = c.get("/v1/state").json()["services"]
    path = tier.workdir / "hc.json"
    path.write_text(json.dumps({"services": services + hc_services(tier.lab)}))
    cp = ctl(tier, "apply", "-f", str(path))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    t0 = time.monotonic()
    try:
        # Each box compiles its probe tunnel once a check needs it (seconds); then every probe reports.
        for name, box in tier.boxes.items():
            wait_until(f"{name}: every backend of hc12 and hc13 up",
                       lambda box=box: every_backend(box, "hc12", "up") and every_backend(box, "hc13", "up"),
                       120, box)
        for vip in (HC_CLOSED, HC_OPEN):
            tier.wait_nexthops(f"{vip}/32", all_boxes(tier))
        print(f"\nhealth-checked services on every box, checks up and announced in {time.monotonic() - t0:.1f} s")
        yield [b.ip4 for b in tier.lab.backends.values()]
    finally:
        path.write_text(json.dumps({"services": services}))
        cp = ctl(tier, "apply", "-f", str(path))
        assert cp.returncode == 0, cp.stdout + cp.stderr
        for vip in (HC_CLOSED, HC_OPEN):
            tier.wait_nexthops(f"{vip}/32", set())


class TestHealthInTheTier:
    """Health checks drain a box's backends by themselves, and BGP acts on it: a box that
    loses its routes to the backends (the others do not) fails its tunnel checks with
    "no route", and with ``on_all_down: fail_closed`` withdraws the VIP, the other boxes
    taking its traffic; with ``fail_open`` it keeps announcing and says so (README, BGP:
    "Every backend down by this box's checks")."""

    def test_fail_closed_a_box_that_cannot_reach_its_backends_leaves_ecmp_and_comes_back(
            self, tier: Tier, hc: list[str]) -> None:
        lab, box = tier.lab, tier.boxes["lb3"]
        prefix, others = f"{HC_CLOSED}/32", all_boxes(tier) - {box.ip}
        watch = HopWatch(tier, prefix)
        watch.start()
        try:
            with unreachable_from(tier, box, hc) as t0:
                wait_until(f"the router drops {box.name}'s next hop for {prefix}",
                           lambda: tier.nexthops(prefix) == others, 30, box, tier)
                gone = time.monotonic() - t0
                rep = failing_for_no_route(box, "hc12", hc)
                assert not rep["fail_open"] and rep["on_all_down"] == "fail_closed", rep
                p = bgp_prefix(box, prefix)
                assert (p["state"], p["reason"]) == ("withdrawn", "no usable backend: hc12"), p
                # Only this box: the others' checks pass and they announce it; nothing else moved.
                for other in (b for b in tier.boxes.values() if b is not box):
                    assert every_backend(other, "hc12", "up"), other.name
                    p = bgp_prefix(other, prefix)
                    assert (p["state"], p["reason"]) == ("announced", "serving"), (other.name, p)
                for p, hops in every_prefix(tier):
                    assert tier.nexthops(p) == hops, p
                # Every request through the router is served, none reaches the box that cannot serve.
                before = {n: packets(tier, n, "hc12") for n in tier.boxes}
                # Ephemeral client ports (each connection a new flow for the router's L4 hash): a fixed
                # --local-port can still be held by an earlier connection in TIME_WAIT (curl: bind failed).
                for i in range(24):
                    r = lab.curl("c1", lab.url(HC_CLOSED))
                    assert r.ok and r.backend in lab.backends, (i, r.returncode, r.stderr)
                got = {n: packets(tier, n, "hc12") - before[n] for n in tier.boxes}
                assert got[box.name] == 0 and all(v > 0 for n, v in got.items() if n != box.name), got
            t1 = time.monotonic()
            tier.wait_nexthops(prefix, all_boxes(tier), timeout=30)
            back = time.monotonic() - t1
            # One backend up is enough to announce again; the others rise in their own time.
            wait_until("lb3: every backend of hc12 up again", lambda: every_backend(box, "hc12", "up"), 30, box)
            p = bgp_prefix(box, prefix)
            assert (p["state"], p["reason"]) == ("announced", "serving"), p
        finally:
            watch.stop_flag.set()
            watch.join(30)
        print(f"\nbox lost its routes to the backends: router dropped its next hop {gone * 1000:.0f} ms after the "
              f"route change (checks every {HC_INTERVAL:g} s, fall {HC_FALL}); back {back * 1000:.0f} ms after "
              f"the routes returned (rise {HC_RISE})")
        # The router's next hops: every box, then exactly that box gone, then every box again.
        assert watch.seen == [all_boxes(tier), others, all_boxes(tier)], watch.seen

    def test_fail_open_the_box_keeps_announcing_and_says_it_is_failing_open(
            self, tier: Tier, hc: list[str]) -> None:
        box, prefix = tier.boxes["lb3"], f"{HC_OPEN}/32"
        watch = HopWatch(tier, prefix)
        watch.start()
        try:
            with unreachable_from(tier, box, hc):
                wait_until("lb3 fails hc13 open", lambda: hc_report(box, "hc13")["fail_open"], 30, box, tier)
                rep = failing_for_no_route(box, "hc13", hc)
                assert rep["fail_open"] and "hc13" in rep["report_fail_open"], rep
                # The planner runs in its own thread: its reason follows the health change.
                wait_until("lb3's reason for hc13", lambda: bgp_prefix(box, prefix)["reason"]
                           == "serving (failing open: hc13)", 10, box)
                assert bgp_prefix(box, prefix)["state"] == "announced"
                with box.l4lbd.client() as c:
                    metrics = c.get("/metrics").text
                assert 'l4lb_service_fail_open{service="hc13"} 1.0' in metrics, metrics
                assert (f'l4lb_bgp_prefix_announced{{prefix="{prefix}",reason="serving (failing open: hc13)",'
                        'state="announced"} 1.0') in metrics
                assert tier.nexthops(prefix) == all_boxes(tier)
            wait_until("lb3 no longer fails hc13 open", lambda: every_backend(box, "hc13", "up"), 30, box)
            wait_until("lb3's reason for hc13", lambda: bgp_prefix(box, prefix)["reason"] == "serving", 10, box)
            assert not hc_report(box, "hc13")["fail_open"]
        finally:
            watch.stop_flag.set()
            watch.join(30)
        assert watch.seen == [all_boxes(tier)], f"the router's next hops for {prefix} changed: {watch.seen}"


def test_box_drain_moves_new_traffic_off_before_the_withdraw(tier: Tier) -> None:
    prefix, prefix6 = f"{tier.lab.vips4[0]}/32", f"{tier.lab.vips6[0]}/128"
    box = tier.boxes["lb3"]
    # A graceful phase far longer than the checks below take, however loaded the machine: no clock
    # in the test. The phase is ended on purpose by a second drain with a shorter delay.
    cp = ctl(tier, "box", "drain", "--delay", "600", boxes=["lb3"])
    assert cp.returncode == 0 and "draining: graceful shutdown now" in cp.stdout, cp.stdout + cp.stderr
    try:
        for router in ("router", "router2"):
            tier.wait_nexthops(prefix, all_boxes(tier) - {box.ip}, router=router)
            tier.wait_nexthops(prefix6, tier.addresses(6) - {box.ip6}, router=router)  # IPv6 VIPs too
        # Still announced (graceful shutdown community, MED, prepend): the router holds the path, not as best.
        routes = tier.router_birdc("show", "route", "for", prefix, "all")
        assert routes.count("via ") == 3 and "(65535,0)" in routes, routes
        assert tier.frr is not None and "Paths: (3 available" in tier.frr.bgp_route(prefix)
        before = packets(tier, "lb3", "dns10")
        assert None not in udp_backends(tier, range(42000, 42030)).values()
        assert packets(tier, "lb3", "dns10") == before, "new flows still reach the draining box"
        routes = tier.router_birdc("show", "route", "for", prefix, "all")
        assert routes.count("via ") == 3, "the graceful phase ended on its own: " + routes + box_speaker(tier, "lb3")
        # Then the withdraw, hastened by draining again with no delay: the router drops lb3's path.
        cp = ctl(tier, "box", "drain", "--delay", "0", boxes=["lb3"])
        assert cp.returncode == 0, cp.stdout + cp.stderr
        deadline = time.monotonic() + 30
        while tier.router_birdc("show", "route", "for", prefix, "all").count("via ") != 2:
            assert time.monotonic() < deadline, (tier.router_birdc("show", "route", "for", prefix, "all")
                                                 + box_speaker(tier, "lb3"))
            time.sleep(0.1)
        status = ctl(tier, "box", "status", boxes=["lb3"]).stdout
        assert "drained" in status and "withdrawn" in status, status
        assert tier.router_birdc("show", "route", "for", prefix6, "all").count("via ") == 2
        deadline = time.monotonic() + 30
        while "Paths: (2 available" not in tier.frr.bgp_route(prefix):
            assert time.monotonic() < deadline, tier.frr.bgp_route(prefix)
            time.sleep(0.1)
    finally:
        assert ctl(tier, "box", "undrain", boxes=["lb3"]).returncode == 0
    for p, hops in every_prefix(tier):
        tier.wait_nexthops(p, hops)
        tier.wait_nexthops(p, hops, router="router2")


def box_speaker(t: Tier, name: str) -> str:
    """What a box's BIRD and l4lbd say (for a failure message)."""
    box = t.boxes[name]
    birdc = [subprocess.run(["birdc", "-s", str(box.bird_socket), *cmd], capture_output=True, text=True,
                            timeout=30).stdout for cmd in (["show", "protocols"], ["show", "route", "all"])]
    return (f"\n--- {name}'s BIRD ---\n" + "\n".join(birdc) + f"\n--- {name}'s include ---\n"
            + box.include.read_text() + f"\n--- {name}'s l4lbd ---\n" + box.l4lbd.log_tail(30))


def _http_get(sock: socket.socket) -> str:
    """One keep-alive GET on an open connection; the backend's name."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by peer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by peer")
        body += chunk
    return body.decode().splitlines()[0].partition("=")[2]


def test_box_lost_bfd_withdraws_it_and_100_long_lived_connections_survive(tier: Tier) -> None:
    lab = tier.lab
    vip, prefix = lab.vips4[0], f"{lab.vips4[0]}/32"
    lost = tier.boxes["lb3"]

    def connect() -> list[socket.socket]:
        out = []
        for _ in range(100):
            s = socket.create_connection((vip, 80), timeout=15)
            out.append(s)
        return out

    conns = lab.call("c1", connect)
    try:
        first = [_http_get(s) for s in conns]
        c1 = lab.clients["c1"].ip4
        moved = [i for i, s in enumerate(conns)
                 if tier.box_of_flow(c1, s.getsockname()[1], vip, 80, "tcp") == "lb3"]
        assert moved, "no connection went through the box about to be lost"
        broken: list[str] = []
        answers: dict[int, list[str]] = {i: [] for i in range(len(conns))}
        stop = threading.Event()

        def keep_talking() -> None:  # requests on every connection while the box goes away
            while not stop.is_set():
                for i, s in enumerate(conns):
                    try:
                        answers[i].append(_http_get(s))
                    except OSError as e:
                        broken.append(f"{i}: {e}")

        talker = threading.Thread(target=keep_talking, daemon=True)
        talker.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        lab.run(lost.ns, "ip", "link", "set", "eth0", "down")
        converged = tier.wait_nexthops(prefix, all_boxes(tier) - {lost.ip}, timeout=20)
        # Its IPv6 session's BFD goes down with the same link: the IPv6 VIP's next hop goes too.
        converged6 = converged + tier.wait_nexthops(f"{lab.vips6[0]}/128", tier.addresses(6) - {lost.ip6},
                                                    timeout=20)
        # FRR's router (bfdd) drops it too; its time is at most this, since the link went down.
        for p, gone in ((prefix, lost.ip), (f"{lab.vips6[0]}/128", lost.ip6)):
            tier.wait_nexthops(p, lambda h, gone=gone: gone not in h and len(h) == 2, timeout=20, router="router2")
        converged_frr = time.monotonic() - t0
        time.sleep(1.0)
        stop.set()
        talker.join(60)
        print(f"\nbox lost (link down): router converged in {converged * 1000:.0f} ms, IPv6 VIP by "
              f"{converged6 * 1000:.0f} ms, FRR's router within {converged_frr * 1000:.0f} ms (BFD {BFD_MS} ms x {BFD_MULT}); "
              f"{len(moved)} of {len(conns)} connections moved by ECMP; {len(broken)} broken")
        assert broken == [], broken[:5]
        assert all(a == [first[i]] * len(a) and a for i, a in answers.items()), "a connection changed backend"
        # BFD, not the hold timer, found the loss: BFD says so after ~1 s, the 9 s hold timer (keepalives
        # every 3 s) no sooner than 6 s. The bound between them leaves a loaded machine room.
        detect = BFD_MS * BFD_MULT / 1000
        assert converged < detect + 4.0, f"withdraw took {converged:.2f}s: BFD should find a lost box in ~{detect:g}s"
        assert converged6 < detect + 4.0, f"IPv6 withdraw took {converged6:.2f}s (BFD ~{detect:g}s)"
        assert converged_frr < detect + 4.0, f"FRR's withdraw took up to {converged_frr:.2f}s (BFD ~{detect:g}s)"
        after = [_http_get(s) for s in conns]
        assert after == first
        assert time.monotonic() - t0 < 30
    finally:
        for s in conns:
            s.close()
        lab.run(lost.ns, "ip", "link", "set", "eth0", "up")


def test_detach_withdraws_every_vip_before_removing_xdp(tier: Tier) -> None:
    box = tier.boxes["lb"]
    box.l4lbd.stop()
    cp = box.l4lbd.run_cli("--detach")
    assert cp.returncode == 0 and "every VIP withdrawn from BGP" in cp.stdout, cp.stdout + cp.stderr
    for router in ("router", "router2"):
        for vip in VIPS4:
            tier.wait_nexthops(f"{vip}/32", lambda h: box.ip not in h and len(h) > 0, timeout=5, router=router)
        for vip in tier.lab.vips6:
            tier.wait_nexthops(f"{vip}/128", lambda h: box.ip6 not in h and len(h) > 0, timeout=5, router=router)
    assert "route " not in box.include.read_text()
