"""Next hops of backends, resolved from the kernel's routes and neighbours.

The XDP program's ``nexthops`` map (NEXTHOP_CACHE builds) saves a
``bpf_fib_lookup`` per packet (~100 ns on this machine, bench/datapath.py).
What goes in it must be what the kernel itself would do, so it is read from
the kernel: ``ip route get`` for the egress interface, gateway and route MTU,
the interface's MAC and MTU, and the gateway's neighbour entry. Cases the
cache cannot represent are left out, and the program asks the FIB for them:
multipath (ECMP) routes, unresolved neighbours, non-unicast routes, egress
interfaces the program is not attached to.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE|STALE|DELAY|PROBE|NOARP|PERMANENT
RTN_UNICAST = 1
RTAX_MTU = "RTAX_MTU"
AF = {4: 2, 6: 10}


@dataclass(frozen=True)
class NextHop:
    ifindex: int
    smac: bytes
    dmac: bytes
    mtu: int


def _mac(text: str | None) -> bytes | None:
    if not text:
        return None
    raw = bytes.fromhex(text.replace(":", ""))
    return raw if len(raw) == 6 else None


def _multipath_nets(ipr: IPRoute, family: int) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for r in ipr.get_routes(family=AF[family]):
        if r.get_attr("RTA_MULTIPATH"):
            dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == 4 else "::")
            nets.append(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False))
    return nets


def resolve(ipr: IPRoute, addrs: Iterable[IPAddress], ifindexes: set[int]) -> dict[IPAddress, NextHop | None]:
    """Next hop of each address, or None where the FIB must decide.
    One dump of links, neighbours and multipath routes per call; one route
    lookup per distinct address."""
    addrs = sorted(set(addrs), key=lambda a: (a.version, a.packed))
    out: dict[IPAddress, NextHop | None] = {}
    if not addrs:
        return out
    links = {lk["index"]: lk for lk in ipr.get_links()}
    neigh: dict[tuple[int, str], bytes] = {}
    multipath: dict[int, list] = {}
    for fam in sorted({a.version for a in addrs}):
        multipath[fam] = _multipath_nets(ipr, fam)
        for n in ipr.get_neighbours(family=AF[fam]):
            mac = _mac(n.get_attr("NDA_LLADDR"))
            if mac and n["state"] & NUD_USABLE:
                neigh[(n["ifindex"], str(ipaddress.ip_address(n.get_attr("NDA_DST"))))] = mac
    for addr in addrs:
        out[addr] = None
        if any(addr in net for net in multipath[addr.version]):
            continue
        try:
            routes = ipr.route("get", dst=str(addr))
        except NetlinkError:
            continue
        if not routes or routes[0]["type"] != RTN_UNICAST:
            continue
        r = routes[0]
        oif = r.get_attr("RTA_OIF")
        if oif not in ifindexes or oif not in links:
            continue
        gw = r.get_attr("RTA_GATEWAY") or addr
        if isinstance(gw, dict):  # RTA_VIA (v4 over v6 next hop): leave it to the FIB
            continue
        dmac = neigh.get((oif, str(ipaddress.ip_address(gw))))
        link = links[oif]
        smac = _mac(link.get_attr("IFLA_ADDRESS"))
        if dmac is None or smac is None:
            continue
        mtu = link.get_attr("IFLA_MTU") or 0
        metrics = r.get_attr("RTA_METRICS")
        route_mtu = metrics.get_attr(RTAX_MTU) if metrics else None
        if route_mtu:
            mtu = min(mtu, route_mtu)
        out[addr] = NextHop(oif, smac, dmac, mtu)
    return out
