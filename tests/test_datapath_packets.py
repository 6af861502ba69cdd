"""The real compiled XDP program on scapy-built packets (BPF_PROG_TEST_RUN),
output dissected by scapy. One compile for the module; each test programs
the services it needs."""

from __future__ import annotations

import ipaddress
import threading

import pytest
from scapy.all import (
    ICMP, IP, UDP, TCP, Ether, ICMPv6PacketTooBig, IPOption_RR, IPv6, IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, ARP, Raw, raw,
)

from l4lb import flowhash, maglev
from l4lb.datapath.engine import hash_seed
from l4lb.lab.pktenv import (
    EDGE_V4, EDGE_V6, NO_NEIGH_V4, OUT_V4, backend_mac, edge_backends_v4, edge_backends_v6,
)
from l4lb.models import Service

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4
M = 251
VIP4, VIP6 = "198.51.100.1", "2001:db8:100::1"
CLIENT4, CLIENT6 = "203.0.113.77", "2001:db8:77::7"
B4 = edge_backends_v4(8)
B6 = edge_backends_v6(8)


@pytest.fixture(scope="module")
def env(packet_env):
    assert packet_env.cfg.maglev_m == M
    return packet_env


def svc(name: str, vip: str, port: int, backends: list, proto: str = "tcp", **options) -> Service:
    return Service(name=name, vip=vip, port=port, protocol=proto, options=options,
                   backends=[b if isinstance(b, dict) else {"address": b} for b in backends])


def frame(src: str, dst: str, l4, *, tos: int = 0, **ipkw) -> bytes:
    if ":" in dst:
        return raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22") / IPv6(src=src, dst=dst, tc=tos) / l4)
    return raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22") / IP(src=src, dst=dst, tos=tos, **ipkw) / l4)


def expected_backend(s: Service, client: str, sport: int, seed: bytes = b"l4lb-default") -> str:
    table = maglev.build(s.maglev_weights(), M, seed)
    h = flowhash.flow_hash(client, sport, s.port, s.protocol.number, hash_seed(seed),
                           hash_src_port=s.options.hash_src_port)
    ident = table.backend_at(h % M)
    assert ident is not None
    return str(ipaddress.ip_address(ident[0]))


def reasons(env) -> dict[str, int]:
    return {k: v["packets"] for k, v in env.call(env.dp.stats).reasons.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def l4_ok(pkt) -> None:
    """TCP/UDP/ICMPv6 checksums of an inner packet valid (v4 or v6)."""
    for cls in (TCP, UDP):
        lyr = pkt.getlayer(cls)
        if lyr is None or (cls is UDP and lyr.chksum == 0):
            continue
        under = lyr.underlayer
        while under is not None and not isinstance(under, (IP, IPv6)):
            under = under.underlayer
        hdr = under.copy()
        hdr.remove_payload()
        if isinstance(hdr, IPv6):
            hdr.nh = {TCP: 6, UDP: 17}[cls]
            hdr.plen = None
        c = lyr.copy()
        c.chksum = None
        rebuilt = (hdr.__class__(raw(hdr / c))).getlayer(cls)
        assert lyr.chksum == rebuilt.chksum, f"{cls.__name__} checksum {lyr.chksum:#x} != {rebuilt.chksum:#x}"


def ip4_header_ok(ip) -> None:
    h = ip.copy()
    h.remove_payload()
    h.chksum = None
    assert ip.chksum == IP(raw(h)).chksum


# --- v4 / v6, TCP / UDP, SYN / non-SYN --------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv4_ipip_encapsulation(env, proto):
    s = svc("w4" + proto, VIP4, 80, B4[:4], proto=proto)
    env.apply([s])
    l4 = TCP(sport=40000, dport=80, flags="S") if proto == "tcp" else UDP(sport=40000, dport=80) / Raw(b"x" * 40)
    pkt_in = frame(CLIENT4, VIP4, l4, tos=0x28, flags="DF")
    before = reasons(env)
    verdict, out, _ = env.run(pkt_in)
    assert verdict == XDP_TX
    o = Ether(out)
    want = expected_backend(s, CLIENT4, 40000)
    outer = o[IP]
    assert (outer.version, outer.ihl, outer.ttl, outer.proto) == (4, 5, 64, 4)
    assert outer.src == EDGE_V4 and outer.dst == want
    assert outer.tos == 0x28 and outer.flags == "DF" and outer.id == 0
    assert outer.len == len(pkt_in) - 14 + 20
    ip4_header_ok(outer)
    assert raw(outer.payload) == pkt_in[14:], "inner packet must be unchanged"
    assert o.dst == backend_mac(B4.index(want) + 1) and o.src == env.edge_mac
    assert delta(before, reasons(env)) == {"tx": 1}


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv6_ip6ip6_encapsulation(env, proto):
    s = svc("w6" + proto, VIP6, 443, B6[:4], proto=proto)
    env.apply([s])
    l4 = TCP(sport=40001, dport=443, flags="S") if proto == "tcp" else UDP(sport=40001, dport=443) / Raw(b"y" * 33)
    pkt_in = frame(CLIENT6, VIP6, l4, tos=0xB8)
    verdict, out, _ = env.run(pkt_in)
    assert verdict == XDP_TX
    o = Ether(out)
    outer = o[IPv6]
    want = expected_backend(s, CLIENT6, 40001)
    assert outer.nh == 41 and outer.hlim == 64 and outer.tc == 0xB8
    assert outer.src == EDGE_V6 and ipaddress.ip_address(outer.dst) == ipaddress.ip_address(want)
    assert outer.plen == len(pkt_in) - 14
    assert raw(outer.payload) == pkt_in[14:]
    l4_ok(IPv6(pkt_in[14:]))


def test_non_syn_follows_flow_table_and_unknown_flows_use_maglev(env):
    s = svc("flows", VIP4, 80, B4[:4])
    env.apply([s])
    # An ACK of a flow never seen goes by Maglev, like a SYN would.
    for sport in range(41000, 41020):
        v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=sport, dport=80, flags="A")))
        assert v == XDP_TX and Ether(out)[IP].dst == expected_backend(s, CLIENT4, sport)


def test_flow_keeps_backend_across_table_change_and_drain(env):
    s = svc("drain", VIP4, 80, B4[:4])
    env.apply([s])
    flows = {}
    for sport in range(42000, 42060):
        v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=sport, dport=80, flags="S")))
        flows[sport] = Ether(out)[IP].dst
    victim = flows[42000]
    drained = svc("drain", VIP4, 80, [
        {"address": b, "state": "draining" if b == victim else "active"} for b in B4[:4]])
    env.apply([drained])
    moved_others = 0
    for sport, be in flows.items():
        # established flows (ACKs) stay where they were, the drained backend included
        v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=sport, dport=80, flags="A")))
        assert Ether(out)[IP].dst == be
        # new connections never reach the drained backend; they follow the new table
        v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=sport, dport=80, flags="S")))
        new_be = Ether(out)[IP].dst
        assert new_be != victim and new_be == expected_backend(drained, CLIENT4, sport)
        moved_others += be != victim and new_be != be
    # Maglev: flows of the other backends mostly stay (M=251 is small, so allow 15%)
    assert moved_others <= 0.15 * sum(b != victim for b in flows.values())
    # maintenance: even established flows leave the backend. (The SYNs above
    # re-pointed the victim's flows, so establish fresh ones on it first.)
    env.apply([s])
    on_victim = []
    for sport in range(44000, 44200):
        v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=sport, dport=80, flags="S")))
        if Ether(out)[IP].dst == victim:
            on_victim.append(sport)
    assert len(on_victim) >= 10
    env.apply([drained])
    v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=on_victim[0], dport=80, flags="A")))
    assert Ether(out)[IP].dst == victim, "draining keeps the established flow"
    maint = svc("drain", VIP4, 80, [
        {"address": b, "state": "maintenance" if b == victim else "active"} for b in B4[:4]])
    env.apply([maint])
    for sport in on_victim:
        v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=sport, dport=80, flags="A")))
        assert v == XDP_TX and Ether(out)[IP].dst != victim


def test_datapath_picks_exactly_the_python_table(env):
    s = svc("exact", VIP4, 8080, B4[:8])
    env.apply([s])
    for i in range(200):
        client = f"203.0.113.{i % 250 + 1}"
        sport = 1024 + i * 97
        v, out, _ = env.run(frame(client, VIP4, TCP(sport=sport, dport=8080, flags="S")))
        assert Ether(out)[IP].dst == expected_backend(s, client, sport)
    # The entry's ring says which buffer is in force; read it through the syscall.
    ring = env.call(env.dp.tables.read_services)[(s.vip.exploded, s.port, 6)][2]
    dp_table = env.call(env.dp.tables.read_maglev, ring)
    py = maglev.build(s.maglev_weights(), M, b"l4lb-default")
    ids = {ident: env.dp.backend_id(s.key, ident) for ident in py.identities}
    assert [int(x) for x in dp_table] == [ids[py.identities[j]] for j in py.table]


def test_client_ip_affinity_ignores_source_port(env):
    s = svc("sticky", VIP4, 80, B4[:8], hash_src_port=False)
    env.apply([s])
    seen = set()
    for sport in range(43000, 43040):
        v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=sport, dport=80, flags="S")))
        seen.add(Ether(out)[IP].dst)
    assert seen == {expected_backend(s, CLIENT4, 1)}
    spread = set()
    for i in range(40):
        v, out, _ = env.run(frame(f"203.0.113.{i + 1}", VIP4, TCP(sport=43000, dport=80, flags="S")))
        spread.add(Ether(out)[IP].dst)
    assert len(spread) >= 4


def test_tcp_and_udp_on_same_vip_port_are_different_services(env):
    t = svc("dns-tcp", VIP4, 53, B4[:1])
    u = svc("dns-udp", VIP4, 53, B4[1:2], proto="udp")
    env.apply([t, u])
    v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=5000, dport=53, flags="S")))
    assert Ether(out)[IP].dst == B4[0]
    v, out, _ = env.run(frame(CLIENT4, VIP4, UDP(sport=5000, dport=53)))
    assert Ether(out)[IP].dst == B4[1]


# --- DNAT -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,proto", [(4, "tcp"), (4, "udp"), (6, "tcp"), (6, "udp")])
def test_l4_dnat_rewrites_port_with_valid_checksum(env, family, proto):
    vip, client, be = (VIP4, CLIENT4, B4[0]) if family == 4 else (VIP6, CLIENT6, B6[0])
    s = svc("dnat", vip, 80, [{"address": be, "port": 8080}], proto=proto, l4_dnat=True)
    env.apply([s])
    l4 = TCP(sport=1234, dport=80, flags="S") / Raw(b"hello") if proto == "tcp" else UDP(sport=1234, dport=80) / Raw(b"q" * 17)
    v, out, _ = env.run(frame(client, vip, l4))
    assert v == XDP_TX
    inner = (IP if family == 4 else IPv6)(raw(Ether(out)[IP if family == 4 else IPv6].payload))
    assert inner[proto.upper() == "TCP" and TCP or UDP].dport == 8080
    l4_ok(inner)
    if family == 4:
        ip4_header_ok(inner)


def test_dnat_keeps_udp_checksum_zero(env):
    s = svc("dnat0", VIP4, 80, [{"address": B4[0], "port": 8080}], proto="udp", l4_dnat=True)
    env.apply([s])
    pkt = Ether(frame(CLIENT4, VIP4, UDP(sport=1234, dport=80) / Raw(b"zz")))
    pkt[UDP].chksum = 0
    v, out, _ = env.run(raw(pkt))
    inner = IP(raw(Ether(out)[IP].payload))
    assert inner[UDP].dport == 8080 and inner[UDP].chksum == 0


def test_without_dnat_the_port_is_untouched(env):
    s = svc("nodnat", VIP4, 80, [B4[0]])
    env.apply([s])
    pkt_in = frame(CLIENT4, VIP4, TCP(sport=1234, dport=80, flags="S"))
    v, out, _ = env.run(pkt_in)
    assert raw(Ether(out)[IP].payload) == pkt_in[14:]


# --- outer source prefixes ------------------------------------------------------------------------

def test_outer_source_prefix_hashing(env):
    env.set_runtime(outer_src_v4=ipaddress.ip_network("192.0.2.128/26"),
                    outer_src_v6=ipaddress.ip_network("2001:db8:2:ff::/64"))
    try:
        s4 = svc("src4", VIP4, 80, B4[:4])
        s6 = svc("src6", VIP6, 80, B6[:4])
        env.apply([s4, s6])
        for vip, client, net, cls in ((VIP4, "203.0.113.{}", "192.0.2.128/26", IP),
                                      (VIP6, "2001:db8:77::{:x}", "2001:db8:2:ff::/64", IPv6)):
            srcs = []
            for i in range(1, 41):
                pkt = frame(client.format(i), vip, TCP(sport=50000 + i, dport=80, flags="S"))
                v1, o1, _ = env.run(pkt)
                v2, o2, _ = env.run(pkt)
                a, b = Ether(o1)[cls].src, Ether(o2)[cls].src
                assert a == b, "outer source must be stable per flow"
                assert ipaddress.ip_address(a) in ipaddress.ip_network(net)
                srcs.append(a)
            assert len(set(srcs)) >= 20, f"outer sources should spread across flows: {len(set(srcs))} distinct"
            if cls is IP:
                ip4_header_ok(Ether(o1)[IP])
    finally:
        env.set_runtime(outer_src_v4=None, outer_src_v6=None)


# --- PMTU ------------------------------------------------------------------------------------------------

def test_ipv4_frag_needed_quotes_the_original(env):
    s = svc("big4", VIP4, 80, B4[:2])
    env.apply([s])
    pkt_in = frame(CLIENT4, VIP4, TCP(sport=1111, dport=80, flags="A") / Raw(b"B" * (1500 - 40)), flags="DF")
    assert len(pkt_in) == 1514
    before = reasons(env)
    v, out, _ = env.run(pkt_in)
    assert v == XDP_TX
    o = Ether(out)
    assert o.dst == "02:22:22:22:22:22" and o.src == "02:11:11:11:11:11"
    ip, icmp = o[IP], o[ICMP]
    assert (ip.src, ip.dst, ip.proto) == (VIP4, CLIENT4, 1)
    assert (icmp.type, icmp.code, icmp.nexthopmtu) == (3, 4, 1500 - 20)
    ip4_header_ok(ip)
    quote = raw(icmp.payload)
    assert quote == pkt_in[14:14 + len(quote)] and len(quote) >= 28
    assert len(ip) == 20 + 8 + 548  # IP, ICMP, as much quote as fits 576 bytes (RFC 1812 4.3.2.3)
    c = icmp.copy(); c.chksum = None
    assert icmp.chksum == ICMP(raw(c)).chksum
    assert delta(before, reasons(env)) == {"tx_icmp_too_big": 1}


def test_ipv6_packet_too_big_quotes_the_original(env):
    s = svc("big6", VIP6, 80, B6[:2])
    env.apply([s])
    pkt_in = frame(CLIENT6, VIP6, TCP(sport=1111, dport=80, flags="A") / Raw(b"B" * (1500 - 60)))
    v, out, _ = env.run(pkt_in)
    assert v == XDP_TX
    o = Ether(out)
    ip6 = o[IPv6]
    ptb = o[ICMPv6PacketTooBig]
    assert ipaddress.ip_address(ip6.src) == ipaddress.ip_address(VIP6)
    assert ipaddress.ip_address(ip6.dst) == ipaddress.ip_address(CLIENT6)
    assert ptb.mtu == 1500 - 40
    quote = raw(ptb.payload)
    assert quote == pkt_in[14:14 + len(quote)] and len(quote) >= 48
    assert len(ip6) == 40 + 8 + 1232  # IPv6, ICMPv6, as much quote as fits 1280 bytes (RFC 4443 2.4(c))
    rebuilt = IPv6(raw(ip6))
    c = rebuilt.copy()
    c[ICMPv6PacketTooBig].cksum = None
    assert ptb.cksum == IPv6(raw(c))[ICMPv6PacketTooBig].cksum


def test_too_big_replies_are_rate_limited(env):
    s = svc("rl", VIP4, 80, B4[:2])
    env.apply([s])
    env.set_runtime(icmp_rate=1)   # burst 1: one reply, then suppression
    try:
        pkt_in = frame(CLIENT4, VIP4, TCP(sport=1, dport=80, flags="A") / Raw(b"B" * 1460), flags="DF")
        before = reasons(env)
        verdicts = [env.run(pkt_in)[0] for _ in range(5)]
        d = delta(before, reasons(env))
        assert verdicts.count(XDP_DROP) >= 3
        assert d["drop_icmp_ratelimit"] >= 3 and d.get("tx_icmp_too_big", 0) <= 2
    finally:
        env.set_runtime(icmp_rate=1000)


# --- what must be left alone ------------------------------------------------------------------------------

def test_non_service_traffic_is_passed_untouched(env):
    env.apply([svc("only80", VIP4, 80, B4[:2], answer_ping=False)])
    cases = [
        frame(CLIENT4, VIP4, TCP(sport=1, dport=22, flags="S")),            # other port
        frame(CLIENT4, VIP4, UDP(sport=1, dport=80)),                        # other protocol
        frame(CLIENT4, "198.51.100.2", TCP(sport=1, dport=80, flags="S")),  # other address
        frame(CLIENT4, VIP4, ICMP()),                                         # ping, VIP does not answer
        raw(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=VIP4)),
    ]
    for pkt in cases:
        v, out, _ = env.run(pkt)
        assert v == XDP_PASS and out == pkt


@pytest.mark.parametrize("mangle", ["short_ip", "ihl_small", "tot_len_long", "short_tcp", "short_v6", "v6_plen_long"])
def test_malformed_and_truncated_packets_pass_unchanged(env, mangle):
    env.apply([svc("m4", VIP4, 80, B4[:2]), svc("m6", VIP6, 80, B6[:2])])
    p4 = bytearray(frame(CLIENT4, VIP4, TCP(sport=9, dport=80, flags="S")))
    p6 = bytearray(frame(CLIENT6, VIP6, TCP(sport=9, dport=80, flags="S")))
    pkt = {
        "short_ip": bytes(p4[:14 + 12]),
        "ihl_small": bytes(p4[:14] + bytes([0x44]) + p4[15:]),
        "tot_len_long": bytes(p4[:16] + (1400).to_bytes(2, "big") + p4[18:]),
        "short_tcp": bytes(p4[:14 + 20 + 10]),
        "short_v6": bytes(p6[:14 + 30]),
        "v6_plen_long": bytes(p6[:18] + (900).to_bytes(2, "big") + p6[20:]),
    }[mangle]
    before = reasons(env)
    v, out, _ = env.run(pkt)
    assert v == XDP_PASS and out == pkt
    assert delta(before, reasons(env)) == {"pass_malformed": 1}


def test_ipv4_options_are_parsed_and_kept(env):
    s = svc("opts", VIP4, 80, B4[:2])
    env.apply([s])
    pkt_in = frame(CLIENT4, VIP4, TCP(sport=7, dport=80, flags="S"), options=[IPOption_RR(routers=["0.0.0.0"] * 2)])
    assert IP(pkt_in[14:]).ihl > 5
    v, out, _ = env.run(pkt_in)
    assert v == XDP_TX
    o = Ether(out)
    assert o[IP].ihl == 5 and raw(o[IP].payload) == pkt_in[14:]


def test_ipv6_extension_headers_are_skipped(env):
    s = svc("ext6", VIP6, 80, B6[:2])
    env.apply([s])
    pkt_in = raw(Ether() / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                 / TCP(sport=7, dport=80, flags="S"))
    v, out, _ = env.run(pkt_in)
    assert v == XDP_TX and raw(Ether(out)[IPv6].payload) == pkt_in[14:]


def test_fragments_not_for_a_service_go_to_the_kernel(env):
    """Fragments of services: tests/test_edge_packets.py."""
    env.apply([svc("frag", VIP4, 80, B4[:2]), svc("frag6", VIP6, 80, B6[:2])])
    before = reasons(env)
    f4 = frame(CLIENT4, VIP4, TCP(sport=7, dport=81, flags="S"), flags="MF")          # no service on 81
    f4_later = frame(CLIENT4, "192.0.2.1", Raw(b"x" * 16), flags=0, frag=3, proto=6)  # not a VIP
    f6 = raw(Ether() / IPv6(src=CLIENT6, dst="2001:db8:2::1") / IPv6ExtHdrFragment(m=0, offset=3, nh=6) / Raw(b"y" * 8))
    for pkt in (f4, f4_later, f6):
        v, out, _ = env.run(pkt)
        assert v == XDP_PASS and out == pkt
    assert delta(before, reasons(env)) == {"pass_not_service": 1, "pass_fragment": 2}


# --- weights and empty services ------------------------------------------------------------------------------

def test_weight_zero_takes_no_new_flows(env):
    s = svc("w0", VIP4, 80, [{"address": B4[0], "weight": 0}] + B4[1:4])
    env.apply([s])
    for i in range(150):
        v, out, _ = env.run(frame(f"203.0.113.{i % 200 + 1}", VIP4, TCP(sport=2000 + i, dport=80, flags="S")))
        assert Ether(out)[IP].dst != B4[0]


def test_empty_service_with_drop_policy_drops_and_counts(env):
    """The default policy, reject: tests/test_edge_packets.py."""
    env.apply([svc("empty", VIP4, 80, [], no_backend="drop"),
               svc("allzero", VIP4, 81, [{"address": B4[0], "weight": 0}], no_backend="drop")])
    before = reasons(env)
    for port in (80, 81):
        v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=1, dport=port, flags="S")))
        assert v == XDP_DROP
    assert delta(before, reasons(env)) == {"drop_no_backend": 2}


# --- next hop ----------------------------------------------------------------------------------------------------

def test_missing_neighbour_goes_to_the_kernel_encapsulated(env):
    s = svc("noneigh", VIP4, 80, [NO_NEIGH_V4])
    # the datapath would create a managed entry; take it away again so the
    # lookup really finds no neighbour
    env.apply([s])
    from l4lb.lab import netns
    netns.run(env.ns, "ip", "neigh", "flush", "to", NO_NEIGH_V4, check=False)
    netns.run(env.ns, "ip", "neigh", "del", NO_NEIGH_V4, "dev", "edge0", check=False)
    before = reasons(env)
    pkt_in = frame(CLIENT4, VIP4, TCP(sport=1, dport=80, flags="S"))
    v, out, _ = env.run(pkt_in)
    assert v == XDP_PASS
    o = Ether(out)
    assert o[IP].proto == 4 and o[IP].dst == NO_NEIGH_V4 and raw(o[IP].payload) == pkt_in[14:]
    assert o.dst == "02:11:11:11:11:11", "the kernel must see the frame as addressed to this host"
    assert delta(before, reasons(env)) == {"pass_no_neigh": 1}


def test_backend_behind_another_nic_is_redirected(env):
    s = svc("redir", VIP4, 80, ["203.0.113.10"])
    env.apply([s])
    before = reasons(env)
    v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=1, dport=80, flags="S")))
    assert v == XDP_REDIRECT
    o = Ether(out)
    assert o[IP].src == OUT_V4 and o[IP].dst == "203.0.113.10" and o.src == env.out_mac
    assert delta(before, reasons(env)) == {"redirect": 1}


# --- counters and atomic table swaps ----------------------------------------------------------------------------------

def test_per_service_and_backend_counters(env):
    s = svc("count", VIP4, 80, B4[:2])
    env.apply([s])
    st0 = env.call(env.dp.stats)
    pkt = frame(CLIENT4, VIP4, TCP(sport=3, dport=80, flags="S"))
    for _ in range(5):
        env.run(pkt)
    st1 = env.call(env.dp.stats)
    be = expected_backend(s, CLIENT4, 3)
    sk = s.key
    assert st1.services[sk]["packets"] - st0.services[sk]["packets"] == 5
    assert st1.services[sk]["bytes"] - st0.services[sk]["bytes"] == 5 * len(pkt)
    bk = (sk, (ipaddress.ip_address(be).exploded, 80))
    assert st1.backends[bk]["packets"] - st0.backends[bk]["packets"] == 5


def test_table_swap_is_atomic_for_packets_in_flight(env):
    a = svc("swap", VIP4, 80, B4[:4])
    b = svc("swap", VIP4, 80, B4[4:8])
    env.apply([a])
    stop = threading.Event()
    errors: list[str] = []

    def flip():
        i = 0
        while not stop.is_set():
            env.apply([b if i % 2 else a])
            i += 1

    t = threading.Thread(target=flip)
    before = reasons(env)
    t.start()
    try:
        for i in range(300):
            v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=10000 + i, dport=80, flags="S")))
            if v != XDP_TX or Ether(out)[IP].dst not in B4[:8]:
                errors.append(f"{v} {Ether(out).summary()}")
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert "drop_no_backend" not in delta(before, reasons(env))


def test_bad_apply_changes_nothing(env):
    good = svc("keep", VIP4, 80, B4[:2])
    env.apply([good])
    st = env.call(env.dp.stats)
    env.dp.fail_after_writes = 2
    from l4lb.datapath import DatapathError
    with pytest.raises(DatapathError):
        env.apply([svc("keep", VIP4, 80, B4[2:6]), svc("new", VIP4, 81, B4[:3])])
    assert set(env.call(env.dp.stats).services) == set(st.services)
    v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=77, dport=80, flags="S")))
    assert Ether(out)[IP].dst == expected_backend(good, CLIENT4, 77)
    v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=77, dport=81, flags="S")))
    assert v == XDP_PASS


def test_apply_rebuilds_only_changed_tables(env, monkeypatch):
    a = svc("keep-a", VIP4, 80, B4[:4])
    b = svc("keep-b", VIP4, 81, B4[:4])
    env.apply([a, b])
    written: list[int] = []
    rings = env.dp._rings
    real = rings.write
    monkeypatch.setattr(rings, "write", lambda idx, ids, inputs: (written.append(idx), real(idx, ids, inputs)))

    def ring_of(s: Service) -> int:
        return env.call(env.dp.tables.read_services)[(s.vip.exploded, s.port, 6)][2]

    env.apply([a, b])
    assert written == []
    before = ring_of(b)
    b2 = svc("keep-b", VIP4, 81, [{"address": x, "state": "draining" if x == B4[0] else "active"} for x in B4[:4]])
    env.apply([a, b2])
    assert written == [ring_of(b2)] and ring_of(b2) != before  # one table written, in a spare buffer
    from l4lb.datapath import maglevbuild

    built: list[int] = []
    real_build = maglevbuild.maglev.build
    monkeypatch.setattr(maglevbuild.maglev, "build", lambda w, m, seed: (built.append(len(w)), real_build(w, m, seed))[1])
    env.dp._builder._built.clear()  # as at 1,000 services: b's table is long out of the small cache
    env.apply([a, b])  # the undo: the old buffer still holds b's table, only the entry points back
    assert len(written) == 1 and ring_of(b) == before
    assert built == [] and env.dp.last_timings.tables == 0, "the undo's table is in a buffer: nothing to build"
    for sport in range(4000, 4020):
        v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=sport, dport=81, flags="S")))
        assert Ether(out)[IP].dst == expected_backend(b, CLIENT4, sport)


def test_a_drain_writes_no_outer_slot_and_waits_for_no_grace_period(env):
    """The kernel waits for an RCU grace period after every maglev_outer write;
    a drain must not pay it: its table goes into an existing spare buffer."""
    def outer_ids() -> dict[int, int]:
        t = env.dp.tables
        return {k.value: v.value for k, v in env.call(lambda: list(t.maglev_outer.items()))}

    backends = [{"address": x} for x in B4[:4]]
    s = svc("grace", VIP4, 90, backends)
    env.apply([s])
    drained = svc("grace", VIP4, 90, [{**backends[0], "state": "draining"}, *backends[1:]])
    env.apply([drained])  # the first change may create the service's spare buffer
    env.dp._rings.grace()
    ids = outer_ids()
    for state in (s, drained, svc("grace", VIP4, 90, [backends[0], {**backends[1], "state": "draining"},
                                                        *backends[2:]])):
        env.dp._rings.grace()  # what the background thread does between requests
        env.apply([state])
        assert outer_ids() == ids and env.dp.last_timings.grace == 0
        for sport in range(3000, 3040):
            v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=sport, dport=90, flags="S")))
            assert Ether(out)[IP].dst == expected_backend(state, CLIENT4, sport)


def test_prefetched_tables_are_used_by_the_apply_and_are_the_right_ones(env, monkeypatch):
    """A bulk change builds its Maglev tables ahead (while the daemon diffs and
    stages); the apply then builds nothing and packets go where Python says."""
    from l4lb.datapath import maglevbuild

    services = [svc(f"pf{i}", VIP4, 2000 + i, B4[i % 5:i % 5 + 3]) for i in range(20)]
    env.call(env.dp.prefetch, services)
    assert env.dp._builder.prefetched is not None, "20 new tables should be prefetched"
    env.dp._builder.prefetched[1].join()
    jobs: list[int] = []
    real = maglevbuild.maglev.build_many
    monkeypatch.setattr(maglevbuild.maglev, "build_many", lambda ws, m, seed: (jobs.append(len(ws)), real(ws, m, seed))[1])
    env.apply(services)
    assert sum(jobs) == 0 and env.dp._builder.prefetched is None
    for s in services[::4]:
        for sport in range(5000, 5010):
            v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=sport, dport=s.port, flags="S")))
            assert v == XDP_TX and Ether(out)[IP].dst == expected_backend(s, CLIENT4, sport)
    # The same document again, parsed into new objects (a PUT of the whole state that
    # changes nothing): equal services are not built again.
    env.call(env.dp.prefetch, [Service.model_validate(s.model_dump()) for s in services])
    assert env.dp._builder.weights == {} and env.dp._builder.prefetched is None, "unchanged services were looked at"
