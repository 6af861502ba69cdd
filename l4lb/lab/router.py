"""A client behind a router, added to a running lab: the setting in which
path-MTU discovery through the LB matters (tests/test_edge_traffic.py).

::

      far (eth0, MTU 1500) ---- (eth1) rt (eth0) ---- br0 ---- lb, backends

* ``rt`` sits on segment A and routes the VIPs via the LB, like an edge
  router; the backends send their replies to the far client through it.
* Its route to the far client's network has a smaller MTU (``route_mtu``)
  than every link: a backend's full-size reply with DF set cannot pass, and
  ``rt`` answers with ICMP frag-needed / packet-too-big *to the VIP*, its
  source, which reaches the LB. (A route MTU, not a link MTU: the far client
  keeps a 1500-byte link and announces a full-size MSS, so only the path in
  the middle is narrow, as on the internet.)
* Addresses: rt 192.0.2.99 / 2001:db8:0:1::99 on segment A; far network
  203.0.113.0/24 and 2001:db8:0:3::/64 (rt .1/::1, far .10/::10). Segment B
  of the lab must be unused (it has 203.0.113.0/24).
* The namespaces carry the lab's tag, so the lab's teardown removes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from l4lb.lab import netns
from l4lb.lab.topology import BRIDGE_A, LB_IP4, LB_IP6, VIP_NET4, VIP_NET6, Lab

RT_A4, RT_A6 = "192.0.2.99", "2001:db8:0:1::99"
FAR_NET4, FAR_NET6 = "203.0.113.0/24", "2001:db8:0:3::/64"
RT_FAR4, RT_FAR6 = "203.0.113.1", "2001:db8:0:3::1"
FAR4, FAR6 = "203.0.113.10", "2001:db8:0:3::10"


@dataclass(frozen=True)
class RoutedClient:
    ns: str          # the far client's namespace
    router_ns: str
    ip4: str = FAR4
    ip6: str = FAR6


def add_routed_client(lab: Lab, route_mtu: int = 1280) -> RoutedClient:
    if lab.n_seg_b:
        raise ValueError("the routed client uses segment B's addresses: build the lab without it")
    rt, far = lab._ns("rt"), lab._ns("far")
    for ns in (rt, far):
        netns.add(ns)
        netns.sysctl(ns, {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                          "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0})
    netns.sysctl(rt, {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
    netns.ip_batch(lab.bridge_ns, [
        f"link add v-rt type veth peer name eth0 netns {rt}",
        f"link set v-rt master {BRIDGE_A} up",
    ])
    netns.ip_batch(rt, [
        f"link add eth1 type veth peer name eth0 netns {far}",
        f"addr add {RT_A4}/24 dev eth0", f"addr add {RT_A6}/64 dev eth0 nodad",
        f"addr add {RT_FAR4}/24 dev eth1", f"addr add {RT_FAR6}/64 dev eth1 nodad",
        "link set eth0 up", "link set eth1 up",
        f"route add {VIP_NET4} via {LB_IP4}", f"route add {VIP_NET6} via {LB_IP6}",
        # the narrow part of the path: replies to the far network
        f"route replace {FAR_NET4} dev eth1 mtu {route_mtu}",
        f"route replace {FAR_NET6} dev eth1 mtu {route_mtu} metric 256",  # the kernel's own route
    ])
    netns.ip_batch(far, [
        f"addr add {FAR4}/24 dev eth0", f"addr add {FAR6}/64 dev eth0 nodad", "link set eth0 up",
        f"route add default via {RT_FAR4}", f"route add ::/0 via {RT_FAR6}",
    ])
    # Checksums done by the sender, as a NIC would on the wire (NOTES.md: veth offload).
    netns.run(far, "ethtool", "-K", "eth0", "tx", "off")
    netns.run(rt, "ethtool", "-K", "eth0", "tx", "off")
    for b in lab.backends.values():
        netns.ip_batch(b.ns, [f"route add {FAR_NET4} via {RT_A4}", f"route add {FAR_NET6} via {RT_A6}"])
        for a in (RT_A4, RT_A6):
            netns.run(b.ns, "ping", "-c1", "-W2", "-q", a, check=False)
    for a in (LB_IP4, LB_IP6):
        netns.run(rt, "ping", "-c1", "-W2", "-q", a, check=False)
    return RoutedClient(ns=far, router_ns=rt)
