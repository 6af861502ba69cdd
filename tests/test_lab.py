"""The network-namespace lab itself: topology, servers, decapsulation, teardown.

Needs root, network namespaces and BPF (the backends' decapsulator).
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import json
import os
import socket
import subprocess
import threading

import pytest

from l4lb.datapath.source import compile_bpf
from l4lb.lab import netns
from l4lb.lab.topology import (LB_IP4, LB_IP6, NET_A4, NET_A6, NET_B4, NET_B6, UDP_PORT, VIP_NET4,
                               VIP_NET6, Lab)

pytestmark = pytest.mark.netns

# --------------------------------------------------------------------------- helpers

def _send_frame_and_wait(lab: Lab, client: str, frame: bytes, bind: tuple[str, int],
                         timeout: float = 2.0) -> tuple[bytes, tuple[str, int]] | None:
    """In the client's netns: open a UDP socket on ``bind``, send ``frame`` raw on
    eth0, return the first datagram that comes back (or None)."""
    host = lab.hosts[client]
    fam = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET

    def go():
        with socket.socket(fam, socket.SOCK_DGRAM) as rx, \
                socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as tx:
            rx.bind(bind)
            rx.settimeout(timeout)
            tx.bind((host.ifname, 0))
            tx.send(frame)
            try:
                data, peer = rx.recvfrom(65535)
            except socket.timeout:
                return None
            return data, (peer[0], peer[1])

    return lab.call(client, go)


def _tunnel_frame(client, backend, outer: str, inner: str, sport: int, payload: bytes,
                  vip4: str, vip6: str, **outer_kw) -> bytes:
    """Ether / outer (client -> backend) / inner (client -> VIP) / UDP to the echo port."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    if inner == "4":
        inner_pkt = IP(src=client.ip4, dst=vip4, ttl=64) / UDP(sport=sport, dport=UDP_PORT) / payload
        proto = 4
    else:
        inner_pkt = IPv6(src=client.ip6, dst=vip6, hlim=64) / UDP(sport=sport, dport=UDP_PORT) / payload
        proto = 41
    if outer == "4":
        outer_pkt = IP(src=client.ip4, dst=backend.ip4, proto=proto, ttl=64, **outer_kw)
    else:
        outer_pkt = IPv6(src=client.ip6, dst=backend.ip6, nh=proto, hlim=64, **outer_kw)
    return bytes(Ether(src=client.mac, dst=backend.mac) / outer_pkt / inner_pkt)


# --------------------------------------------------------------------------- lifecycle

def test_lab_comes_up_and_tears_down_completely(lab_decap):
    lab = Lab(clients=2, backends=3, decap=lab_decap)
    with lab:
        names = lab.namespaces
        assert len(names) == 1 + 2 + 1 + 3
        assert all(n.startswith(f"l4t-{lab.tag}-") for n in names)
        assert set(names) <= set(netns.list_netns())
        server_pids = [p.pid for p in lab._servers.values()]
        assert len(server_pids) == 3
        assert all(os.path.exists(f"/proc/{p}") for p in server_pids)
        assert lab.curl("c1", lab.url(lab.backends["b2"].ip4)).backend == "b2"
    assert not [n for n in netns.list_netns() if lab.tag in n]
    for p in server_pids:
        assert not os.path.exists(f"/proc/{p}") or \
            open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    assert not os.path.exists(f"{netns.OWNER_DIR}/{lab.tag}.owner")
    lab.teardown()          # idempotent
    # the decap addresses were unregistered
    assert lab_decap.count_for(lab.backends["b2"].ip4) == 0


def test_failed_bring_up_leaves_nothing(lab_decap):
    lab = Lab(clients=1, backends=1, decap=lab_decap, http_ports=(80, 80))   # second bind fails
    with pytest.raises(netns.NetnsError, match="server on b1 failed"):
        lab.up()
    assert not [n for n in netns.list_netns() if lab.tag in n]


def test_cleanup_removes_dead_leftovers_only():
    prefix = f"l4tz{os.getpid() % 10000}"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live_tag, dead_tag = "aaaaaa", "bbbbbb"
    netns.add(f"{prefix}-{dead_tag}-x")
    netns.add(f"{prefix}-{live_tag}-x")
    try:
        netns.OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (netns.OWNER_DIR / f"{dead_tag}.owner").write_text(f"{dead.pid} 1\n")
        netns.claim(live_tag)
        removed = netns.cleanup(prefix)
        assert removed == [f"{prefix}-{dead_tag}-x"]
        assert netns.list_netns(prefix) == [f"{prefix}-{live_tag}-x"]
        assert netns.cleanup(prefix, force=True) == [f"{prefix}-{live_tag}-x"]
        assert netns.list_netns(prefix) == []
    finally:
        netns.delete(f"{prefix}-{dead_tag}-x")
        netns.delete(f"{prefix}-{live_tag}-x")
        netns.release(live_tag)
        netns.release(dead_tag)


# --------------------------------------------------------------------------- shape

def test_topology_facts(lab):
    assert len(lab.clients) == 2 and len(lab.backends) == 3
    assert lab.lb_ns == lab.lb.ns and lab.lb_if == "eth0" and lab.lb_if2 is None
    assert lab.lb_ip4 == LB_IP4 and lab.lb_ip6 == LB_IP6
    # ifindex / MAC as the kernel sees them inside the namespace
    assert lab.call("lb", socket.if_nametoindex, lab.lb_if) == lab.lb_ifindex
    info = netns.link_info(lab.lb_ns, lab.lb_if)
    assert info["address"] == lab.lb_mac and "xdp" not in info      # left free for the LB program
    for h in lab.hosts.values():
        for i in h.ifaces:
            assert netns.link_info(h.ns, i.name)["ifindex"] == i.ifindex
            assert netns.link_info(lab.bridge_ns, i.peer)["ifindex"] == i.peer_ifindex
    # addresses come from the documentation ranges, VIPs from the VIP nets
    for h in lab.hosts.values():
        for a in h.addresses():
            assert any(ipaddress.ip_address(a) in n for n in (NET_A4, NET_A6, NET_B4, NET_B6))
    assert all(ipaddress.ip_address(v) in VIP_NET4 for v in lab.vips4)
    assert all(ipaddress.ip_address(v) in VIP_NET6 for v in lab.vips6)
    assert set(lab.backend_addrs) == {"b1", "b2", "b3"}
    assert lab.backend_by_addr(lab.backends["b3"].ip6) == "b3"
    json.dumps(lab.describe())


def test_sysctls_and_programs(lab):
    def sysctl(where, key):
        return lab.run(where, "sysctl", "-n", key).stdout.strip()

    assert sysctl("lb", "net.ipv4.ip_forward") == "1"
    assert sysctl("lb", "net.ipv6.conf.all.forwarding") == "1"
    for b in lab.backends.values():
        for k in ("all", "default", "eth0"):
            assert sysctl(b.name, f"net.ipv4.conf.{k}.rp_filter") == "0"
        assert sysctl(b.name, "net.ipv4.conf.all.arp_ignore") == "1"
        assert sysctl(b.name, "net.ipv4.conf.all.arp_announce") == "2"
        lo = lab.run(b.name, "ip", "-j", "addr", "show", "dev", "lo").stdout
        assert all(v in lo for v in (*lab.vips4, *lab.vips6))
        assert lab.xdp_prog_id(b.name, "eth0") == lab.decap.prog_id
    assert lab.xdp_prog_id("br", lab.lb_peer) == lab.decap.pass_prog_id
    for c in lab.clients.values():
        feats = lab.run(c.name, "ethtool", "-k", "eth0").stdout
        assert "tx-checksumming: off" in feats
        routes = lab.run(c.name, "ip", "-j", "route", "get", lab.vip4).stdout
        assert json.loads(routes)[0]["gateway"] == LB_IP4


def _root_state() -> tuple[set, set]:
    addrs = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True,
                                      check=True).stdout)
    return ({(link["ifname"], a["local"]) for link in addrs for a in link.get("addr_info", [])},
            {link["ifname"] for link in addrs})


def test_root_namespace_untouched(lab_factory):
    # (this VM's own uplink sits in 192.0.2.0/24 too: compare with a snapshot, not ranges)
    before = _root_state()
    lab = lab_factory(clients=2, backends=3, seg_b_backends=1)
    assert _root_state() == before
    ours = {a for h in lab.hosts.values() for a in h.addresses()} | set(lab.vips4) | set(lab.vips6)
    assert not {a for _, a in before[0]} & ours
    lab.teardown()
    assert _root_state() == before


# --------------------------------------------------------------------------- traffic

def test_clients_ping_lb(lab):
    for c in lab.clients:
        assert lab.ping(c, LB_IP4), c
        assert lab.ping(c, LB_IP6), c


def test_backend_servers_answer_on_own_addresses(lab):
    for name, b in lab.backends.items():
        for addr in (b.ip4, b.ip6):
            for port in lab.http_ports:
                r = lab.curl("c1", lab.url(addr, port, "/hello"))
                assert r.ok, (name, addr, port, r.stderr)
                f = r.fields
                assert f["backend"] == name and f["local_ip"] == addr and f["local_port"] == str(port)
                assert f["path"] == "/hello"
            u = lab.udp("c2", addr, b"x")
            assert u is not None and u.backend == name and u.peer == (addr, UDP_PORT)


def test_curl_source_address_and_port(lab_factory):
    lab = lab_factory(clients=1, backends=1, client_extra_addrs=2)
    c = lab.clients["c1"]
    assert len(c.iface.extra_ip4) == 2 and len(c.iface.extra_ip6) == 2
    b = lab.backends["b1"]
    r = lab.curl(c, lab.url(b.ip4), source=c.iface.extra_ip4[1], local_port=41234)
    assert r.ok and r.fields["client_ip"] == c.iface.extra_ip4[1] and r.fields["client_port"] == "41234"
    assert (r.local_ip, r.local_port) == (c.iface.extra_ip4[1], 41234)
    r = lab.curl(c, lab.url(b.ip6), source=c.iface.extra_ip6[0], local_port=(42000, 42010))
    assert r.ok and r.fields["client_ip"] == c.iface.extra_ip6[0]
    assert 42000 <= int(r.fields["client_port"]) <= 42010
    r = lab.curl(c, lab.url(b.ip4, path="/bytes/100000"))
    assert r.ok and r.body.count("x") == 100000


def test_vip_not_answered_without_lb_program(lab):
    # clients route VIPs via the LB; with no LB program the LB has no route for them
    r = lab.curl("c1", lab.url(lab.vip4), timeout=2)
    assert not r.ok
    assert lab.udp("c1", lab.vip6, timeout=0.5) is None


# --------------------------------------------------------------------------- decap

@pytest.mark.parametrize("outer,inner", [("4", "4"), ("6", "6"), ("6", "4"), ("4", "6")])
def test_decap_tunnel_reaches_vip_and_reply_is_direct(lab, outer, inner):
    c = lab.clients["c1"]
    vip = lab.vip4 if inner == "4" else lab.vip6
    for i, (name, b) in enumerate(sorted(lab.backends.items())):
        outer_addr = b.ip4 if outer == "4" else b.ip6
        before = lab.decap.count_for(outer_addr)
        stats0 = lab.decap.stats()
        sport = 33000 + 10 * int(outer) + int(inner) + 100 * i
        payload = f"tunnel {outer}in{inner} to {name}".encode()
        frame = _tunnel_frame(c, b, outer, inner, sport, payload, lab.vip4, lab.vip6)
        src = c.ip4 if inner == "4" else c.ip6
        got = _send_frame_and_wait(lab, "c1", frame, (src, sport))
        assert got is not None, f"no reply from {name} for {outer}in{inner}"
        data, peer = got
        assert data == f"backend={name}\n".encode() + payload
        assert peer == (vip, UDP_PORT)              # the reply comes from the VIP, directly
        assert lab.decap.count_for(outer_addr) == before + 1
        key = "decap_v4" if outer == "4" else "decap_v6"
        assert lab.decap.stats()[key] >= stats0[key] + 1


def test_decap_passes_what_it_does_not_handle(lab):
    from scapy.layers.inet import IPOption_NOP

    c, b = lab.clients["c1"], lab.backends["b1"]
    before = lab.decap.count_for(b.ip4)
    unsupported = lab.decap.stats()["unsupported"]
    # IHL 6 (one option word): passed untouched, the kernel has no tunnel -> no reply
    frame = _tunnel_frame(c, b, "4", "4", 34567, b"opt", lab.vip4, lab.vip6,
                          options=[IPOption_NOP()] * 4)
    assert _send_frame_and_wait(lab, "c1", frame, (c.ip4, 34567), timeout=0.5) is None
    assert lab.decap.count_for(b.ip4) == before
    assert lab.decap.stats()["unsupported"] == unsupported + 1
    # plain traffic to the backend is not decapsulated either
    assert lab.udp("c1", b.ip4, b"plain").backend == "b1"
    assert lab.decap.count_for(b.ip4) == before


# --------------------------------------------------------------------------- XDP_TX / REDIRECT path

L2FWD = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

struct fwd_cfg { unsigned char dst[6]; unsigned char src[6]; __u32 ifindex; __u32 vip; __u16 port; };
BPF_ARRAY(cfg, struct fwd_cfg, 1);
BPF_ARRAY(hits, __u64, 1);

int xdp_l2fwd(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(*eth);
    struct udphdr *udp = (void *)(ip + 1);
    int zero = 0;
    if ((void *)(udp + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    if (ip->ihl != 5 || (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP))
        return XDP_PASS;    /* the TCP destination port sits where UDP's does */
    struct fwd_cfg *c = cfg.lookup(&zero);
    __u64 *h = hits.lookup(&zero);
    if (!c || !h || ip->daddr != c->vip || udp->dest != c->port)
        return XDP_PASS;
    __builtin_memcpy(eth->h_dest, c->dst, 6);
    __builtin_memcpy(eth->h_source, c->src, 6);
    *h += 1;
    if (c->ifindex)
        return bpf_redirect(c->ifindex, 0);
    return XDP_TX;
}
"""


@pytest.fixture(scope="module")
def l2fwd():
    from bcc import BPF

    b = compile_bpf("test_lab:l2fwd", text=L2FWD)
    yield b, b.load_func(b"xdp_l2fwd", BPF.XDP)
    b.cleanup()


def _configure_l2fwd(bpf, dst_mac: str, src_mac: str, ifindex: int, vip: str,
                     port: int = UDP_PORT) -> None:
    t = bpf[b"cfg"]
    v = t.Leaf()
    ct.memmove(v.dst, bytes.fromhex(dst_mac.replace(":", "")), 6)
    ct.memmove(v.src, bytes.fromhex(src_mac.replace(":", "")), 6)
    v.ifindex = ifindex
    v.vip = int.from_bytes(socket.inet_aton(vip), "little")    # network order in memory
    v.port = socket.htons(port)
    t[t.Key(0)] = v


def _with_lb_program(lab: Lab, fn, body):
    from bcc import BPF

    lab.call("lb", BPF.attach_xdp, lab.lb_if.encode(), fn, 0)
    try:
        return body()
    finally:
        lab.call("lb", BPF.remove_xdp, lab.lb_if.encode(), 0)


def test_xdp_tx_from_lb_reaches_backend(lab, l2fwd):
    """The LB's veth can XDP_TX (its bridge-side peer runs xdp_pass): an L2 forward of
    client->VIP UDP to b2 is answered by b2, directly, from the VIP."""
    bpf, fn = l2fwd
    b2 = lab.backends["b2"]
    _configure_l2fwd(bpf, b2.mac, lab.lb_mac, 0, lab.vip4)
    hits0 = bpf[b"hits"][ct.c_int(0)].value
    r = _with_lb_program(lab, fn, lambda: lab.udp("c2", lab.vip4, b"via-xdp-tx", timeout=2))
    assert r is not None and r.backend == "b2" and r.peer == (lab.vip4, UDP_PORT)
    assert bpf[b"hits"][ct.c_int(0)].value == hits0 + 1
    # TCP too: works only because the clients' veths have tx checksumming off
    _configure_l2fwd(bpf, b2.mac, lab.lb_mac, 0, lab.vip4, port=80)
    r = _with_lb_program(lab, fn, lambda: lab.curl("c1", lab.url(lab.vip4, 80, "/bytes/20000")))
    assert r.ok and r.backend == "b2" and r.remote_ip == lab.vip4 and r.body.count("x") == 20000
    assert bpf[b"hits"][ct.c_int(0)].value > hits0 + 3
    assert lab.xdp_prog_id("lb", lab.lb_if) is None          # detached again


def test_second_segment_and_xdp_redirect(lab_factory, l2fwd):
    lab = lab_factory(clients=1, backends=1, seg_b_backends=1)
    assert lab.lb_if2 == "eth1" and lab.lb_iface2.segment == "b"
    b2 = lab.backends["b2"]
    assert b2.segment == "b" and ipaddress.ip_address(b2.ip4) in NET_B4
    assert lab.xdp_prog_id("br", lab.lb_iface2.peer) == lab.decap.pass_prog_id
    # plain routing through the LB reaches the segment-B backend (v4 and v6)
    assert lab.curl("c1", lab.url(b2.ip4)).backend == "b2"
    assert lab.curl("c1", lab.url(b2.ip6)).backend == "b2"
    # XDP_REDIRECT eth0 -> eth1, reply comes back through the LB's kernel forwarding
    bpf, fn = l2fwd
    _configure_l2fwd(bpf, b2.mac, lab.lb_iface2.mac, lab.lb_ifindex2, lab.vip4)
    r = _with_lb_program(lab, fn, lambda: lab.udp("c1", lab.vip4, b"via-redirect", timeout=2))
    assert r is not None and r.backend == "b2" and r.peer == (lab.vip4, UDP_PORT)


# --------------------------------------------------------------------------- setns helpers

def test_call_in_netns_and_worker(lab):
    mine = os.readlink("/proc/thread-self/ns/net")
    theirs = lab.call("lb", os.readlink, "/proc/thread-self/ns/net")
    assert theirs != mine and os.readlink("/proc/thread-self/ns/net") == mine
    assert theirs == lab.call("lb", lambda: os.readlink("/proc/thread-self/ns/net"))
    with pytest.raises(ZeroDivisionError):
        lab.call("lb", lambda: 1 / 0)
    # a socket made inside the LB netns stays there when used from this thread
    s = lab.call("lb", socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.bind((LB_IP4, 0))                 # only exists inside the LB netns
    with netns.NetnsWorker(lab.lb_ns) as w:
        assert w.call(socket.if_nametoindex, lab.lb_if) == lab.lb_ifindex
        seen = w.call(lambda: threading.current_thread().name)
        assert w.call(lambda: threading.current_thread().name) == seen
    with pytest.raises(FileNotFoundError):
        netns.call_in_netns("l4t-does-not-exist", int)


def test_pyroute2_bound_to_lb_namespace(lab):
    with netns.iproute(lab.lb_ns) as ipr:
        links = {link.get("ifname"): link["index"] for link in ipr.get_links()}
    assert links == {"lo": 1, lab.lb_if: lab.lb_ifindex}
