"""Next hops of backends, resolved from the kernel's routes and neighbours.

The XDP program's ``nexthops`` map (NEXTHOP_CACHE builds) saves a
``bpf_fib_lookup`` per packet (~100 ns on this machine, bench/datapath.py).
What goes in it must be what the kernel itself would do, so it is read from
the kernel: the route (routes.py: one dump, longest-prefix match) for the
egress interface, gateway and route MTU,
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
from functools import lru_cache

from pyroute2 import IPRoute

from l4lb.addrtext import exploded, from_exploded
from l4lb.datapath.routes import RouteTable

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE|STALE|DELAY|PROBE|NOARP|PERMANENT
RTN_UNICAST = 1
AF = {4: 2, 6: 10}


ip_of = lru_cache(maxsize=1 << 17)(from_exploded)  # by text: see upkeep.py on IPv6Address keys


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


class Resolver:
    """One dump of routes, links and neighbours; then next hops of any number
    of addresses without another netlink round trip (but for the few the
    route dump cannot answer, routes.py)."""

    def __init__(self, ipr: IPRoute, families: Iterable[int], ifindexes: set[int]) -> None:
        families = sorted(set(families))
        self.routes = RouteTable(ipr, families)
        # Per egress interface its MAC and MTU; per (interface, next hop as an int) the neighbour's MAC.
        self.links = {lk["index"]: (_mac(lk.get_attr("IFLA_ADDRESS")), lk.get_attr("IFLA_MTU") or 0)
                      for lk in ipr.get_links() if lk["index"] in ifindexes}
        self.neigh: dict[tuple[int, int, int], bytes] = {}
        self.unroutable: set[str] = set()  # of the addresses resolved: those without any route
        for fam in families:
            for n in ipr.get_neighbours(family=AF[fam]):
                mac = _mac(n.get_attr("NDA_LLADDR"))
                if mac and n["state"] & NUD_USABLE:
                    dst = ipaddress.ip_address(n.get_attr("NDA_DST"))
                    self.neigh[(n["ifindex"], dst.version, int(dst))] = mac
        self._gateways: dict[str, tuple[int, int]] = {}

    def snapshot(self) -> object | None:
        """What resolve()'s answers follow from: equal snapshots give equal answers
        (None: they depend on more than the dumps)."""
        routes = self.routes.snapshot()
        return None if routes is None else (routes, self.links, self.neigh)

    def resolve(self, texts: Iterable[str]) -> dict[str, NextHop | None]:
        """Next hop of each address (exploded text), or None where the FIB must decide."""
        return {text: self._one(text) for text in texts}

    def _one(self, text: str) -> NextHop | None:
        addr = ip_of(text)
        r = self.routes.get(addr)
        if r is None:
            self.unroutable.add(text)
        if r is None or r.multipath or r.type != RTN_UNICAST or r.via:
            return None  # no route, ECMP, not unicast, or v4 over a v6 next hop: the FIB decides
        link = self.links.get(r.oif)  # type: ignore[arg-type]
        if link is None:
            return None  # an interface without our program
        if r.gateway is None:
            hop = (addr.version, int(addr))
        else:
            hop = self._gateways.get(r.gateway)
            if hop is None:
                gw = ipaddress.ip_address(r.gateway)
                hop = self._gateways[r.gateway] = (gw.version, int(gw))
        dmac = self.neigh.get((r.oif, *hop))  # type: ignore[arg-type]
        smac, mtu = link
        if dmac is None or smac is None:
            return None
        if r.mtu:
            mtu = min(mtu, r.mtu)
        return NextHop(r.oif, smac, dmac, mtu)  # type: ignore[arg-type]


def resolve(ipr: IPRoute, addrs: Iterable[IPAddress], ifindexes: set[int]) -> dict[IPAddress, NextHop | None]:
    """Next hop of each address, or None where the FIB must decide."""
    addrs = list(addrs)
    if not addrs:
        return {}
    hops = Resolver(ipr, {a.version for a in addrs}, ifindexes).resolve(exploded(a) for a in addrs)
    return {a: hops[exploded(a)] for a in addrs}
