"""Real traffic: curl from clients through the LB (our XDP program on its
veth) to backends that decapsulate with bpf_src/decap.c and serve HTTP on the
VIP; replies go straight back to the clients."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from l4lb.lab.lbdatapath import lab_datapath
from l4lb.lab import netns
from l4lb.lab.topology import Lab
from l4lb.models import Service

pytestmark = [pytest.mark.netns, pytest.mark.bpf]


@pytest.fixture(scope="module")
def lab(bpffs: Path):
    with Lab(clients=2, backends=3, seg_b_backends=1, client_extra_addrs=8, prefix="l4tt") as lab:
        with lab_datapath(lab, bpffs, "traffic", [lab.lb_if, lab.lb_if2],
                          maglev_m=1021, max_backends=1024, flow_table_size=65536):
            yield lab


def seg_a_backends(lab: Lab) -> list[str]:
    return [n for n, h in lab.backends.items() if h.segment == "a"]


def services(lab: Lab, drained: str | None = None, affinity: bool = False) -> list[Service]:
    names = seg_a_backends(lab)

    def bes(family: int, port: int | None = None) -> list[dict]:
        out = []
        for n in names:
            addr = lab.backend_addrs[n][0 if family == 4 else 1]
            b = {"address": addr, "state": "draining" if n == drained else "active"}
            if port:
                b["port"] = port
            out.append(b)
        return out

    seg_b = [n for n, h in lab.backends.items() if h.segment == "b"][0]
    return [
        Service(name="web4", vip=lab.vip4, port=80, backends=bes(4), options={"hash_src_port": not affinity}),
        Service(name="web6", vip=lab.vip6, port=80, backends=bes(6), options={"hash_src_port": not affinity}),
        Service(name="dnat4", vip=lab.vips4[1], port=8000, backends=bes(4, 8080), options={"l4_dnat": True}),
        Service(name="redirect4", vip=lab.vips4[1], port=80,
                backends=[{"address": lab.backend_addrs[seg_b][0]}]),
    ]


def apply(lab: Lab, svcs: list[Service]) -> None:
    lab.worker.call(lab.dp.apply, svcs)


def reasons(lab: Lab) -> dict[str, int]:
    return {k: v["packets"] for k, v in lab.worker.call(lab.dp.stats).reasons.items()}


def client_sources(lab: Lab, family: int) -> list[tuple[str, str]]:
    out = []
    for name, host in lab.clients.items():
        for a in host.addresses():
            if (":" in a) == (family == 6):
                out.append((name, a))
    return out


@pytest.mark.parametrize("family", [4, 6])
def test_curl_reaches_every_backend_and_replies_are_direct(lab, family):
    apply(lab, services(lab))
    before = reasons(lab)
    vip = lab.vip4 if family == 4 else lab.vip6
    seen = collections.Counter()
    failures = []
    for client, src in client_sources(lab, family):
        for _ in range(2):
            r = lab.curl(client, lab.url(vip), source=src)
            if not r.ok:
                failures.append(f"{client} {src}: rc={r.returncode} {r.stderr.strip()}")
                continue
            seen[r.backend] += 1
            assert r.remote_ip.strip("[]") == vip
    assert not failures, failures
    assert set(seen) == set(seg_a_backends(lab)), f"every backend must serve: {dict(seen)}"
    after = reasons(lab)
    forwarded = after["tx"] - before["tx"]
    assert forwarded >= sum(seen.values()) * 3, "handshake, request and ACKs went through the LB"
    # Replies (VIP -> client) never cross the LB: each connection's replies
    # (SYN-ACK, response, FIN, ACKs) would add >= 4 non-service packets; only
    # a little ARP/ND arrives.
    conns = sum(seen.values())
    stray = sum(after[k] - before[k] for k in ("pass_not_service", "pass_not_ip"))
    assert stray < conns, f"{stray} non-service packets reached the LB for {conns} connections"


def test_udp_through_the_lb(lab):
    svc = Service(name="dns4", vip=lab.vip4, port=5353, protocol="udp",
                  backends=[{"address": lab.backend_addrs[n][0]} for n in seg_a_backends(lab)])
    apply(lab, services(lab) + [svc])
    seen = set()
    for client, src in client_sources(lab, 4):
        rep = lab.udp(client, lab.vip4, source=src)
        assert rep is not None, f"no UDP echo for {src}"
        assert rep.peer[0] == lab.vip4
        seen.add(rep.backend)
    assert len(seen) >= 2


def test_drain_moves_only_the_drained_backends_clients(lab):
    apply(lab, services(lab, affinity=True))
    srcs = client_sources(lab, 4)
    first = {src: lab.curl(c, lab.url(lab.vip4), source=src).backend for c, src in srcs}
    assert None not in first.values()
    victim = collections.Counter(first.values()).most_common(1)[0][0]
    apply(lab, services(lab, drained=victim, affinity=True))
    moved_others = 0
    for c, src in srcs:
        r = lab.curl(c, lab.url(lab.vip4), source=src)
        assert r.ok and r.backend != victim, f"{src} still reached drained {victim}"
        moved_others += first[src] != victim and r.backend != first[src]
    assert moved_others == 0, f"{moved_others} clients of other backends moved"
    apply(lab, services(lab, affinity=True))
    back = {src: lab.curl(c, lab.url(lab.vip4), source=src).backend for c, src in srcs}
    assert back == first, "undraining restores the original mapping"


def test_redirect_to_backend_behind_second_nic(lab):
    # (L4 DNAT with real traffic, and the backends' reverse port rewrite it
    # needs under DSR, is in test_dnat_traffic.py.)
    apply(lab, services(lab))
    before = reasons(lab)
    r = lab.curl("c1", lab.url(lab.vips4[1], 80))
    seg_b = [n for n, h in lab.backends.items() if h.segment == "b"][0]
    d = {k: v - before[k] for k, v in reasons(lab).items() if v != before[k]}
    assert r.ok and r.backend == seg_b, f"{r.stderr} {d}"
    assert reasons(lab)["redirect"] > before["redirect"]


def test_missing_neighbours_go_through_the_kernel(lab):
    apply(lab, services(lab))
    before = reasons(lab)
    netns.run(lab.lb_ns, "ip", "neigh", "flush", "dev", lab.lb_if, check=False)
    lab.worker.call(lab.dp.refresh_nexthops)  # as the daemon does periodically: the cache lets go
    r = lab.curl("c2", lab.url(lab.vip4))
    assert r.ok, r.stderr
    # the first packets found no neighbour and were forwarded by the kernel
    assert reasons(lab)["pass_no_neigh"] > before["pass_no_neigh"]
