"""Edge traffic with real traffic through the LB in the namespace lab (issue 14):
path-MTU discovery of server->client traffic through the LB, and the black
hole without it (negative control); 4 KB UDP datagrams through a VIP,
fragmented by the client and reassembled on the backend, v4 and v6; a DF-clear
1500-byte datagram the tunnel cannot carry whole arriving whole; connections to
a service without usable backends failing at once (and hanging with the drop
policy); ping to a VIP. The same paths packet by packet:
tests/test_edge_packets.py."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import pytest

from l4lb.lab import netns, reassembly
from l4lb.lab.lbdatapath import lab_datapath
from l4lb.lab.router import add_routed_client
from l4lb.lab.topology import LB_IP4, LB_IP6, Lab
from l4lb.models import Service

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

UDP_PORT = 5353   # the lab's echo servers (backend=<name>\n + what was sent)
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0  # linux/in.h (Python 3.11's socket module lacks them)
SMALL_MTU = 1400  # the client's route MTU to the fragment tests' VIPs


@pytest.fixture(scope="module")
def lab(bpffs: Path):
    with Lab(clients=1, backends=2, prefix="l4te") as lab:
        with lab_datapath(lab, bpffs, "edge", maglev_m=251, max_backends=256, flow_table_size=4096):
            lab.far = add_routed_client(lab, route_mtu=1280)
            # Datagrams to the second VIPs leave the client in fragments that
            # fit the tunnel (1400 + 20/40 <= 1500): what a DC with room for the
            # encapsulation sees.
            netns.ip_batch(lab.clients["c1"].ns, [f"route add {lab.vips4[1]}/32 via {LB_IP4} mtu {SMALL_MTU}",
                                                  f"route add {lab.vips6[1]}/128 via {LB_IP6} mtu {SMALL_MTU}"])
            yield lab


def apply(lab: Lab, *services: Service) -> None:
    lab.worker.call(lab.dp.apply, list(services))


def reasons(lab: Lab) -> dict[str, int]:
    return {k: v["packets"] for k, v in lab.worker.call(lab.dp.stats).reasons.items()}


def grew(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def backends(lab: Lab, family: int, **extra) -> list[dict]:
    return [{"address": h.ip4 if family == 4 else h.ip6, **extra} for h in lab.backends.values()]


def curl(ns: str, url: str, timeout: float) -> tuple[int, int, int, float, float]:
    """(curl's exit code, HTTP status, bytes received, curl's own time, wall time)."""
    t0 = time.monotonic()
    cp = netns.run(ns, "curl", "-sS", "-g", "--noproxy", "*", "--max-time", str(timeout), "-o", "/dev/null",
                   "-w", "%{http_code} %{size_download} %{time_total}", url, check=False, timeout=timeout + 20)
    wall = time.monotonic() - t0
    code, size, took = (cp.stdout.split() + ["0", "0", "0"])[:3]
    return cp.returncode, int(code), int(size), float(took), wall


def url(addr: str, port: int = 80, path: str = "/") -> str:
    return f"http://[{addr}]:{port}{path}" if ":" in addr else f"http://{addr}:{port}{path}"


def ip_counter(ns: str, name: str) -> int:
    """An `Ip:` counter of /proc/net/snmp (IPv4) in a namespace."""
    lines = [ln.split() for ln in netns.run(ns, "cat", "/proc/net/snmp").stdout.splitlines() if ln.startswith("Ip:")]
    return int(dict(zip(lines[0][1:], lines[1][1:]))[name])


# --- item 1: PMTU discovery of server->client traffic through the LB --------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_path_mtu_discovery_works_through_the_lb_and_black_holes_without_it(lab, family):
    """A backend's 1500-byte replies (DF) meet a router whose route to the
    client allows 1280: the router's frag-needed / packet-too-big goes to the
    VIP, i.e. to the LB, which must hand it to that backend. Switched off, the
    same download stalls (Linux does no PMTU black-hole probing by default)."""
    vip = lab.vip4 if family == 4 else lab.vip6
    far = lab.far.ip4 if family == 4 else lab.far.ip6
    apply(lab, Service(name="web", vip=vip, port=80, backends=backends(lab, family)))
    target = url(vip, path="/bytes/30000")

    def download(timeout: float) -> tuple[int, int, int, float, float]:
        for b in lab.backends.values():   # forget any path MTU learnt before
            netns.run(b.ns, "ip", f"-{family}", "route", "flush", "cache")
        return curl(lab.far.ns, target, timeout)

    before = reasons(lab)
    rc, status, size, _, _ = download(10)
    assert (rc, status) == (0, 200) and size > 30000, f"download failed: rc={rc} status={status} size={size}"
    assert grew(before, reasons(lab)).get("fwd_icmp_error", 0) >= 1, "no ICMP error went to a backend"
    learnt = [netns.run(b.ns, "ip", f"-{family}", "route", "get", far).stdout for b in lab.backends.values()]
    assert any("mtu 1280" in r for r in learnt), f"no backend learnt the path MTU: {learnt}"

    cfg = lab.dp.cfg
    lab.worker.call(lab.dp.update_runtime, dataclasses.replace(cfg, forward_icmp_errors=False))
    try:
        before = reasons(lab)
        rc, status, size, _, _ = download(2)
        assert rc == 28 and size < 30000, f"without the feature the download should stall: rc={rc} size={size}"
        assert grew(before, reasons(lab)).get("fwd_icmp_error", 0) == 0
    finally:
        lab.worker.call(lab.dp.update_runtime, cfg)


# --- item 2: fragments reach the flow's backend and are reassembled there -----------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_4k_udp_datagrams_through_a_vip_are_reassembled_on_the_backend(lab, family):
    vip = lab.vips4[1] if family == 4 else lab.vips6[1]
    apply(lab, Service(name="big", vip=vip, port=UDP_PORT, protocol="udp", backends=backends(lab, family)))
    before = reasons(lab)
    served = set()
    for sport in range(41000, 41006):
        payload = os.urandom(4000)
        rep = lab.udp("c1", vip, payload, port=UDP_PORT, sport=sport, timeout=3)
        assert rep is not None, f"no answer to a 4000-byte datagram from port {sport}"
        assert rep.data == f"backend={rep.backend}\n".encode() + payload, "the backend got the datagram whole"
        served.add(rep.backend)
    d = grew(before, reasons(lab))
    # 4008 bytes of UDP leave the client in 3 fragments of <= 1400 bytes
    assert d.get("tx", 0) >= 6 * 3 and "drop_frag_no_first" not in d and "pass_fragment" not in d, d
    assert served <= set(lab.backends)


# --- item 3: a DF-clear datagram too big for the tunnel arrives whole ------------------------------------

def test_df_clear_1500_byte_datagram_arrives_whole(lab):
    """1500 bytes with DF clear do not fit the tunnel (1520 > 1500): instead
    of frag-needed (which means "DF was set"), the LB's kernel fragments the
    outer packet and the backend reassembles it."""
    name, host = next(iter(lab.backends.items()))
    apply(lab, Service(name="dns", vip=lab.vip4, port=UDP_PORT, protocol="udp", backends=[{"address": host.ip4}]))
    helper = reassembly.start(host.ns)
    try:
        payload = os.urandom(1472)

        def send() -> bytes | None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)  # DF clear
                s.settimeout(3)
                s.sendto(payload, (lab.vip4, UDP_PORT))
                try:
                    return s.recv(65535)
                except socket.timeout:
                    return None

        before, reasm = reasons(lab), ip_counter(host.ns, "ReasmOKs")
        reply = lab.call("c1", send)
        assert reply == f"backend={name}\n".encode() + payload
        assert grew(before, reasons(lab)).get("pass_outer_fragment") == 1
        assert ip_counter(host.ns, "ReasmOKs") - reasm == 1, "the backend reassembled the outer datagram"
    finally:
        reassembly.stop(helper)


# --- item 6: no usable backend: fail at once (reject) or hang (drop) --------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_connection_to_a_service_without_usable_backends_fails_at_once(lab, family):
    vip = lab.vip4 if family == 4 else lab.vip6
    apply(lab, Service(name="web", vip=vip, port=80, backends=backends(lab, family, state="maintenance")),
          Service(name="dns", vip=vip, port=UDP_PORT, protocol="udp", backends=[]))
    rc, status, _, took, wall = curl(lab.clients["c1"].ns, url(vip), 5)
    assert rc == 7 and status == 0, f"curl should be refused (exit 7), got {rc}"
    # At once: a SYN that went unanswered would be sent again only after 1 s (Linux's initial RTO), so
    # anything well below that is the first SYN's answer, on however loaded a machine.
    assert took < 0.5, f"refused after {took:.3f} s (curl's own clock; {wall:.3f} s with process start)"

    def udp_refused() -> float:
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.connect((vip, UDP_PORT))
            t0 = time.monotonic()
            s.send(b"query")
            with pytest.raises(ConnectionRefusedError):
                s.recv(100)
            return time.monotonic() - t0

    assert lab.call("c1", udp_refused) < 0.5   # the ICMP error, not the 2 s timeout


def test_with_the_drop_policy_the_connection_hangs(lab):
    """The negative control: the same service dropping makes curl wait out its timeout."""
    apply(lab, Service(name="web", vip=lab.vip4, port=80, backends=[], options={"no_backend": "drop"}))
    rc, _, _, took, _ = curl(lab.clients["c1"].ns, url(lab.vip4), 1)
    assert rc == 28 and took >= 1


# --- item 7: ping to a VIP ----------------------------------------------------------------------------------

def test_ping_to_a_vip_is_answered_and_can_be_switched_off(lab):
    apply(lab, Service(name="web", vip=lab.vip4, port=80, backends=backends(lab, 4)),
          Service(name="web6", vip=lab.vip6, port=80, backends=backends(lab, 6)))
    before = reasons(lab)
    assert lab.ping("c1", lab.vip4, count=2), "no answer to ping the VIP"
    assert lab.ping("c1", lab.vip6, count=2), "no answer to ping the IPv6 VIP"
    assert grew(before, reasons(lab)).get("tx_echo") == 4
    apply(lab, Service(name="web", vip=lab.vip4, port=80, backends=backends(lab, 4),
                       options={"answer_ping": False}))
    assert not lab.ping("c1", lab.vip4, count=1, timeout=1)
