"""The next-hop cache (NEXTHOP_CACHE): the daemon resolves backends' next hops
from the kernel and the program uses them instead of bpf_fib_lookup.

Shown with the real program on crafted packets: the cache and FIB builds
forward byte-identically; the cache is really used (a planted entry wins);
an entry of another slot generation is ignored; a refresh picks up a
neighbour change; unresolvable backends have no entry and still go by the FIB
(NO_NEIGH to the kernel)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, Raw, raw

from l4lb.datapath import Datapath
from l4lb.datapath import libbpf
from l4lb.lab import netns
from l4lb.lab.pktenv import EDGE_IF, NO_NEIGH_V4, OUT_V4, PacketEnv, backend_mac, edge_backends_v4, edge_backends_v6
from l4lb.models import Service

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

XDP_PASS, XDP_TX, XDP_REDIRECT = 2, 3, 4
VIP4, VIP6 = "198.51.100.1", "2001:db8:100::1"


@pytest.fixture(scope="module")
def env(bpffs: Path):
    with PacketEnv(bpffs, n_backends=8, maglev_m=251, max_backends=1024, flow_table_size=4096,
                   prefix="l4nh") as e:
        fib = Datapath(dataclasses.replace(e.dp.cfg, nexthop_cache=False))
        e.call(fib.load)          # same layout: shares the pinned maps ...
        e.call(copy_devmap, e.dp, fib)  # ... but not the (unpinned) devmap
        e.fib = fib
        try:
            yield e
        finally:
            e.call(fib.close)


def copy_devmap(src: Datapath, dst: Datapath) -> None:
    for k, v in src.tables.tx_ports.items():
        if v.value:
            dst.tables.tx_ports[k] = v


def one(name: str, vip: str, backend: str, port: int = 80) -> Service:
    return Service(name=name, vip=vip, port=port, backends=[{"address": backend}])


def pkt(src: str, dst: str, sport: int = 40000, size: int = 40, udp: bool = False, df: bool = False) -> bytes:
    l3 = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst, flags="DF" if df else 0)
    l4 = UDP(sport=sport, dport=80) if udp else TCP(sport=sport, dport=80, flags="S")
    return raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22") / l3 / l4 / Raw(b"x" * size))


def both(env, data: bytes) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    c = env.run(data)
    f = env.call(libbpf.test_run, env.fib.prog_fd, data, ingress_ifindex=env.edge_ifindex)
    return (c[0], c[1]), (f[0], f[1])


def entry(env, bid: int):
    t = env.dp.tables
    import ctypes as ct
    return t.nexthops[ct.c_uint32(bid)]


def bid_of(env, svc: Service) -> int:
    b = svc.backends[0]
    return env.call(env.dp.backend_id, svc.key, b.identity(svc.port))


def test_cache_and_fib_builds_forward_identically(env) -> None:
    b4, b6 = edge_backends_v4(8)[2], edge_backends_v6(8)[3]
    services = [one("a", VIP4, b4), one("b", VIP6, b6), one("r", "198.51.100.2", "203.0.113.10"),
                one("big", "198.51.100.3", b4)]
    env.apply(services)
    for s in services[:3]:
        e = entry(env, bid_of(env, s))
        assert e.gen != 0 and e.ifindex in (env.edge_ifindex, env.out_ifindex), f"{s.name}: no cache entry"
    cases = [pkt("203.0.113.7", VIP4), pkt("2001:db8:77::7", VIP6), pkt("203.0.113.7", "198.51.100.2"),
             pkt("203.0.113.7", VIP4, udp=True), pkt("203.0.113.7", "198.51.100.3", size=1470, df=True)]
    verdicts = []
    for data in cases:
        cache, fib = both(env, data)
        assert cache == fib
        verdicts.append(cache[0])
    # v4, v6, XDP_REDIRECT to the second NIC, UDP (no such service: the kernel's), too-big reply
    assert verdicts == [XDP_TX, XDP_TX, XDP_REDIRECT, XDP_PASS, XDP_TX]
    icmp = Ether(env.run(cases[-1])[1])
    assert icmp[IP].proto == 1 and icmp[IP].dst == "203.0.113.7"


def test_the_program_uses_the_cache_and_checks_the_generation(env) -> None:
    b4 = edge_backends_v4(8)[4]
    s = one("gen", VIP4, b4)
    env.apply([s])
    bid = bid_of(env, s)
    good = entry(env, bid)
    planted = bytes.fromhex("02aabbccddee")
    env.call(env.dp.tables.write_nexthop, bid, good.ifindex, good.gen, good.mtu, bytes(good.smac), planted)
    v, out, _ = env.run(pkt("203.0.113.7", VIP4))
    assert v == XDP_TX and Ether(out).dst == "02:aa:bb:cc:dd:ee", "the cached next hop was not used"
    env.call(env.dp.tables.write_nexthop, bid, good.ifindex, good.gen + 1, good.mtu, bytes(good.smac), planted)
    v, out, _ = env.run(pkt("203.0.113.7", VIP4))
    assert v == XDP_TX and Ether(out).dst == backend_mac(5), "an entry of another generation was used"
    # A planted too-small MTU makes the cache answer too-big (DF set), with that MTU.
    env.call(env.dp.tables.write_nexthop, bid, good.ifindex, good.gen, 600, bytes(good.smac), bytes(good.dmac))
    v, out, _ = env.run(pkt("203.0.113.7", VIP4, size=800, df=True))
    assert v == XDP_TX and Ether(out)[IP].proto == 1 and Ether(out)["ICMP"].nexthopmtu == 600 - 20
    env.call(env.dp.tables.write_nexthop, bid, good.ifindex, good.gen, good.mtu, bytes(good.smac), bytes(good.dmac))


def test_refresh_follows_neighbour_changes_and_unresolved_backends_use_the_fib(env) -> None:
    b4 = edge_backends_v4(8)[6]
    s, lost = one("nb", VIP4, b4), one("lost", "198.51.100.4", NO_NEIGH_V4)
    env.apply([s, lost])
    assert entry(env, bid_of(env, lost)).gen == 0, "an unresolved backend got a cache entry"
    v, _, _ = env.run(pkt("203.0.113.7", "198.51.100.4"))
    assert v == XDP_PASS  # NO_NEIGH: the kernel resolves it
    netns.ip(env.ns, "neigh", "replace", b4, "lladdr", "02:00:00:00:09:99", "dev", EDGE_IF, "nud", "permanent")
    try:
        assert Ether(env.run(pkt("203.0.113.7", VIP4))[1]).dst == backend_mac(7)  # until the refresh
        env.call(env.dp.refresh_nexthops)
        assert Ether(env.run(pkt("203.0.113.7", VIP4))[1]).dst == "02:00:00:00:09:99"
    finally:
        netns.ip(env.ns, "neigh", "replace", b4, "lladdr", backend_mac(7), "dev", EDGE_IF, "nud", "permanent")
        env.call(env.dp.refresh_nexthops)
    # Removing the service clears its entry (a reused slot must not inherit it).
    bid = bid_of(env, s)
    env.apply([lost])
    env.call(env.dp.refresh_nexthops)
    assert entry(env, bid).gen == 0
    assert ipaddress.ip_address(OUT_V4)  # the redirect NIC stays configured


def test_a_refresh_with_nothing_changed_resolves_nothing_and_a_route_change_is_followed(env) -> None:
    b4 = edge_backends_v4(8)[1]
    s = one("same", VIP4, b4)
    env.apply([s])
    env.call(env.dp.refresh_nexthops)
    upkeep = env.dp._upkeep
    skipped, resolved_from = upkeep.skipped, upkeep._resolved_from
    assert resolved_from is not None  # plain routes: the dumps say it all
    assert env.call(env.dp.refresh_nexthops) == 0 and upkeep.skipped == skipped + 1, "an unchanged box was resolved again"
    bid = bid_of(env, s)
    mtu = entry(env, bid).mtu
    netns.ip(env.ns, "route", "add", f"{b4}/32", "dev", EDGE_IF, "mtu", "1400")
    try:
        env.call(env.dp.refresh_nexthops)
        assert upkeep.skipped == skipped + 1 and entry(env, bid).mtu == 1400, "a route change was not followed"
    finally:
        netns.ip(env.ns, "route", "del", f"{b4}/32", "dev", EDGE_IF)
    env.call(env.dp.refresh_nexthops)
    assert entry(env, bid).mtu == mtu
