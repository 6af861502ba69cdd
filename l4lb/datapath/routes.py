"""Route lookups for many addresses at once: one dump of the rules and routes,
then longest-prefix matches in Python, instead of one ``ip route get`` per
backend (a netlink round trip each: ~42 s for 100,000 backends).

It answers only what it can answer exactly as the kernel would: the default
rules (local, main, default tables, nothing else), per table the longest
prefix, then the lowest metric, ``throw`` moving on to the next table. Where
that is not enough to be sure (policy rules, two routes of one prefix and
metric, dead or link-down next hops) it says so, and the caller asks the
kernel for that address (``route get``). No library does this lookup on a
netlink dump (pyroute2's NDB keeps routes but asks the kernel for lookups).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AF = {4: 2, 6: 10}
BITS = {4: 32, 6: 128}
RTN_THROW = 9
RTM_F_CLONED = 0x200
RTNH_F_DEAD, RTNH_F_LINKDOWN = 0x1, 0x10
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
# (table, priority) of the rules a fresh network namespace has; only with these
# (or a subset: IPv6 has no "default" rule) is the lookup order known.
DEFAULT_RULES = {(255, 0), (254, 32766), (253, 32767)}
ORDER = (255, 254, 253)  # local, main, default


@dataclass(frozen=True)
class Route:
    """What ``ip route get`` tells about one destination."""

    type: int                 # RTN_*: 1 unicast, 2 local, 6 blackhole, ...
    oif: int | None
    gateway: str | None       # RTA_GATEWAY (None: on link, or RTA_VIA)
    via: bool                 # RTA_VIA (an IPv4 route over an IPv6 next hop)
    mtu: int | None           # RTAX_MTU of the route
    multipath: bool


UNSURE = object()  # the dump cannot say: ask the kernel
_said: dict[int, bool] = {}  # family -> the last "exact" logged


def _marked_only(rule: dict) -> bool:
    """A rule only packets with a fwmark can match: never our lookups, which
    carry mark 0 (``route get`` without ``mark``; bpf_fib_lookup without
    BPF_FIB_LOOKUP_MARK). The health probes' own rule (l4lb/datapath/probes.py)
    is one, and every box has it: counted as a policy rule it sent each of
    100,000 backends' next hops to ``route get`` at every refresh. The kernel
    matches when (mark ^ rule mark) & mask == 0, so mark 0 misses iff rule
    mark & mask != 0 (the mask defaults to all ones); ``not fwmark`` inverts."""
    mark = rule.get_attr("FRA_FWMARK")  # type: ignore[attr-defined]
    if not mark or rule["flags"] & FIB_RULE_INVERT:
        return False
    mask = rule.get_attr("FRA_FWMASK")  # type: ignore[attr-defined]
    return mark & (0xFFFFFFFF if mask is None else mask) != 0


def _route(r: dict) -> Route:
    metrics = r.get_attr("RTA_METRICS")  # type: ignore[attr-defined]
    return Route(r["type"], r.get_attr("RTA_OIF"), r.get_attr("RTA_GATEWAY"),  # type: ignore[attr-defined]
                 r.get_attr("RTA_VIA") is not None, metrics.get_attr("RTAX_MTU") if metrics else None,  # type: ignore[attr-defined]
                 r.get_attr("RTA_MULTIPATH") is not None)  # type: ignore[attr-defined]


class RouteTable:
    def __init__(self, ipr: IPRoute, families: Iterable[int]) -> None:
        self._ipr = ipr
        # family -> [(table, {prefix length: {network: [(metric, route or UNSURE)]}}, lengths longest first)]
        self._tables: dict[int, list[tuple[int, dict[int, dict[int, list]], list[int]]]] = {}
        self.exact: dict[int, bool] = {}
        self._multipath: dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
        self.asked = 0  # addresses the kernel was asked about (policy rules, unsure matches)
        for fam in families:
            self._load(fam)

    def _load(self, fam: int) -> None:
        rules = {(r.get_attr("FRA_TABLE") or r["table"], r.get_attr("FRA_PRIORITY") or 0, r["action"],
                  tuple(sorted(k for k, _ in r["attrs"] if k not in ("FRA_TABLE", "FRA_PRIORITY", "FRA_PROTOCOL",
                                                                     "FRA_SUPPRESS_PREFIXLEN"))))
                 for r in self._ipr.get_rules(family=AF[fam]) if not _marked_only(r)}
        self.exact[fam] = all(a == FR_ACT_TO_TBL and not extra and (t, p) in DEFAULT_RULES for t, p, a, extra in rules)
        if self.exact[fam] != _said.get(fam, True):  # said when it changes, not at every refresh
            _said[fam] = self.exact[fam]
            log.info("IPv%d policy routing rules %s", fam, "gone: next hops come from one dump again" if self.exact[fam]
                     else "present: next hops are looked up one address at a time")
        by_table: dict[int, dict[int, dict[int, list]]] = {}
        self._multipath[fam] = []
        for r in self._ipr.get_routes(family=AF[fam]):
            if r["flags"] & RTM_F_CLONED or r["tos"]:
                continue  # cached clones; TOS routes never match a lookup without TOS
            plen = r["dst_len"]
            dst = r.get_attr("RTA_DST") or ("0.0.0.0" if fam == 4 else "::")
            if r.get_attr("RTA_MULTIPATH") is not None:
                self._multipath[fam].append(ipaddress.ip_network(f"{dst}/{plen}", strict=False))
            table = r.get_attr("RTA_TABLE") or r["table"]
            if table not in ORDER:
                continue  # no default rule points at it
            net = int(ipaddress.ip_address(dst)) >> (BITS[fam] - plen) if plen else 0
            sure = not r["flags"] & (RTNH_F_DEAD | RTNH_F_LINKDOWN)
            entry = (r.get_attr("RTA_PRIORITY") or 0, _route(r) if sure else UNSURE)
            by_table.setdefault(table, {}).setdefault(plen, {}).setdefault(net, []).append(entry)
        self._tables[fam] = [(t, by_table[t], sorted(by_table[t], reverse=True)) for t in ORDER if t in by_table]

    def snapshot(self) -> object | None:
        """What every answer of lookup() and get() follows from, to compare with a later
        dump's; None where the kernel's answers depend on more (policy rules)."""
        if not all(self.exact.values()):
            return None
        return self._tables, self._multipath

    def lookup(self, addr: IPAddress) -> Route | None | object:
        """The route the kernel would use, None for no route, or UNSURE."""
        fam = addr.version
        if not self.exact.get(fam):
            return UNSURE
        n = int(addr)
        for _, prefixes, lengths in self._tables.get(fam, ()):
            for plen in lengths:
                hits = prefixes[plen].get(n >> (BITS[fam] - plen) if plen else 0)
                if not hits:
                    continue
                best = min(m for m, _ in hits)
                winners = [r for m, r in hits if m == best]
                if len(winners) > 1 or winners[0] is UNSURE:
                    return UNSURE  # the kernel's choice among equals is not ours to guess
                route = winners[0]
                if route.type == RTN_THROW:
                    break  # on to the next table
                return route
        return None

    def get(self, addr: IPAddress) -> Route | None:
        """lookup(), asking the kernel where the dump is not enough."""
        hit = self.lookup(addr)
        if hit is not UNSURE:
            return hit  # type: ignore[return-value]
        self.asked += 1
        try:
            routes = self._ipr.route("get", dst=str(addr))
        except NetlinkError:
            return None
        if not routes:
            return None
        # `route get` names one next hop of a multipath route: say it is one.
        multipath = any(addr in net for net in self._multipath.get(addr.version, ()))
        return replace(_route(routes[0]), multipath=True) if multipath else _route(routes[0])
