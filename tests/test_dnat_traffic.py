"""L4 DNAT with real traffic: clients reach VIP:8000 (TCP) and VIP:5300 (UDP)
through the LB, which rewrites the inner destination port to the backends'
8080 / 5353.  With direct server return the backend's reply would leave from
VIP:8080; ``tc_reply_sport`` (bpf_src/decap.c, tc egress on each backend, the
lab's stand-in for a stateless nftables rule) gives it the service port back.
Without it the same requests fail: that is what makes the proof real."""

from __future__ import annotations

import collections
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4lb.lab.lbdatapath import lab_datapath
from l4lb.datapath.libbpf import test_run as prog_test_run
from l4lb.lab import netns
from l4lb.lab.decap import Decap, ReplyRewrite
from l4lb.lab.topology import Lab
from l4lb.models import Service

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

PREFIX = "l4dn"
TCP_SVC, TCP_BE = 8000, 8080      # the lab serves HTTP on 80 and 8080
UDP_SVC, UDP_BE = 5300, 5353      # the lab's UDP echo port is 5353
TC_ACT_OK = 0


@pytest.fixture(scope="module")
def lab(bpffs: Path, lab_decap: Decap) -> Iterator[Lab]:
    netns.cleanup(PREFIX)         # leftovers of crashed runs (live runs are spared)
    with Lab(clients=2, backends=3, client_extra_addrs=8, prefix=PREFIX, decap=lab_decap) as lab:
        with lab_datapath(lab, bpffs, "dnat", maglev_m=1021, max_backends=1024, flow_table_size=65536) as (dp, w):
            w.call(dp.apply, services(lab))
            yield lab


def services(lab: Lab) -> list[Service]:
    def bes(family: int, port: int | None = None) -> list[dict]:
        out = []
        for addrs in lab.backend_addrs.values():
            b: dict = {"address": addrs[0 if family == 4 else 1]}
            if port:
                b["port"] = port
            out.append(b)
        return out

    dnat = {"l4_dnat": True}
    return [
        Service(name="dnat4", vip=lab.vip4, port=TCP_SVC, backends=bes(4, TCP_BE), options=dnat),
        Service(name="dnat6", vip=lab.vip6, port=TCP_SVC, backends=bes(6, TCP_BE), options=dnat),
        Service(name="udnat4", vip=lab.vip4, port=UDP_SVC, protocol="udp", backends=bes(4, UDP_BE), options=dnat),
        Service(name="udnat6", vip=lab.vip6, port=UDP_SVC, protocol="udp", backends=bes(6, UDP_BE), options=dnat),
        # plain services on the same VIPs: the rewrite must leave them alone
        Service(name="web4", vip=lab.vip4, port=80, backends=bes(4)),
        Service(name="web6", vip=lab.vip6, port=80, backends=bes(6)),
    ]


def rules(lab: Lab) -> list[ReplyRewrite]:
    out = []
    for vip in (lab.vip4, lab.vip6):
        out.append(ReplyRewrite(vip, TCP_BE, TCP_SVC, "tcp"))
        out.append(ReplyRewrite(vip, UDP_BE, UDP_SVC, "udp"))
    return out


@pytest.fixture
def rewrite(lab: Lab) -> Iterator[list[ReplyRewrite]]:
    """The backends run the reply rewrite for the test's duration."""
    rs = rules(lab)
    try:
        for b in lab.backends.values():
            lab.decap.reply_port_rewrite(b.ns, b.ifname, rs)
        yield rs
    finally:
        for b in lab.backends.values():
            lab.decap.remove_reply_port_rewrite(b.ns, b.ifname)


def egress_filters(lab: Lab, backend: str) -> str:
    return lab.run(backend, "tc", "filter", "show", "dev", "eth0", "egress").stdout


def client_sources(lab: Lab, family: int) -> list[tuple[str, str]]:
    return [(name, a) for name, host in lab.clients.items() for a in host.addresses()
            if (":" in a) == (family == 6)]


def csum_errors(lab: Lab) -> int:
    """Checksum errors the clients' kernels counted (a reply with a bad L4 checksum)."""
    total = 0
    for c in lab.clients:
        out = lab.run(c, "nstat", "-az", "TcpInCsumErrors", "UdpInCsumErrors", "Udp6InCsumErrors").stdout
        total += sum(int(line.split()[1]) for line in out.splitlines() if "CsumErrors" in line)
    return total


def vip_of(lab: Lab, family: int) -> str:
    return lab.vip4 if family == 4 else lab.vip6


# --------------------------------------------------------------------------- real traffic

@pytest.mark.parametrize("family", [4, 6])
def test_tcp_dnat_reaches_every_backend_and_replies_come_from_the_service_port(lab, rewrite, family):
    vip = vip_of(lab, family)
    rule = next(r for r in rewrite if r.vip == vip and r.proto == "tcp")
    before, errors0 = lab.decap.reply_rewrite_packets(rule), csum_errors(lab)
    seen: collections.Counter = collections.Counter()
    failures = []
    for client, src in client_sources(lab, family):
        for _ in range(2):
            r = lab.curl(client, lab.url(vip, TCP_SVC), source=src)
            if not r.ok:
                failures.append(f"{client} {src}: rc={r.returncode} {r.stderr.strip()}")
                continue
            seen[r.backend] += 1
            # the client talked to VIP:8000; the backend served it on VIP:8080
            assert (r.remote_ip.strip("[]"), r.remote_port) == (vip, TCP_SVC)
            assert (r.fields["local_ip"], r.fields["local_port"]) == (vip, str(TCP_BE))
            assert r.fields["client_ip"] == src
    assert not failures, failures
    assert set(seen) == set(lab.backends), f"every backend must serve: {dict(seen)}"
    # SYN-ACK, response, FIN at least, per connection
    assert lab.decap.reply_rewrite_packets(rule) - before >= 3 * sum(seen.values())
    assert csum_errors(lab) == errors0


@pytest.mark.parametrize("family", [4, 6])
def test_udp_dnat_echo_comes_back_from_the_service_port(lab, rewrite, family):
    vip = vip_of(lab, family)
    errors0 = csum_errors(lab)
    seen = set()
    for client, src in client_sources(lab, family):
        rep = lab.udp(client, vip, b"dnat", port=UDP_SVC, source=src)
        assert rep is not None, f"no UDP echo for {src}"
        assert rep.data.endswith(b"\ndnat")
        assert rep.peer == (vip, UDP_SVC), f"echo came from {rep.peer}"
        seen.add(rep.backend)
    assert len(seen) >= 2, seen
    # UDP leaves the backend fully checksummed (tx off): the incremental fix is what
    # keeps the client from dropping it
    assert csum_errors(lab) == errors0


@pytest.mark.parametrize("family", [4, 6])
def test_without_the_reply_rewrite_dnat_fails(lab, family):
    vip = vip_of(lab, family)
    for b in lab.backends:
        assert "tc_reply_sport" not in egress_filters(lab, b)
    client, src = client_sources(lab, family)[0]
    r = lab.curl(client, lab.url(vip, TCP_SVC), source=src, timeout=2)
    assert not r.ok, "a reply from VIP:8080 must not complete a connection to VIP:8000"
    # the LB did its half: the echo arrives, but from the backend port
    rep = lab.udp(client, vip, port=UDP_SVC, source=src)
    assert rep is not None and rep.peer == (vip, UDP_BE), rep


def test_rewrite_leaves_other_traffic_alone(lab, rewrite):
    counts0 = [lab.decap.reply_rewrite_packets(r) for r in rewrite]
    b1 = lab.backends["b1"]
    for vip in (lab.vip4, lab.vip6):
        # a plain service on the same VIP, port 80 in and out
        r = lab.curl("c1", lab.url(vip))
        assert r.ok and r.remote_port == 80 and r.fields["local_port"] == "80", r.stderr
    for addr in (b1.ip4, b1.ip6):
        # the backend's own address on 8080 (client and backend share the segment):
        # not a VIP, so the reply keeps port 8080
        r = lab.curl("c1", lab.url(addr, TCP_BE))
        assert r.ok and r.remote_port == TCP_BE and r.backend == "b1", r.stderr
    assert [lab.decap.reply_rewrite_packets(r) for r in rewrite] == counts0


def test_attach_and_detach_show_in_tc(lab):
    b = lab.backends["b2"]
    lab.decap.reply_port_rewrite(b.ns, b.ifname, rules(lab)[:1])
    try:
        shown = egress_filters(lab, "b2")
        assert "tc_reply_sport" in shown and "direct-action" in shown, shown
        assert "tc_reply_sport" not in egress_filters(lab, "b1")
    finally:
        lab.decap.remove_reply_port_rewrite(b.ns, b.ifname)
    assert "tc_reply_sport" not in egress_filters(lab, "b2")
    assert lab.decap.reply_rewrite_packets(rules(lab)[0]) == 0, "the rule went with its last interface"


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs", [
    {"vip": "not-an-ip", "backend_port": 8080, "service_port": 8000},
    {"vip": "198.51.100.10", "backend_port": 0, "service_port": 8000},
    {"vip": "198.51.100.10", "backend_port": 8080, "service_port": 65536},
    {"vip": "198.51.100.10", "backend_port": 8080, "service_port": True},
    {"vip": "198.51.100.10", "backend_port": 8080, "service_port": 8000, "proto": "sctp"},
])
def test_bad_rule_is_refused(kwargs):
    with pytest.raises(ValueError):
        ReplyRewrite(**kwargs)


def test_conflicting_rule_or_missing_interface_changes_nothing(lab, rewrite):
    b = lab.backends["b3"]
    clash = ReplyRewrite(lab.vip4, TCP_BE, 9000, "tcp")          # 8080 is already mapped to 8000
    new = ReplyRewrite(lab.vip4, 8081, 8001, "tcp")
    with pytest.raises(ValueError, match="conflicting"):
        lab.decap.reply_port_rewrite(b.ns, b.ifname, [new, clash])
    assert lab.decap.reply_rewrite_packets(new) == 0
    with pytest.raises(LookupError):
        lab.decap.reply_port_rewrite(b.ns, "nosuch0", [new])
    assert lab.decap.reply_rewrite_packets(new) == 0
    # the installed rule still works
    r = lab.curl("c1", lab.url(lab.vip4, TCP_SVC))
    assert r.ok and r.remote_port == TCP_SVC, r.stderr


# --------------------------------------------------------------------------- checksum arithmetic
# A test run hands the program an skb with no checksum offload (CHECKSUM_NONE),
# so it checks the incremental update that fully checksummed packets get (the
# real TCP replies above are CHECKSUM_PARTIAL at tc egress, where the kernel
# finishes the checksum after the rewrite).

def _packet(family: int, proto: str, src: str, sport: int, *, udp_zero: bool = False,
            frag: int = 0) -> bytes:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    client = "192.0.2.11" if family == 4 else "2001:db8:0:1::11"
    l3 = IP(src=src, dst=client, frag=frag) if family == 4 else IPv6(src=src, dst=client)
    l4 = TCP(sport=sport, dport=40000, flags="SA", seq=7, ack=9) if proto == "tcp" else UDP(sport=sport, dport=40000)
    pkt = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3 / l4 / (b"payload-" * 5)
    raw = bytes(pkt)
    if udp_zero:
        off = 14 + 20 + 6
        raw = raw[:off] + b"\0\0" + raw[off + 2:]
    return raw


def _checksum_ok(raw: bytes) -> tuple[int, bool]:
    """(source port, whether the L4 checksum is right), recomputed by scapy."""
    from scapy.layers.inet import TCP, UDP
    from scapy.layers.l2 import Ether

    pkt = Ether(raw)
    kind = TCP if TCP in pkt else UDP
    got = pkt[kind].chksum
    del pkt[kind].chksum                    # scapy recomputes it on build
    return pkt[kind].sport, Ether(bytes(pkt))[kind].chksum == got


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_test_run_rewrites_port_and_checksum(lab, rewrite, family, proto):
    vip = vip_of(lab, family)
    be, svc = (TCP_BE, TCP_SVC) if proto == "tcp" else (UDP_BE, UDP_SVC)
    pkt = _packet(family, proto, vip, be)
    verdict, out, _ = prog_test_run(lab.decap.reply_prog_fd, pkt)
    assert verdict == TC_ACT_OK
    sport, good = _checksum_ok(out)
    assert (sport, good) == (svc, True)
    assert out != pkt


@pytest.mark.parametrize("family,proto,src,sport,frag", [
    (4, "tcp", "198.51.100.10", 8081, 0),          # port not configured
    (4, "tcp", "192.0.2.101", TCP_BE, 0),          # not a VIP
    (6, "udp", "2001:db8:0:1::101", UDP_BE, 0),
    (4, "udp", "198.51.100.10", TCP_BE, 0),        # TCP's port, but UDP
    (4, "tcp", "198.51.100.10", TCP_BE, 100),      # non-first fragment: no ports in it
])
def test_test_run_leaves_other_packets_alone(lab, rewrite, family, proto, src, sport, frag):
    pkt = _packet(family, proto, src, sport, frag=frag)
    verdict, out, _ = prog_test_run(lab.decap.reply_prog_fd, pkt)
    assert verdict == TC_ACT_OK and out == pkt


def test_test_run_udp_without_checksum_keeps_zero(lab, rewrite):
    pkt = _packet(4, "udp", lab.vip4, UDP_BE, udp_zero=True)
    verdict, out, _ = prog_test_run(lab.decap.reply_prog_fd, pkt)
    assert verdict == TC_ACT_OK
    sport, csum = struct.unpack("!H4xH", out[34:42])
    assert (sport, csum) == (UDP_SVC, 0)
