"""Service features of issue 15 on the real program (BPF_PROG_TEST_RUN, scapy
packets): source-range allowlists, IPv4 VIPs with IPv6 backends (4in6) and
client-IP affinity by network (affinity_prefix). Real traffic for the same:
tests/test_service_features_lab.py."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, Raw, raw

from l4lb import flowhash, maglev
from l4lb.datapath.engine import hash_seed
from l4lb.lab.pktenv import EDGE_V6, backend_mac
from test_datapath_packets import (
    B4, B6, CLIENT4, CLIENT6, M, VIP4, VIP6, XDP_DROP, XDP_TX, delta, expected_backend, frame, ip4_header_ok,
    l4_ok, reasons, svc,
)

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

ALLOWED4, REFUSED4 = "203.0.113.77", "192.0.2.200"     # CLIENT4 is in 203.0.113.0/24
ALLOWED6, REFUSED6 = "2001:db8:77::7", "2001:db8:99::9"


@pytest.fixture(scope="module")
def env(packet_env):
    assert packet_env.cfg.maglev_m == M
    return packet_env


def syn(src: str, vip: str, sport: int, port: int = 80) -> bytes:
    return frame(src, vip, TCP(sport=sport, dport=port, flags="S"))


def ack(src: str, vip: str, sport: int, port: int = 80) -> bytes:
    return frame(src, vip, TCP(sport=sport, dport=port, flags="A") / Raw(b"x" * 10))


def outer_dst(out: bytes) -> str:
    o = Ether(out)
    return o[IPv6].dst if o.type == 0x86DD else o[IP].dst


def same(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


# --- source ranges -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_source_ranges_admit_their_clients_and_drop_the_rest(env, family):
    vip, backends = (VIP4, B4[:4]) if family == 4 else (VIP6, B6[:4])
    ok, bad = (ALLOWED4, REFUSED4) if family == 4 else (ALLOWED6, REFUSED6)
    ranges = ["203.0.113.0/24", "198.51.100.128/25"] if family == 4 else ["2001:db8:77::/48"]
    s = svc(f"allow{family}", vip, 80, backends)
    s = s.model_copy(update={"source_ranges": [ipaddress.ip_network(r) for r in ranges]})
    env.apply([s])
    before = reasons(env)
    v, out, _ = env.run(syn(ok, vip, 40001))
    assert v == XDP_TX and same(outer_dst(out), expected_backend(s, ok, 40001))
    for pkt in (syn(bad, vip, 40002), ack(bad, vip, 40003)):
        v, out, _ = env.run(pkt)
        assert v == XDP_DROP
    if family == 4:   # the longer range of two, and a host just outside it
        assert env.run(syn("198.51.100.200", vip, 40004))[0] == XDP_TX
        assert env.run(syn("198.51.100.127", vip, 40005))[0] == XDP_DROP
        assert delta(before, reasons(env)) == {"tx": 2, "drop_source_range": 3}
    else:
        assert delta(before, reasons(env)) == {"tx": 1, "drop_source_range": 2}
    stats = env.call(env.dp.stats)
    assert stats.reasons["drop_source_range"]["packets"] >= 2


def test_a_flow_made_before_a_change_of_ranges_is_checked_again(env):
    base = svc("recheck", VIP4, 80, B4[:4])
    open_ = base.model_copy(update={"source_ranges": [ipaddress.ip_network("203.0.113.0/24"),
                                                      ipaddress.ip_network("192.0.2.0/24")]})
    narrow = base.model_copy(update={"source_ranges": [ipaddress.ip_network("203.0.113.0/24")]})
    env.apply([open_])
    assert env.run(syn(REFUSED4, VIP4, 41000))[0] == XDP_TX      # 192.0.2.200 allowed for now
    assert env.run(ack(REFUSED4, VIP4, 41000))[0] == XDP_TX      # its flow is established
    assert env.run(syn(ALLOWED4, VIP4, 41001))[0] == XDP_TX
    env.apply([narrow])
    before = reasons(env)
    assert env.run(ack(REFUSED4, VIP4, 41000))[0] == XDP_DROP    # the established flow no longer passes
    v, out, _ = env.run(ack(ALLOWED4, VIP4, 41001))              # an allowed one still does
    assert v == XDP_TX and same(outer_dst(out), expected_backend(narrow, ALLOWED4, 41001))
    assert delta(before, reasons(env)) == {"drop_source_range": 1, "tx": 1}
    env.apply([base])                                            # no ranges: every client
    assert env.run(ack(REFUSED4, VIP4, 41000))[0] == XDP_TX
    assert env.call(lambda: env.dp.tables.src_ranges.items()) == []


def test_flows_of_a_service_with_ranges_count_as_active_flows(env):
    from l4lb.datapath.flowscan import scan
    from l4lb.datapath.jiffies import KernelClock

    s = svc("counted", VIP4, 80, B4[:1]).model_copy(update={"source_ranges": [ipaddress.ip_network("203.0.113.0/24")]})
    env.apply([s])
    for sport in range(43100, 43105):
        assert env.run(syn(ALLOWED4, VIP4, sport))[0] == XDP_TX
    flows, labels = env.call(env.dp.flow_source)
    got = env.call(scan, flows, labels, KernelClock())
    assert got.backends[(s.key, (str(ipaddress.ip_address(B4[0])), 80))] == (5, 0)


def test_services_without_ranges_and_other_services_are_unaffected(env):
    limited = svc("limited", VIP4, 80, B4[:2]).model_copy(
        update={"source_ranges": [ipaddress.ip_network("203.0.113.0/24")]})
    other = svc("other", VIP4, 81, B4[2:4])
    env.apply([limited, other])
    assert env.run(syn(REFUSED4, VIP4, 42000, port=81))[0] == XDP_TX
    assert env.run(syn(REFUSED4, VIP4, 42001, port=80))[0] == XDP_DROP
    sid = env.call(env.dp.tables.read_services)[(limited.vip.exploded, 80, 6)][0]
    keys = env.call(lambda: [(k.svc_id, k.prefixlen) for k in env.dp.tables.src_ranges.keys()])
    assert keys == [(sid, 32 + 24)]
    assert env.call(env.dp.status)["maps"]["source_ranges"] == {"used": 1, "max": 65536}   # status, metrics
    env.apply([other])                 # the service goes: so do its ranges
    assert env.call(lambda: env.dp.tables.src_ranges.items()) == []


def test_icmp_errors_about_refused_sources_are_dropped(env):
    s = svc("icmpr", VIP4, 80, B4[:2]).model_copy(update={"source_ranges": [ipaddress.ip_network("203.0.113.0/24")]})
    env.apply([s])
    quoted = IP(src=VIP4, dst=REFUSED4) / TCP(sport=80, dport=43000)
    err = raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22")
              / IP(src="192.0.2.254", dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1400) / raw(quoted))
    before = reasons(env)
    assert env.run(err)[0] == XDP_DROP
    assert delta(before, reasons(env)) == {"drop_source_range": 1}


# --- IPv4 VIP, IPv6 backends (4in6) ---------------------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv4_vip_to_ipv6_backend_is_encapsulated_ipv4_in_ipv6(env, proto):
    s = svc("four6" + proto, VIP4, 80, B6[:4], proto=proto)
    env.apply([s])
    l4 = TCP(sport=44000, dport=80, flags="S") if proto == "tcp" else UDP(sport=44000, dport=80) / Raw(b"u" * 30)
    pkt_in = frame(CLIENT4, VIP4, l4, tos=0xB8, flags="DF")
    before = reasons(env)
    v, out, _ = env.run(pkt_in)
    assert v == XDP_TX
    o = Ether(out)
    assert o.type == 0x86DD
    outer = o[IPv6]
    want = expected_backend(s, CLIENT4, 44000)
    assert same(outer.dst, want) and same(outer.src, EDGE_V6)
    assert (outer.nh, outer.hlim, outer.tc, outer.plen) == (4, 64, 0xB8, len(pkt_in) - 14)
    assert raw(outer.payload) == pkt_in[14:], "inner IPv4 packet must be unchanged"
    assert o.dst == backend_mac(B6.index(str(ipaddress.ip_address(want))) + 1)
    assert delta(before, reasons(env)) == {"tx": 1}


def test_a_service_may_mix_ipv4_and_ipv6_backends(env):
    s = svc("mixed", VIP4, 80, [*B4[:3], *B6[:3]])
    env.apply([s])
    families = set()
    for sport in range(45000, 45040):
        v, out, _ = env.run(syn(CLIENT4, VIP4, sport))
        assert v == XDP_TX and same(outer_dst(out), expected_backend(s, CLIENT4, sport))
        families.add(Ether(out).type)
        if Ether(out).type == 0x0800:
            ip4_header_ok(Ether(out)[IP])
    assert families == {0x0800, 0x86DD}


@pytest.mark.parametrize("df", [True, False])
def test_4in6_too_big_tells_the_client_the_mtu_left_after_40_bytes(env, df):
    s = svc("big46", VIP4, 80, B6[:2])
    env.apply([s])
    fits = frame(CLIENT4, VIP4, TCP(sport=46000, dport=80, flags="A") / Raw(b"f" * (1460 - 40)),
                 **({"flags": "DF"} if df else {}))
    assert len(fits) == 14 + 1460
    assert env.run(fits)[0] == XDP_TX
    # 1480 bytes: would fit IPIP's 20 (1500) but not 4in6's 40. DF clear too: the
    # kernel does not fragment an IPv6 packet it forwards (lib/forward.h).
    big = frame(CLIENT4, VIP4, TCP(sport=46001, dport=80, flags="A") / Raw(b"B" * (1480 - 40)),
                **({"flags": "DF"} if df else {}))
    before = reasons(env)
    v, out, _ = env.run(big)
    assert v == XDP_TX
    o = Ether(out)
    assert (o[IP].src, o[IP].dst) == (VIP4, CLIENT4)
    assert (o[ICMP].type, o[ICMP].code, o[ICMP].nexthopmtu) == (3, 4, 1500 - 40)
    quote = raw(o[ICMP].payload)
    assert quote == big[14:14 + len(quote)]
    assert delta(before, reasons(env)) == {"tx_icmp_too_big": 1}


def test_icmp_errors_about_a_4in6_flow_reach_its_backend_in_ipv6(env):
    s = svc("icmp46", VIP4, 80, B6[:4])
    env.apply([s])
    v, out, _ = env.run(syn(CLIENT4, VIP4, 47500))
    backend = outer_dst(out)
    quoted = IP(src=VIP4, dst=CLIENT4) / TCP(sport=80, dport=47500)
    err = raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22")
              / IP(src="192.0.2.254", dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1400) / raw(quoted))
    before = reasons(env)
    v, out, _ = env.run(err)
    assert v == XDP_TX
    outer = Ether(out)[IPv6]
    assert (outer.nh, outer.dst) == (4, backend) and raw(outer.payload) == err[14:]
    assert delta(before, reasons(env)) == {"fwd_icmp_error": 1}


def test_4in6_maglev_identity_is_the_backend_address(env):
    """Same backends, any order: the same table, so boxes of a tier agree."""
    a = svc("ident", VIP4, 80, [B6[0], B4[0], B6[1]])
    b = svc("ident", VIP4, 80, [B6[1], B6[0], B4[0]])
    ta, tb = (maglev.build(x.maglev_weights(), M, b"l4lb-default") for x in (a, b))
    assert ta.table.tolist() == tb.table.tolist() and ta.identities == tb.identities
    env.apply([a])
    for sport in range(47000, 47010):
        assert same(outer_dst(env.run(syn(CLIENT4, VIP4, sport))[1]), expected_backend(b, CLIENT4, sport))


# --- client-IP affinity by network (affinity_prefix) --------------------------------------------------------

def affinity_backend(s, client: str) -> str:
    table = maglev.build(s.maglev_weights(), M, b"l4lb-default")
    h = flowhash.flow_hash(client, 1, s.port, s.protocol.number, hash_seed(b"l4lb-default"),
                           hash_src_port=False, affinity_prefix=s.options.affinity_prefix)
    return str(ipaddress.ip_address(table.backend_at(h % M)[0]))


@pytest.mark.parametrize("family,plen", [(4, 24), (4, 0), (4, 26), (6, 64), (6, 63)])
def test_affinity_prefix_agrees_with_the_python_reference(env, family, plen):
    vip, backends = (VIP4, B4[:8]) if family == 4 else (VIP6, B6[:8])
    s = svc(f"aff{family}-{plen}", vip, 80, backends, hash_src_port=False, affinity_prefix=plen)
    env.apply([s])
    nets: dict[str, set[str]] = {}
    for i in range(48):
        client = (f"203.0.{113 + i % 3}.{(i * 37) % 250 + 1}" if family == 4
                  else f"2001:db8:{i % 4:x}:{i % 3:x}::{i * 97:x}")
        v, out, _ = env.run(syn(client, vip, 48000 + i))
        got = outer_dst(out)
        assert v == XDP_TX and same(got, affinity_backend(s, client)), client
        net = str(ipaddress.ip_network(f"{client}/{plen}", strict=False))
        nets.setdefault(net, set()).add(str(ipaddress.ip_address(got)))
    assert all(len(b) == 1 for b in nets.values()), nets   # one backend per client network
    if plen == 0:
        assert len(nets) == 1
    else:
        assert len(nets) >= 3 and len({b for bs in nets.values() for b in bs}) >= 2


def test_full_length_affinity_prefix_is_plain_client_ip_affinity(env):
    s = svc("aff32", VIP4, 80, B4[:8], hash_src_port=False, affinity_prefix=32)
    plain = svc("aff32", VIP4, 80, B4[:8], hash_src_port=False)
    env.apply([s])
    for i in range(16):
        client = f"203.0.113.{i + 1}"
        assert same(outer_dst(env.run(syn(client, VIP4, 49000 + i))[1]), expected_backend(plain, client, 1))


# --- read back from the maps (l4lbd --adopt-datapath) --------------------------------------------------------

def test_ranges_and_affinity_prefix_come_back_from_the_maps(env):
    from l4lb.lifecycle.adopt import desired_from_maps

    s4 = svc("back4", VIP4, 80, [B4[0], B6[1]], hash_src_port=False, affinity_prefix=20).model_copy(
        update={"source_ranges": [ipaddress.ip_network(n) for n in ("203.0.113.0/24", "192.0.2.128/25")]})
    s6 = svc("back6", VIP6, 80, B6[:2]).model_copy(
        update={"source_ranges": [ipaddress.ip_network("2001:db8:77::/48")]})
    env.apply([s4, s6])
    got = {s.key: s for s in desired_from_maps(env.call(env.dp.in_force), M, b"l4lb-default").state.services}
    for want in (s4, s6):
        back = got[want.key]
        assert sorted(back.source_ranges, key=str) == sorted(want.source_ranges, key=str)
        assert back.options.affinity_prefix == want.options.affinity_prefix
        assert back.options.hash_src_port == want.options.hash_src_port
    env.apply([])



def test_fleet_digest_includes_source_ranges_and_not_unused_new_fields():
    """Boxes with different allowlists must not compare equal; a service that uses
    none of the new fields hashes as before they existed (a tier mid-upgrade)."""
    import hashlib

    import numpy as np

    from l4lb.fleet import table_hash

    class Source:
        def service_id(self, service):
            return 1

        def backend_id(self, service, ident):
            return 1

        def maglev_table(self, sid):
            return np.ones(7, dtype=np.uint32)

    plain = svc("dig", VIP4, 80, B4[:1])
    limited = plain.model_copy(update={"source_ranges": [ipaddress.ip_network("203.0.113.0/24")]})
    assert table_hash(plain, Source()) != table_hash(limited, Source())
    old = hashlib.blake2b(digest_size=16, person=b"l4lb-table-dig")
    old.update(repr((plain.key, '{"l4_dnat":false,"hash_src_port":true,"maglev_weights":true,"no_backend":"reject",'
                                '"answer_ping":true}', [plain.backends[0].identity(80)])).encode())
    old.update(np.ones(7, dtype="<u4").tobytes())
    assert table_hash(plain, Source()) == old.hexdigest()
