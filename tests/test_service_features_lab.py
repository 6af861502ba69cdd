"""Service features of issue 15 with real traffic through network namespaces:
a source-range allowlist lets curl from one client through and drops the
other's (also once the list changes under an open connection's feet), and an
IPv4 VIP is served by backends the LB reaches over IPv6 only (IPv4-in-IPv6,
decapsulated by the lab's xdp_decap as ip6_tunnel would on a real server).
Packet-level checks of the same: tests/test_service_features.py."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4lb.lab import netns
from l4lb.lab.decap import Decap
from l4lb.lab.lbdatapath import lab_datapath
from l4lb.lab.topology import Lab
from l4lb.models import Service

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

PREFIX = "l4f"
ALLOW_PORT, FOUR6_PORT = 80, 8080    # the lab's HTTP server listens on both


@pytest.fixture(scope="module")
def lab(bpffs: Path, lab_decap: Decap) -> Iterator[Lab]:
    netns.cleanup(PREFIX)         # leftovers of crashed runs (live runs are spared)
    with Lab(clients=2, backends=2, prefix=PREFIX, decap=lab_decap) as lab:
        with lab_datapath(lab, bpffs, "features", maglev_m=251, max_backends=256, flow_table_size=4096):
            yield lab


def apply(lab: Lab, services: list[Service]) -> None:
    lab.worker.call(lab.dp.apply, services)


def allowlisted(lab: Lab, *clients: str) -> Service:
    return Service(name="allow", vip=lab.vip4, port=ALLOW_PORT,
                   source_ranges=[f"{lab.clients[c].ip4}/32" for c in clients],
                   backends=[{"address": a[0]} for a in lab.backend_addrs.values()])


def four_in_six(lab: Lab) -> Service:
    return Service(name="four6", vip=lab.vip4, port=FOUR6_PORT,
                   backends=[{"address": a[1]} for a in lab.backend_addrs.values()])


def reasons(lab: Lab) -> dict[str, int]:
    return {k: v["packets"] for k, v in lab.worker.call(lab.dp.stats).reasons.items()}


def test_curl_from_an_allowed_client_passes_and_from_another_is_dropped(lab):
    apply(lab, [allowlisted(lab, "c1")])
    before = reasons(lab)
    r = lab.curl("c1", lab.url(lab.vip4, ALLOW_PORT))
    assert r.ok and r.backend in lab.backends, r
    refused = lab.curl("c2", lab.url(lab.vip4, ALLOW_PORT), timeout=1.5)
    assert not refused.ok
    assert reasons(lab)["drop_source_range"] - before["drop_source_range"] >= 1   # the SYN and its retries
    apply(lab, [allowlisted(lab, "c1", "c2")])
    r = lab.curl("c2", lab.url(lab.vip4, ALLOW_PORT))
    assert r.ok, r


def read_response(conn: socket.socket) -> bytes:
    """One whole HTTP response (headers and Content-Length body): nothing of it is left for the next read."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(4096)
        assert more, f"connection closed after {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += conn.recv(4096)
    return head + b"\r\n\r\n" + body


def test_an_open_connection_is_cut_when_its_client_is_no_longer_allowed(lab):
    apply(lab, [allowlisted(lab, "c1")])
    request = b"GET / HTTP/1.1\r\nHost: l4lb\r\n\r\n"
    # A socket made in c1's namespace stays there when used from here (netns.call_in_netns).
    conn = lab.call("c1", socket.create_connection, (lab.vip4, ALLOW_PORT), 3)
    try:
        conn.sendall(request)
        assert read_response(conn).startswith(b"HTTP/1.1 200"), "keep-alive request before the change"
        apply(lab, [allowlisted(lab, "c2")])     # c1 no longer allowed: its established flow must not pass
        before = reasons(lab)
        conn.settimeout(1.5)
        conn.sendall(request)
        with pytest.raises(socket.timeout):
            conn.recv(4096)                      # never reached the backend: no answer
        assert reasons(lab)["drop_source_range"] > before["drop_source_range"]
    finally:
        conn.close()


def test_curl_to_an_ipv4_vip_is_served_by_ipv6_only_backends(lab):
    apply(lab, [four_in_six(lab)])
    before = {a[1]: lab.decap.count_for(a[1]) for a in lab.backend_addrs.values()}  # shared by the session
    seen = set()
    for _ in range(24):   # ephemeral client ports: a fixed one can be in TIME_WAIT from an earlier connection
        r = lab.curl("c1", lab.url(lab.vip4, FOUR6_PORT))
        assert r.ok, r
        assert ipaddress.ip_address(r.fields["local_ip"]) == ipaddress.ip_address(lab.vip4)  # the inner packet
        seen.add(r.backend)
    assert seen == set(lab.backends), seen     # every backend, each over its IPv6 address
    # It went as IPv4-in-IPv6: each backend's decapsulator counted packets for its IPv6 address.
    assert all(lab.decap.count_for(a) > n for a, n in before.items())
