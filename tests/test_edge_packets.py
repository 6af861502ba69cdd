"""Edge traffic on the real program (BPF_PROG_TEST_RUN, scapy packets), issue 14:
length lies and trimming, long IPv6 header chains, whom replies may go to,
reject/drop without a backend, ping to a VIP, ICMP errors to the flow's
backend, fragments to the first fragment's backend, DF-clear oversize handed
to the kernel to fragment. Real traffic for the same paths:
tests/test_edge_traffic.py."""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest
from scapy.all import (
    ICMP, IP, TCP, UDP, Ether, ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6PacketTooBig,
    IPOption_RR, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, Raw, raw,
)
from test_datapath_packets import (
    B4, B6, CLIENT4, CLIENT6, M, VIP4, VIP6, XDP_DROP, XDP_PASS, XDP_TX, delta, expected_backend, frame,
    ip4_header_ok, reasons, svc,
)

from l4lb.lab.pktenv import EDGE_V4, EDGE_V6

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

ROUTER4, ROUTER6 = "192.0.2.254", "2001:db8:2::fe"
CLIENT_MAC, LB_MAC = "02:22:22:22:22:22", "02:11:11:11:11:11"


@pytest.fixture(scope="module")
def env(packet_env):
    assert packet_env.cfg.maglev_m == M
    return packet_env


@pytest.fixture
def runtime(env):
    """Change run-time knobs for one test; put them back after it."""
    before = env.dp.cfg
    yield env.set_runtime
    env.call(env.dp.update_runtime, before)


def ether(pkt) -> bytes:
    return raw(Ether(dst=LB_MAC, src=CLIENT_MAC) / pkt)


def inet_sum_ok(data: bytes) -> bool:
    """RFC 1071: a message with a correct checksum sums to 0xffff."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def csum_ok(frame_bytes: bytes) -> None:
    """The L4 checksum (TCP, UDP, ICMP, ICMPv6) of an IP packet without
    extension headers in an Ethernet frame, checked on the bytes (no scapy)."""
    ip = frame_bytes[14:]
    if ip[0] >> 4 == 4:
        hl, proto, total = (ip[0] & 0xF) * 4, ip[9], int.from_bytes(ip[2:4], "big")
        l4 = ip[hl:total]
        pseudo = b"" if proto == 1 else ip[12:20] + bytes([0, proto]) + len(l4).to_bytes(2, "big")
    else:
        proto, plen = ip[6], int.from_bytes(ip[4:6], "big")
        l4 = ip[40:40 + plen]
        pseudo = ip[8:40] + len(l4).to_bytes(4, "big") + bytes([0, 0, 0, proto])
    assert inet_sum_ok(pseudo + l4), f"protocol {proto}: bad checksum"


def ip_eq(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


# --- item 4: length lies are malformed; bytes after the IP packet are trimmed ----------------------

def _v4(l4, **ip) -> bytearray:
    return bytearray(frame(CLIENT4, VIP4, l4, **ip))


def _lies() -> dict[str, bytes]:
    tcp = _v4(TCP(sport=9, dport=80, flags="S"))
    udp = _v4(UDP(sport=9, dport=53) / Raw(b"q" * 12))
    v6 = bytearray(frame(CLIENT6, VIP6, TCP(sport=9, dport=80, flags="S")))
    out = {
        "ip_total_length_20_tcp_after": tcp[:16] + (20).to_bytes(2, "big") + tcp[18:],
        "ip_total_length_cuts_tcp": tcp[:16] + (30).to_bytes(2, "big") + tcp[18:],
        "tcp_data_offset_past_packet": tcp[:14 + 20 + 12] + bytes([0xF0]) + tcp[14 + 20 + 13:],
        "udp_length_longer": udp[:14 + 20 + 4] + (40).to_bytes(2, "big") + udp[14 + 20 + 6:],
        "udp_length_shorter": udp[:14 + 20 + 4] + (10).to_bytes(2, "big") + udp[14 + 20 + 6:],
        "udp_length_below_header": udp[:14 + 20 + 4] + (4).to_bytes(2, "big") + udp[14 + 20 + 6:],
        "udp_header_past_ip_length": udp[:16] + (24).to_bytes(2, "big") + udp[18:],
        "ipv6_payload_length_0_with_payload": v6[:18] + (0).to_bytes(2, "big") + v6[20:],
    }
    return {k: bytes(v) for k, v in out.items()}


@pytest.mark.parametrize("lie", sorted(_lies()))
def test_length_lies_are_malformed_and_never_encapsulated(env, lie):
    env.apply([svc("lie4", VIP4, 80, B4[:2]), svc("lie4u", VIP4, 53, B4[:2], proto="udp"),
               svc("lie6", VIP6, 80, B6[:2])])
    pkt = _lies()[lie]
    before = reasons(env)
    v, out, _ = env.run(pkt)
    assert v == XDP_PASS and out == pkt
    assert delta(before, reasons(env)) == {"pass_malformed": 1}


@pytest.mark.parametrize("family", [4, 6])
def test_bytes_after_the_ip_packet_are_trimmed_before_encapsulation(env, family):
    vip, client, cls = (VIP4, CLIENT4, IP) if family == 4 else (VIP6, CLIENT6, IPv6)
    env.apply([svc("trim", vip, 80, B4[:2] if family == 4 else B6[:2])])
    good = frame(client, vip, TCP(sport=5, dport=80, flags="A"))
    for junk in (b"\0" * (60 - len(good)) if len(good) < 60 else b"", b"J" * 100, b"K" * 1400):
        if not junk:
            continue
        v, out, _ = env.run(good + junk)
        assert v == XDP_TX
        o = Ether(out)
        hl = 20 if family == 4 else 40
        assert len(out) == len(good) + hl, f"{len(junk)} trailing bytes travelled"
        assert raw(o[cls].payload) == good[14:]
        assert (o[IP].len if family == 4 else o[IPv6].plen + 40) == len(good) - 14 + hl


def test_ethernet_padding_of_a_minimum_frame_is_trimmed(env):
    env.apply([svc("pad", VIP4, 80, B4[:2])])
    ack = frame(CLIENT4, VIP4, TCP(sport=6, dport=80, flags="A"))
    assert len(ack) == 54
    v, out, _ = env.run(ack + b"\0" * 6)   # what a NIC hands over: padded to 60
    assert v == XDP_TX and len(out) == 54 + 20 and raw(Ether(out)[IP].payload) == ack[14:]


# --- item 8: long IPv6 header chains -------------------------------------------------------------------

def test_ipv6_chain_of_four_extension_headers_is_followed_five_are_counted(env):
    env.apply([svc("ext6", VIP6, 80, B6[:2])])
    four = ether(IPv6(src=CLIENT6, dst=VIP6) / (IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                 / IPv6ExtHdrDestOpt()) / TCP(sport=7, dport=80, flags="S"))
    five = ether(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                 / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / TCP(sport=7, dport=80, flags="S"))
    before = reasons(env)
    v, out, _ = env.run(four)
    assert v == XDP_TX and raw(Ether(out)[IPv6].payload) == four[14:]
    v, out, _ = env.run(five)
    assert v == XDP_PASS and out == five
    assert delta(before, reasons(env)) == {"tx": 1, "pass_ext_headers": 1}


# --- item 6: no usable backend -> reject (RST / port unreachable) or drop -----------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_syn_to_a_service_without_backends_gets_a_rst_from_the_vip(env, family):
    vip, client = (VIP4, CLIENT4) if family == 4 else (VIP6, CLIENT6)
    env.apply([svc("none", vip, 80, [])])
    syn = frame(client, vip, TCP(sport=40001, dport=80, flags="S", seq=1000, options=[("MSS", 1460)]))
    before = reasons(env)
    v, out, _ = env.run(syn)
    assert v == XDP_TX
    o = Ether(out)
    assert (o.dst, o.src) == (CLIENT_MAC, LB_MAC)
    ip = o[IP] if family == 4 else o[IPv6]
    assert ip_eq(ip.src, vip) and ip_eq(ip.dst, client)
    t = o[TCP]
    assert (t.sport, t.dport, t.flags, t.seq, t.ack, t.dataofs) == (80, 40001, "RA", 0, 1001, 5)
    assert len(raw(t)) == 20 and not raw(t.payload)
    csum_ok(out)
    if family == 4:
        ip4_header_ok(ip)
        assert ip.len == 40 and ip.flags == "DF"
    assert delta(before, reasons(env)) == {"tx_reject": 1}


def test_established_flow_whose_only_backend_went_to_maintenance_gets_a_rst(env):
    up = svc("maint", VIP4, 80, [B4[0]])
    env.apply([up])
    v, _, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=40002, dport=80, flags="S", seq=5)))
    assert v == XDP_TX
    env.apply([svc("maint", VIP4, 80, [{"address": B4[0], "state": "maintenance"}])])
    data = frame(CLIENT4, VIP4, TCP(sport=40002, dport=80, flags="PA", seq=6, ack=777) / Raw(b"GET /"))
    v, out, _ = env.run(data)
    assert v == XDP_TX
    t = Ether(out)[TCP]
    # RFC 9293 3.10.7.1: <SEQ=SEG.ACK><CTL=RST>, which the client accepts (its RCV.NXT)
    assert (t.flags, t.seq, t.ack) == ("R", 777, 0)
    csum_ok(out)


def test_rst_and_fin_lengths_in_the_reset(env):
    env.apply([svc("none", VIP4, 80, [])])
    before = reasons(env)
    v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=1, dport=80, flags="R", seq=9)))
    assert v == XDP_DROP, "never a RST for a RST"
    v, out, _ = env.run(frame(CLIENT4, VIP4, TCP(sport=1, dport=80, flags="F", seq=9) / Raw(b"abc")))
    assert v == XDP_TX and (Ether(out)[TCP].flags, Ether(out)[TCP].ack) == ("RA", 9 + 3 + 1)
    assert delta(before, reasons(env)) == {"drop_no_backend": 1, "tx_reject": 1}


@pytest.mark.parametrize("family", [4, 6])
def test_udp_to_a_service_without_backends_gets_port_unreachable_quoting_it(env, family):
    vip, client = (VIP4, CLIENT4) if family == 4 else (VIP6, CLIENT6)
    env.apply([svc("dns", vip, 53, [{"address": (B4 if family == 4 else B6)[0], "state": "draining"}],
                   proto="udp")])
    q = frame(client, vip, UDP(sport=5353, dport=53) / Raw(b"query" * 3))
    v, out, _ = env.run(q)
    assert v == XDP_TX
    o = Ether(out)
    if family == 4:
        ip, icmp = o[IP], o[ICMP]
        assert (ip.src, ip.dst, icmp.type, icmp.code) == (VIP4, CLIENT4, 3, 3)
        ip4_header_ok(ip)
        quote = raw(icmp.payload)
        csum_ok(out)
    else:
        ip, icmp = o[IPv6], o[ICMPv6DestUnreach]
        assert ip_eq(ip.src, VIP6) and ip_eq(ip.dst, CLIENT6) and (icmp.type, icmp.code) == (1, 4)
        quote = raw(icmp.payload)
        csum_ok(out)
    # the whole datagram fits: quoted up to its last multiple of 4 bytes
    assert quote == q[14:14 + len(quote)] and len(q) - 14 - len(quote) < 4


def test_drop_policy_drops_silently(env):
    env.apply([svc("quiet", VIP4, 80, [], no_backend="drop"), svc("quiet6", VIP6, 53, [], proto="udp",
                                                                  no_backend="drop")])
    before = reasons(env)
    for pkt in (frame(CLIENT4, VIP4, TCP(sport=1, dport=80, flags="S")),
                frame(CLIENT6, VIP6, UDP(sport=1, dport=53) / Raw(b"x"))):
        assert env.run(pkt)[0] == XDP_DROP
    assert delta(before, reasons(env)) == {"drop_no_backend": 2}


def test_replies_have_their_own_rate_limit_buckets(env, runtime):
    """A flood of rejects (or pings) cannot use up the too-big replies PMTU needs."""
    env.apply([svc("none", VIP4, 80, []), svc("big", VIP4, 81, B4[:2])])
    runtime(icmp_rate=1)   # burst 1 per kind
    before = reasons(env)
    syn = frame(CLIENT4, VIP4, TCP(sport=2, dport=80, flags="S"))
    verdicts = [env.run(syn)[0] for _ in range(4)]
    big = frame(CLIENT4, VIP4, TCP(sport=2, dport=81, flags="A") / Raw(b"B" * 1460), flags="DF")
    assert env.run(big)[0] == XDP_TX, "the too-big bucket is untouched by the rejects"
    ping = frame(CLIENT4, VIP4, ICMP(type=8, id=1, seq=1))
    assert [env.run(ping)[0] for _ in range(3)].count(XDP_TX) >= 1
    d = delta(before, reasons(env))
    assert verdicts.count(XDP_DROP) >= 2 and d["drop_reject_ratelimit"] >= 2 and d["tx_reject"] <= 2
    assert d["tx_icmp_too_big"] == 1 and d.get("drop_echo_ratelimit", 0) >= 1


# --- item 5: replies never go where they must not ------------------------------------------------------------

FORBIDDEN4 = ["0.0.0.0", "0.1.2.3", "127.0.0.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255"]
FORBIDDEN6 = ["::", "::1", "ff02::1", "ff0e::1234"]


@pytest.mark.parametrize("src", FORBIDDEN4 + FORBIDDEN6)
def test_no_reply_to_an_address_that_names_no_single_host(env, src):
    six = ":" in src
    vip = VIP6 if six else VIP4
    env.apply([svc("none", vip, 80, []), svc("big", vip, 81, (B6 if six else B4)[:2])])
    before = reasons(env)
    cases = [frame(src, vip, TCP(sport=3, dport=80, flags="S")),
             frame(src, vip, TCP(sport=3, dport=81, flags="A") / Raw(b"B" * 1440)) if six else
             frame(src, vip, TCP(sport=3, dport=81, flags="A") / Raw(b"B" * 1460), flags="DF"),
             frame(src, vip, ICMPv6EchoRequest() if six else ICMP(type=8))]
    for pkt in cases:
        v, out, _ = env.run(pkt)
        assert v == XDP_DROP and out == pkt
    assert delta(before, reasons(env)) == {"drop_reply_forbidden": 3}


def test_no_reject_for_a_link_layer_broadcast_and_no_icmp_about_a_later_v4_fragment(env):
    env.apply([svc("none", VIP4, 80, []), svc("big", VIP4, 81, B4[:2], proto="udp")])
    bcast = raw(Ether(dst="ff:ff:ff:ff:ff:ff", src=CLIENT_MAC) / IP(src=CLIENT4, dst=VIP4)
                / TCP(sport=3, dport=80, flags="S"))
    # a later fragment with DF (odd, but possible) that is too big: no frag-needed about it
    first = _fix_udp_len(frame(CLIENT4, VIP4, UDP(sport=3, dport=81) / Raw(b"a" * 64), flags="MF", id=77), 2000)
    later = frame(CLIENT4, VIP4, Raw(b"b" * 1480), flags="DF", frag=9, id=77, proto=17)
    before = reasons(env)
    assert env.run(bcast)[0] == XDP_DROP
    assert env.run(first)[0] == XDP_TX
    assert env.run(later)[0] == XDP_DROP
    assert delta(before, reasons(env)) == {"drop_reply_forbidden": 2, "tx": 1}


# --- item 7: ping to a VIP ---------------------------------------------------------------------------------

def test_ping_to_a_vip_is_answered_from_the_vip(env):
    env.apply([svc("p4", VIP4, 80, B4[:2]), svc("p6", VIP6, 80, B6[:2])])
    before = reasons(env)
    req = frame(CLIENT4, VIP4, ICMP(type=8, id=0x1234, seq=7) / Raw(b"abcdefgh" * 7))
    v, out, _ = env.run(req + b"\0" * 10)     # trailing bytes are not echoed
    assert v == XDP_TX
    o = Ether(out)
    assert (o.dst, o.src, o[IP].src, o[IP].dst, o[IP].ttl) == (CLIENT_MAC, LB_MAC, VIP4, CLIENT4, 64)
    assert (o[ICMP].type, o[ICMP].code, o[ICMP].id, o[ICMP].seq) == (0, 0, 0x1234, 7)
    assert raw(o[ICMP].payload) == b"abcdefgh" * 7 and len(out) == len(req)
    ip4_header_ok(o[IP])
    csum_ok(out)
    req6 = frame(CLIENT6, VIP6, ICMPv6EchoRequest(id=9, seq=3, data=b"ping6" * 5))
    v, out, _ = env.run(req6)
    assert v == XDP_TX
    o = Ether(out)
    rep = o[ICMPv6EchoReply]
    assert ip_eq(o[IPv6].src, VIP6) and ip_eq(o[IPv6].dst, CLIENT6) and (rep.id, rep.seq) == (9, 3)
    assert rep.data == b"ping6" * 5
    csum_ok(out)
    assert delta(before, reasons(env)) == {"tx_echo": 2}


def test_ping_is_answered_only_for_vips_whose_services_ask_for_it(env):
    env.apply([svc("quiet", VIP4, 80, B4[:2], answer_ping=False),
               svc("quiet2", VIP4, 81, B4[:2], answer_ping=False),
               svc("loud", "198.51.100.7", 80, B4[:2], answer_ping=False),
               svc("loud2", "198.51.100.7", 81, B4[:2])])
    before = reasons(env)
    for dst, want in ((VIP4, XDP_PASS), ("198.51.100.7", XDP_TX), ("198.51.100.9", XDP_PASS), (EDGE_V4, XDP_PASS)):
        v, out, _ = env.run(frame(CLIENT4, dst, ICMP(type=8)))
        assert v == want, dst
    # echo requests with IP options are left to the kernel
    v, _, _ = env.run(frame(CLIENT4, "198.51.100.7", ICMP(type=8), options=[IPOption_RR(routers=["0.0.0.0"])]))
    assert v == XDP_PASS
    assert delta(before, reasons(env)) == {"tx_echo": 1, "pass_not_service": 4}


def test_removing_the_last_service_of_a_vip_stops_the_answers(env):
    env.apply([svc("p4", VIP4, 80, B4[:2])])
    ping = frame(CLIENT4, VIP4, ICMP(type=8))
    assert env.run(ping)[0] == XDP_TX
    env.apply([svc("other", "198.51.100.7", 80, B4[:2])])
    assert env.run(ping)[0] == XDP_PASS
    vips = env.dp.tables.vips
    assert [(k.family, bytes(k.addr[0].to_bytes(4, "little"))) for k in env.call(lambda: list(vips.keys()))] == [
        (4, ipaddress.ip_address("198.51.100.7").packed)]


# --- item 1: ICMP errors about VIP flows go to the flow's backend --------------------------------------------

def frag_needed(client: str, sport: int, vip: str = VIP4, port: int = 80, proto=TCP, mtu: int = 1400) -> bytes:
    quoted = IP(src=vip, dst=client, flags="DF") / proto(sport=port, dport=sport) / Raw(b"r" * 40)
    return ether(IP(src=ROUTER4, dst=vip) / ICMP(type=3, code=4, nexthopmtu=mtu) / raw(quoted))


def too_big6(client: str, sport: int, vip: str = VIP6, port: int = 80, mtu: int = 1280) -> bytes:
    quoted = IPv6(src=vip, dst=client) / TCP(sport=port, dport=sport) / Raw(b"r" * 40)
    return ether(IPv6(src=ROUTER6, dst=vip) / ICMPv6PacketTooBig(mtu=mtu) / raw(quoted))


def encapsulated_to(out: bytes, family: int = 4) -> tuple[str, bytes]:
    o = Ether(out)
    outer = o[IP] if family == 4 else o[IPv6]
    return str(ipaddress.ip_address(outer.dst)), raw(outer.payload)


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_error_reaches_the_backend_of_an_established_flow(env, family):
    vip, client, bs = (VIP4, CLIENT4, B4) if family == 4 else (VIP6, CLIENT6, B6)
    first = svc("pmtu", vip, 80, bs[:3])
    env.apply([first])
    owner = {}
    for sport in range(45000, 45060):
        v, out, _ = env.run(frame(client, vip, TCP(sport=sport, dport=80, flags="S")))
        owner[sport] = encapsulated_to(out, family)[0]
    more = svc("pmtu", vip, 80, bs[:8])      # the table changes; established flows keep their backend
    env.apply([more])
    moved = [s for s in owner if not ip_eq(expected_backend(more, client, s), owner[s])]
    assert len(moved) >= 10
    before = reasons(env)
    for sport in moved[:10]:
        err = frag_needed(client, sport) if family == 4 else too_big6(client, sport)
        v, out, _ = env.run(err)
        assert v == XDP_TX
        dst, inner = encapsulated_to(out, family)
        assert ip_eq(dst, owner[sport]), "the flow-table entry decides, not today's Maglev table"
        assert inner == err[14:], "the ICMP error travels unchanged"
        # and from the same outer source as the flow's own packets
        _, fout, _ = env.run(frame(client, vip, TCP(sport=sport, dport=80, flags="A")))
        src = Ether(out)[IP].src if family == 4 else Ether(out)[IPv6].src
        assert src == (Ether(fout)[IP].src if family == 4 else Ether(fout)[IPv6].src)
    assert delta(before, reasons(env)) == {"fwd_icmp_error": 10, "tx": 10}


def test_icmp_error_about_a_flow_not_in_the_table_follows_maglev_and_inserts_nothing(env):
    a = svc("pmtu", VIP4, 80, B4[:3])
    b = svc("pmtu", VIP4, 80, B4[:8])
    env.apply([a])
    # a flow the table has never seen, whose Maglev backend differs between a and b
    sport = next(s for s in range(46000, 47000)
                 if not ip_eq(expected_backend(a, CLIENT4, s), expected_backend(b, CLIENT4, s)))
    v, out, _ = env.run(frag_needed(CLIENT4, sport))
    assert v == XDP_TX and ip_eq(encapsulated_to(out)[0], expected_backend(a, CLIENT4, sport))
    env.apply([b])
    v, out, _ = env.run(frag_needed(CLIENT4, sport))
    assert ip_eq(encapsulated_to(out)[0], expected_backend(b, CLIENT4, sport)), \
        "an ICMP error must not create a flow-table entry"


def test_icmp_errors_udp_time_exceeded_and_dnat_quote(env):
    env.apply([svc("dns", VIP4, 53, B4[:4], proto="udp"),
               svc("alt", VIP4, 8000, [{"address": B4[5], "port": 8080}], l4_dnat=True)])
    v, out, _ = env.run(frag_needed(CLIENT4, 5353, port=53, proto=UDP))
    assert v == XDP_TX and ip_eq(encapsulated_to(out)[0], expected_backend(
        svc("dns", VIP4, 53, B4[:4], proto="udp"), CLIENT4, 5353))
    exceeded = ether(IP(src=ROUTER4, dst=VIP4) / ICMP(type=11, code=0)
                     / raw(IP(src=VIP4, dst=CLIENT4) / UDP(sport=53, dport=5353)))
    assert env.run(exceeded)[0] == XDP_TX
    # L4 DNAT: the backend's socket is VIP:8080, so the quote names 8080 again
    err = frag_needed(CLIENT4, 41000, port=8000)
    v, out, _ = env.run(err)
    assert v == XDP_TX
    dst, inner = encapsulated_to(out)
    assert dst == B4[5]
    icmp = IP(inner)
    quoted = IP(raw(icmp[ICMP].payload))
    assert (quoted[TCP].sport, quoted[TCP].dport) == (8080, 41000)
    c = icmp.copy()
    c[ICMP].chksum = None
    assert icmp[ICMP].chksum == IP(raw(c))[ICMP].chksum


def test_icmp_errors_that_are_not_about_a_vip_flow_go_to_the_kernel(env, runtime):
    env.apply([svc("pmtu", VIP4, 80, B4[:3])])
    cases = [
        frag_needed(CLIENT4, 1, port=81),                         # no service on 81
        ether(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4)     # quote from another address
              / raw(IP(src="198.51.100.7", dst=CLIENT4) / TCP(sport=80, dport=1))),
        ether(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4)     # quote cut before the ports
              / raw(IP(src=VIP4, dst=CLIENT4, proto=6))[:22]),
        ether(IP(src=ROUTER4, dst=VIP4) / ICMP(type=5, code=1)     # a redirect is no error to forward
              / raw(IP(src=VIP4, dst=CLIENT4) / TCP(sport=80, dport=1))),
    ]
    before = reasons(env)
    for pkt in cases:
        v, out, _ = env.run(pkt)
        assert v == XDP_PASS and out == pkt
    runtime(forward_icmp_errors=False)
    pkt = frag_needed(CLIENT4, 1)
    v, out, _ = env.run(pkt)
    assert v == XDP_PASS and out == pkt, "switched off, as before: the kernel's"
    assert delta(before, reasons(env)) == {"pass_not_service": 5}


# --- item 2: fragments reach the flow's backend --------------------------------------------------------------

def _fix_udp_len(first: bytes, ulen: int) -> bytes:
    """A first fragment's UDP length is the whole datagram's."""
    b = bytearray(first)
    ihl = (b[14] & 0xF) * 4
    b[14 + ihl + 4:14 + ihl + 6] = ulen.to_bytes(2, "big")
    b[14 + ihl + 6:14 + ihl + 8] = b"\0\0"   # checksum: none (it covers the whole datagram)
    return bytes(b)


def fragments4(sport: int, ident: int, dport: int = 53, size: int = 3000) -> list[bytes]:
    dgram = IP(src=CLIENT4, dst=VIP4, id=ident) / UDP(sport=sport, dport=dport) / Raw(bytes(range(256)) * (size // 256))
    return [ether(f) for f in (dgram.fragment(1400))]


def fragments6(sport: int, ident: int, dport: int = 53, size: int = 3000) -> list[bytes]:
    from scapy.all import fragment6
    dgram = (IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(id=ident)
             / UDP(sport=sport, dport=dport) / Raw(bytes(range(256)) * (size // 256)))
    return [ether(f) for f in fragment6(dgram, 1400)]


@pytest.mark.parametrize("family", [4, 6])
def test_every_fragment_goes_to_the_first_fragments_backend(env, family):
    vip, client, bs = (VIP4, CLIENT4, B4) if family == 4 else (VIP6, CLIENT6, B6)
    s = svc("frag", vip, 53, bs[:8], proto="udp")
    env.apply([s])
    before = reasons(env)
    seen = set()
    for i, sport in enumerate(range(47000, 47012)):
        frags = fragments4(sport, 1000 + i) if family == 4 else fragments6(sport, 1000 + i)
        assert len(frags) == 3
        want = expected_backend(s, client, sport)
        for f in frags:
            v, out, _ = env.run(f)
            assert v == XDP_TX
            dst, inner = encapsulated_to(out, family)
            assert ip_eq(dst, want) and inner == f[14:]
        seen.add(want)
    assert len(seen) >= 3
    assert delta(before, reasons(env)) == {"tx": 36}


def test_fragment_map_entry_bounds_and_lifetime(env):
    s = svc("frag", VIP4, 53, B4[:8], proto="udp")
    env.apply([s])
    first, *later = fragments4(48000, 4242)
    t0 = time.monotonic_ns()
    assert env.run(first)[0] == XDP_TX
    frags = env.dp.tables.frags
    assert frags.max_entries == 8192
    (k, v), = [(k, v) for k, v in env.call(lambda: list(frags.items())) if k.id == socket.htons(4242)]
    assert (v.sport, v.dport) == (socket.htons(48000), socket.htons(53))
    # ktime and CLOCK_MONOTONIC are the same clock: the entry lives 1 s
    assert 0.9e9 < v.expires_ns - t0 <= 1.0e9 + (time.monotonic_ns() - t0)
    # an expired entry is not honoured: the later fragment has no first any more
    v.expires_ns = time.monotonic_ns() - 1
    env.call(frags.__setitem__, k, v)
    before = reasons(env)
    v_, out, _ = env.run(later[0])
    assert v_ == XDP_DROP
    assert delta(before, reasons(env)) == {"drop_frag_no_first": 1}


def test_later_fragment_before_its_first_is_dropped_then_the_rest_flows(env):
    s = svc("frag", VIP4, 53, B4[:8], proto="udp")
    env.apply([s])
    first, second, third = fragments4(48100, 4343)
    before = reasons(env)
    assert env.run(second)[0] == XDP_DROP         # reordered before its first: cannot be placed
    assert env.run(first)[0] == XDP_TX
    v, out, _ = env.run(third)
    assert v == XDP_TX and ip_eq(encapsulated_to(out)[0], expected_backend(s, CLIENT4, 48100))
    # to an address that is no VIP, the kernel gets it (fragments for the box itself)
    stray = frame(CLIENT4, EDGE_V4, Raw(b"z" * 64), frag=20, id=5, proto=17)
    v, out, _ = env.run(stray)
    assert v == XDP_PASS and out == stray
    assert delta(before, reasons(env)) == {"drop_frag_no_first": 1, "tx": 2, "pass_fragment": 1}


def test_fragments_with_dnat_and_no_backend(env):
    env.apply([svc("alt", VIP4, 8000, [{"address": B4[5], "port": 8080}], proto="udp", l4_dnat=True)])
    first, second, _ = fragments4(48200, 4444, dport=8000)
    v, out, _ = env.run(first)
    inner = IP(encapsulated_to(out)[1])
    assert v == XDP_TX and inner[UDP].dport == 8080
    v, out, _ = env.run(second)
    assert v == XDP_TX and encapsulated_to(out)[1] == second[14:], "a later fragment has no port to rewrite"
    env.apply([svc("alt", VIP4, 8000, [], proto="udp", l4_dnat=True)])
    # The first again: an apply on a loaded machine can outlast the 1 s its ports are kept.
    env.run(first)
    before = reasons(env)
    assert env.run(second)[0] == XDP_DROP, "no backend: nothing to reject a later fragment with"
    assert delta(before, reasons(env)) == {"drop_no_backend": 1}


# --- item 3: DF-clear oversize is encapsulated and fragmented by the kernel ------------------------------------

def test_df_clear_oversize_goes_to_the_kernel_encapsulated_df_set_gets_frag_needed(env):
    env.apply([svc("big", VIP4, 53, B4[:2], proto="udp")])
    dgram = frame(CLIENT4, VIP4, UDP(sport=9, dport=53) / Raw(b"D" * 1472))
    assert len(dgram) == 1514
    before = reasons(env)
    v, out, _ = env.run(dgram)
    assert v == XDP_PASS
    o = Ether(out)
    assert o.dst == LB_MAC, "the kernel must see the frame as addressed to this host"
    outer = o[IP]
    assert outer.proto == 4 and outer.flags == 0 and outer.len == 1520 and raw(outer.payload) == dgram[14:]
    ip4_header_ok(outer)
    ids = {Ether(env.run(dgram)[1])[IP].id for _ in range(8)}
    assert len(ids) >= 6, "outer IDs of datagrams the kernel fragments are fresh, not the inner one"
    v, out, _ = env.run(frame(CLIENT4, VIP4, UDP(sport=9, dport=53) / Raw(b"D" * 1472), flags="DF"))
    assert v == XDP_TX and (Ether(out)[ICMP].type, Ether(out)[ICMP].code) == (3, 4)
    assert delta(before, reasons(env)) == {"pass_outer_fragment": 9, "tx_icmp_too_big": 1}


def test_ipv6_oversize_always_gets_packet_too_big(env):
    env.apply([svc("big6", VIP6, 53, B6[:2], proto="udp")])
    v, out, _ = env.run(frame(CLIENT6, VIP6, UDP(sport=9, dport=53) / Raw(b"D" * 1452)))
    assert v == XDP_TX and Ether(out)[ICMPv6PacketTooBig].mtu == 1460
    csum_ok(out)
