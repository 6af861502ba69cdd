"""l4lb/lab/flows.py: the benches' frames of distinct flows (pure, no root).

The new-connection rows of bench/datapath.py (method B) send these frames, and
bench/traffic.py names flows by the same numbers: their fields and checksums
must be what a real client would send, checked here with scapy."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, Raw, raw

from l4lb.lab.flows import CHUNK, FLOW_SPACE, FLOWS_PER_BYTE, flow_frames, flow_of

E = Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22")
TEMPLATES = {
    "v4 tcp": raw(E / IP(src="203.0.113.9", dst="198.51.100.1") / TCP(sport=9, dport=80, flags="S") / Raw(b"x" * 18)),
    "v4 udp odd": raw(E / IP(src="203.0.113.9", dst="198.51.100.1") / UDP(sport=9, dport=53) / Raw(b"y" * 17)),
    "v6 tcp": raw(E / IPv6(src="2001:db8:77::9", dst="2001:db8:100::1") / TCP(sport=9, dport=80) / Raw(b"x" * 18)),
    "v6 udp odd": raw(E / IPv6(src="2001:db8:77::9", dst="2001:db8:100::1") / UDP(sport=9, dport=53) / Raw(b"z")),
}


def rebuilt(frame: bytes) -> bytes:
    """`frame` with scapy's own checksums."""
    p = Ether(frame)
    if IP in p:
        del p[IP].chksum
    del p[TCP if TCP in p else UDP].chksum
    return raw(Ether(raw(p)))


@pytest.mark.parametrize("name", TEMPLATES)
def test_fields_and_checksums(name: str) -> None:
    t = TEMPLATES[name]
    first = CHUNK - 3 + FLOWS_PER_BYTE  # across a chunk and a port wrap
    frames = flow_frames(t, first, CHUNK)
    for i in (0, 1, 2, 3, FLOWS_PER_BYTE - CHUNK % FLOWS_PER_BYTE, CHUNK - 1):
        f = bytes(frames[i])
        assert rebuilt(f) == f, f"flow {first + i}: checksums differ from scapy's"
        assert flow_of(f) == first + i
        p, j = Ether(f), first + i
        ip = p[IP] if IP in p else p[IPv6]
        l4 = p[TCP] if TCP in p else p[UDP]
        assert l4.sport == 1 + j % FLOWS_PER_BYTE
        assert ipaddress.ip_address(ip.src).packed[-1] == j // FLOWS_PER_BYTE
        # the rest is the template's
        tip, tl4 = Ether(t)[type(ip)], Ether(t)[type(l4)]
        packed = ipaddress.ip_address(ip.src).packed[:-1], ipaddress.ip_address(tip.src).packed[:-1]
        assert packed[0] == packed[1]
        assert (ip.dst, l4.dport, bytes(l4.payload)) == (tip.dst, tl4.dport, bytes(tl4.payload))


def test_numbering_wraps_and_flows_are_distinct() -> None:
    t = TEMPLATES["v4 tcp"]
    assert flow_of(bytes(flow_frames(t, FLOW_SPACE, 1)[0])) == 0
    frames = flow_frames(t, FLOW_SPACE - 2, 4)
    assert [flow_of(bytes(f)) for f in frames] == [FLOW_SPACE - 2, FLOW_SPACE - 1, 0, 1]
    many = flow_frames(t, 0, 3 * FLOWS_PER_BYTE)
    keys = np.unique(many[:, [29, 34, 35]], axis=0)  # address last byte, source port
    assert len(keys) == len(many)


def test_refuses_what_it_cannot_number() -> None:
    with pytest.raises(ValueError):
        flow_frames(raw(E / IP(dst="198.51.100.1", options=b"\x01\x01\x01\x00") / TCP()), 0, 1)
    with pytest.raises(ValueError):
        flow_frames(raw(E / IP(dst="198.51.100.1", proto=1) / Raw(b"\x08\x00" + b"\x00" * 6)), 0, 1)
    with pytest.raises(ValueError):
        flow_of(raw(E / IP(dst="198.51.100.1") / TCP(sport=0)))
