"""Packet fuzz of the real program (BPF_PROG_TEST_RUN): seeds that take every
path (service traffic v4/v6 TCP/UDP, no backend: reject and drop, ping, ICMP
errors about flows, first and later fragments, DF-clear and DF-set oversize,
IPv6 header chains, IP options, redirect, non-service) and a few thousand
mutations of them (flipped header bytes, truncations, trailing junk, length
fields and fragment fields set at random). Whatever comes in, the hard
invariants hold, checked on the bytes without the program's own code:

* the verdict is DROP, PASS, TX or REDIRECT (never ABORTED);
* PASS leaves the frame untouched, or hands the kernel an encapsulation of it
  (DF-clear oversize) addressed to this host's MAC;
* TX / REDIRECT send either an encapsulation whose outer length is the frame's
  and whose inner packet is exactly the input's IP packet (trailing bytes
  trimmed, nothing else), or a reply from the packet's destination back to its
  source: lengths exact, checksums valid, an ICMP error within the minimum
  MTU, never to an address that names no single host;
* exactly one reason is counted per packet.
"""

from __future__ import annotations

import ipaddress
import os
import random

from collections.abc import Iterator

import pytest
from scapy.all import (
    ICMP, IP, TCP, UDP, ICMPv6EchoRequest, ICMPv6PacketTooBig, IPOption_RR, IPv6, IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment, Raw, raw,
)
from test_datapath_packets import B4, B6, CLIENT4, CLIENT6, M, VIP4, VIP6, frame, reasons, svc
from test_edge_packets import ROUTER4, ROUTER6, ether, fragments4, fragments6, inet_sum_ok

from l4lb.datapath import libbpf

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4
# A few thousand frames in the suite; L4LB_FUZZ_MUTANTS=20000 runs ~600,000.
MUTANTS_PER_SEED = int(os.environ.get("L4LB_FUZZ_MUTANTS", "80"))
CHUNK = 4000
FORBIDDEN = [ipaddress.ip_network(n) for n in
             ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4", "::/128", "::1/128", "ff00::/8")]


@pytest.fixture(scope="module")
def env(packet_env):
    assert packet_env.cfg.maglev_m == M
    return packet_env


def seeds() -> list[bytes]:
    q4 = raw(IP(src=VIP4, dst=CLIENT4, flags="DF") / TCP(sport=80, dport=40000) / Raw(b"r" * 20))
    q6 = raw(IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=80, dport=40000) / Raw(b"r" * 20))
    out = [
        frame(CLIENT4, VIP4, TCP(sport=40000, dport=80, flags="S")),
        frame(CLIENT4, VIP4, TCP(sport=40000, dport=80, flags="PA") / Raw(b"GET / HTTP/1.1\r\n\r\n")),
        frame(CLIENT6, VIP6, TCP(sport=40000, dport=80, flags="S", options=[("MSS", 1440)])),
        frame(CLIENT4, VIP4, UDP(sport=5000, dport=53) / Raw(b"dns?" * 8)),
        frame(CLIENT6, VIP6, UDP(sport=5000, dport=53) / Raw(b"dns?" * 8)),
        frame(CLIENT4, VIP4, TCP(sport=1, dport=81, flags="S")),                 # no backend: RST
        frame(CLIENT6, VIP6, TCP(sport=1, dport=81, flags="A", ack=5)),          # no backend: RST
        frame(CLIENT4, VIP4, UDP(sport=1, dport=54) / Raw(b"x" * 30)),          # no backend: unreachable
        frame(CLIENT6, VIP6, UDP(sport=1, dport=54) / Raw(b"x" * 30)),
        frame(CLIENT4, VIP4, TCP(sport=1, dport=82, flags="S")),                 # drop policy
        frame(CLIENT4, VIP4, ICMP(type=8, id=1, seq=1) / Raw(b"p" * 32)),
        frame(CLIENT6, VIP6, ICMPv6EchoRequest(id=1, seq=1, data=b"p" * 32)),
        ether(IP(src=ROUTER4, dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1400) / q4),
        ether(IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / q6),
        *fragments4(40001, 777, size=2000),
        *fragments6(40001, 777, size=2000),
        frame(CLIENT4, VIP4, UDP(sport=9, dport=53) / Raw(b"D" * 1472)),        # DF clear, too big
        frame(CLIENT4, VIP4, TCP(sport=9, dport=80, flags="A") / Raw(b"B" * 1460), flags="DF"),
        frame(CLIENT6, VIP6, TCP(sport=9, dport=80, flags="A") / Raw(b"B" * 1440)),
        ether(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
              / IPv6ExtHdrDestOpt() / TCP(sport=7, dport=80, flags="S")),
        ether(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
              / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / TCP(sport=7, dport=80, flags="S")),
        ether(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(id=5, m=0, offset=0) / UDP(sport=7, dport=53)),
        frame(CLIENT4, VIP4, TCP(sport=7, dport=80, flags="S"), options=[IPOption_RR(routers=["0.0.0.0"] * 2)]),
        frame(CLIENT4, "198.51.100.2", TCP(sport=7, dport=80, flags="S")),       # redirect to the 2nd NIC
        frame(CLIENT4, "192.0.2.1", TCP(sport=7, dport=22, flags="S")),          # not a service
    ]
    return out


def services():
    return [svc("web4", VIP4, 80, B4[:4]), svc("web6", VIP6, 80, B6[:4]),
            svc("dns4", VIP4, 53, B4[:4], proto="udp"), svc("dns6", VIP6, 53, B6[:4], proto="udp"),
            svc("none4", VIP4, 81, []), svc("none6", VIP6, 81, []),
            svc("nu4", VIP4, 54, [], proto="udp"), svc("nu6", VIP6, 54, [], proto="udp"),
            svc("quiet", VIP4, 82, [], no_backend="drop"), svc("redir", "198.51.100.2", 80, ["203.0.113.10"])]


def mutate(rng: random.Random, f: bytes) -> bytes:
    b = bytearray(f)
    kind = rng.randrange(7)
    if kind == 0:                                   # a few header bytes
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(14, min(len(b), 14 + 80))] = rng.randrange(256)
    elif kind == 1:                                 # cut short
        del b[rng.randrange(len(b)):]
    elif kind == 2:                                 # trailing junk
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    elif kind == 3 and len(b) > 40:                 # a length field lies
        off = rng.choice((14 + 2, 14 + 4, 14 + 20 + 4, 14 + 40 + 4, 14 + 20 + 12, 14 + 40 + 12))
        if off + 2 <= len(b):
            b[off:off + 2] = rng.randrange(65536).to_bytes(2, "big")
    elif kind == 4:                                 # bits anywhere
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 5 and len(b) > 22:                 # fragment fields
        if b[12:14] == b"\x08\x00":
            b[20:22] = rng.randrange(65536).to_bytes(2, "big")
        else:
            b[20] = 44                              # next header: fragment
    else:                                           # ICMP type / IP protocol
        if len(b) > 23:
            b[23 if b[12:14] == b"\x08\x00" else 20] = rng.choice((1, 6, 17, 58, 0, 4, 41, 44))
    return bytes(b)


def ip_packet(f: bytes) -> bytes | None:
    """The input's IP packet, to its own length field (None if it has none)."""
    if f[12:14] == b"\x08\x00" and len(f) >= 34:
        return f[14:14 + int.from_bytes(f[16:18], "big")]
    if f[12:14] == b"\x86\xdd" and len(f) >= 54:
        return f[14:14 + 40 + int.from_bytes(f[18:20], "big")]
    return None


def addrs(ip: bytes) -> tuple[bytes, bytes]:
    return (ip[12:16], ip[16:20]) if ip[0] >> 4 == 4 else (ip[8:24], ip[24:40])


def ipv4_header_ok(ip: bytes) -> bool:
    return inet_sum_ok(ip[:(ip[0] & 0xF) * 4])


def check_encapsulation(inp: bytes, out: bytes) -> None:
    o = out[14:]
    if out[12:14] == b"\x08\x00":
        assert o[0] == 0x45 and o[9] == 4 and ipv4_header_ok(o), "outer IPv4 header"
        assert int.from_bytes(o[2:4], "big") == len(o), "outer length is the frame's"
        inner = o[20:]
    else:
        assert out[12:14] == b"\x86\xdd" and o[0] >> 4 == 6 and o[6] == 41, "outer IPv6 header"
        assert 40 + int.from_bytes(o[4:6], "big") == len(o), "outer length is the frame's"
        inner = o[40:]
    assert inner == ip_packet(inp), "the inner packet is the input's IP packet, trailing bytes cut"


def check_reply(inp: bytes, out: bytes) -> None:
    assert out[0:6] == inp[6:12] and out[6:12] == inp[0:6], "back to the sender's MAC"
    o, i = out[14:], ip_packet(inp)
    assert i is not None
    (osrc, odst), (isrc, idst) = addrs(o), addrs(i)
    assert (osrc, odst) == (idst, isrc), "from the packet's destination back to its source"
    dst = ipaddress.ip_address(odst)
    assert not any(dst in n for n in FORBIDDEN if n.version == dst.version), f"reply to {dst}"
    if o[0] >> 4 == 4:
        assert o[0] == 0x45 and ipv4_header_ok(o) and int.from_bytes(o[2:4], "big") == len(o)
        proto, l4 = o[9], o[20:]
        pseudo = b"" if proto == 1 else o[12:20] + bytes([0, proto]) + len(l4).to_bytes(2, "big")
        is_echo = proto == 1 and l4[0] == 0
    else:
        assert 40 + int.from_bytes(o[4:6], "big") == len(o)
        proto, l4 = o[6], o[40:]
        pseudo = o[8:40] + len(l4).to_bytes(4, "big") + bytes([0, 0, 0, proto])
        is_echo = proto == 58 and l4[0] == 129
    assert proto in (1, 6, 58), f"reply of protocol {proto}"
    if is_echo:
        assert len(o) == len(i) and l4[4:] == i[len(i) - len(l4) + 4:], "echo data unchanged"
        return  # its checksum is the request's, updated: valid exactly when the request's was
    assert len(o) <= (576 if o[0] >> 4 == 4 else 1280), "an ICMP error fits the minimum MTU"
    assert inet_sum_ok(pseudo + l4), "checksum of a reply the LB built"


def check(inp: bytes, verdict: int, out: bytes) -> str | None:
    """The kind of output (None: passed untouched or dropped); raises if an invariant breaks."""
    assert verdict in (XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT), f"verdict {verdict}"
    if verdict == XDP_PASS and out != inp:
        assert out[0:6] == inp[0:6], "a frame for the kernel is addressed to this host"
        check_encapsulation(inp, out)
        return "kernel fragments"
    if verdict in (XDP_TX, XDP_REDIRECT):
        o = out[14:]
        encap = (out[12:14] == b"\x08\x00" and len(o) > 9 and o[9] == 4) or \
                (out[12:14] == b"\x86\xdd" and len(o) > 6 and o[6] == 41)
        (check_encapsulation if encap else check_reply)(inp, out)
        return "encapsulated" if encap else "replies"
    return None


def fuzz_frames() -> Iterator[bytes]:
    rng = random.Random(1414)
    for s in seeds():
        yield s
        for _ in range(MUTANTS_PER_SEED):
            f = mutate(rng, s)
            if len(f) >= 14:   # BPF_PROG_TEST_RUN refuses less than an Ethernet header
                yield f


def test_fuzzed_frames_keep_every_invariant(env):
    env.apply(services())

    def run_all(frames: list[bytes]) -> list[tuple[int, bytes]]:
        return [libbpf.test_run(env.dp.prog_fd, f, ingress_ifindex=env.edge_ifindex)[:2] for f in frames]

    first = before = reasons(env)
    kinds: dict[str, int] = {}
    gen = fuzz_frames()
    while frames := [f for _, f in zip(range(CHUNK), gen)]:
        results = env.call(run_all, frames)
        after = reasons(env)
        assert sum(after.values()) - sum(before.values()) == len(frames), "one reason per packet"
        before = after
        for inp, (verdict, out) in zip(frames, results):
            try:
                kind = check(inp, verdict, out)
            except AssertionError as e:
                raise AssertionError(f"{e}\n in:  {inp.hex()}\n out: {out.hex()} (verdict {verdict})") from None
            if kind:
                kinds[kind] = kinds.get(kind, 0) + 1
    grew = {k for k in before if before[k] > first[k]}
    # the fuzz reached every path this datapath has
    assert {"tx", "redirect", "tx_reject", "tx_echo", "fwd_icmp_error", "pass_outer_fragment", "tx_icmp_too_big",
            "drop_frag_no_first", "pass_malformed", "pass_ext_headers", "drop_no_backend", "drop_reply_forbidden",
            "pass_fragment", "pass_not_service", "pass_not_ip"} <= grew, sorted(grew)
    assert len(kinds) == 3, kinds
