"""Netlink (pyroute2): XDP attach / atomic replace, interface addresses,
neighbour upkeep for backends, sysctls of attached interfaces; tc egress
programs and the policy routing of health probes through the tunnel."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_REPLACE,
    XDP_FLAGS_SKB_MODE,
)

from l4lb.datapath.config import DatapathError
from l4lb.datapath.routes import RouteTable

log = logging.getLogger(__name__)

# IFLA_XDP_ATTACHED, as a number or as pyroute2's decoded name.
XDP_ATTACHED_NAMES = {0: "none", 1: "native", 2: "generic", 3: "offload", 4: "multi",
                      "none": "none", "xdp": "native", "xdpgeneric": "generic",
                      "xdpoffload": "offload", "xdpmulti": "multi"}
IFF_UP, IFF_NOARP = 0x1, 0x80
NTF_EXT_MANAGED = 1  # NDA_FLAGS_EXT: the kernel keeps the entry resolved (Linux >= 5.16)
RTN_UNICAST = 1
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE|STALE|DELAY|PROBE|NOARP|PERMANENT


@dataclass(frozen=True)
class XdpState:
    prog_id: int
    mode: str


@dataclass(frozen=True)
class IfaceAddrs:
    ifindex: int
    v4: ipaddress.IPv4Address | None
    v6: ipaddress.IPv6Address | None


def ifindex(ipr: IPRoute, name: str) -> int:
    idx = ipr.link_lookup(ifname=name)
    if not idx:
        raise DatapathError(f"interface {name!r} does not exist")
    return idx[0]


def xdp_state(ipr: IPRoute, idx: int) -> XdpState:
    link = ipr.get_links(idx)[0]
    xdp = link.get_attr("IFLA_XDP")
    if not xdp:
        return XdpState(0, "none")
    mode = XDP_ATTACHED_NAMES.get(xdp.get_attr("IFLA_XDP_ATTACHED") or 0, "unknown")
    return XdpState(xdp.get_attr("IFLA_XDP_PROG_ID") or 0, mode)


def _set_xdp(ipr: IPRoute, idx: int, fd: int, flags: int, expected_fd: int | None) -> None:
    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]
    if expected_fd is not None:
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
    ipr.link("set", index=idx, IFLA_XDP={"attrs": attrs})


def attach(ipr: IPRoute, name: str, prog_fd: int, mode: str, expected_fd: int | None, current: XdpState) -> str:
    """Attach prog_fd; with expected_fd, atomically replace that program
    (XDP_FLAGS_REPLACE: the kernel swaps only if it is still attached).
    Never detaches first: on some NICs (mlx5) a detach resets the link."""
    idx = ifindex(ipr, name)
    if current.prog_id and current.mode in ("native", "generic"):
        modes = [current.mode]  # a replace must stay in the attached mode
        if mode != "auto" and mode != current.mode:
            raise DatapathError(
                f"{name}: an XDP program is attached in {current.mode} mode; "
                f"replacing it in {mode} mode would need a detach (refused)"
            )
    else:
        modes = {"native": ["native"], "generic": ["generic"], "auto": ["native", "generic"]}[mode]
    errors = []
    for m in modes:
        flags = XDP_FLAGS_DRV_MODE if m == "native" else XDP_FLAGS_SKB_MODE
        if expected_fd is not None:
            flags |= XDP_FLAGS_REPLACE
        try:
            _set_xdp(ipr, idx, prog_fd, flags, expected_fd)
            return m
        except NetlinkError as e:
            errors.append(f"{m}: {e}")
    raise DatapathError(f"cannot attach XDP to {name}: " + "; ".join(errors))


def detach(ipr: IPRoute, name: str) -> None:
    idx = ifindex(ipr, name)
    st = xdp_state(ipr, idx)
    if not st.prog_id:
        return
    flags = XDP_FLAGS_SKB_MODE if st.mode == "generic" else XDP_FLAGS_DRV_MODE
    _set_xdp(ipr, idx, -1, flags, None)


def iface_addrs(ipr: IPRoute, name: str) -> IfaceAddrs:
    """The interface's first global IPv4 and IPv6 addresses (outer sources)."""
    idx = ifindex(ipr, name)
    v4 = v6 = None
    for a in ipr.get_addr(index=idx):
        addr = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
        if addr.is_link_local or addr.is_loopback:
            continue
        if addr.version == 4 and v4 is None:
            v4 = addr
        elif addr.version == 6 and v6 is None:
            v6 = addr
    return IfaceAddrs(idx, v4, v6)


def set_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        log.warning("cannot set %s=%s: %s", path, value, e)


def ensure_neighbours(ipr: IPRoute, addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
                      routes: RouteTable | None = None) -> int:
    """Make the kernel resolve and keep neighbour entries for the next hops of
    backends (managed entries), so bpf_fib_lookup rarely says NO_NEIGH.
    Returns how many entries were created. Best effort: logs, never raises."""
    created = 0
    routes = routes or RouteTable(ipr, {a.version for a in addrs})
    # One neighbour dump per (family, interface), not one per backend: pyroute2
    # parses every entry of a dump in Python, and this runs beside API requests.
    known: dict[tuple[int, int], dict[str, int]] = {}
    for addr in addrs:
        r = routes.get(addr)
        if r is None:
            continue  # the next-hop refresh reports backends without a route (summarised)
        if r.type != RTN_UNICAST or r.oif is None or r.via:
            continue  # local, blackhole, ...: no neighbour to keep
        gw = r.gateway or str(addr)
        family = 10 if ":" in str(gw) else 2
        table = known.get((family, r.oif))
        if table is None:
            table = known[(family, r.oif)] = {}
            for n in ipr.get_neighbours(family=family, ifindex=r.oif):
                dst = n.get_attr("NDA_DST")
                table[dst] = table.get(dst, 0) | n["state"]
        if table.get(str(gw), 0) & NUD_VALID:
            continue
        try:
            ipr.neigh("replace", dst=str(gw), ifindex=r.oif, family=family, state=0x01,
                      NDA_FLAGS_EXT=NTF_EXT_MANAGED)
            table[str(gw)] = NUD_VALID  # done: other backends behind this gateway need nothing
            created += 1
        except NetlinkError as e:
            log.warning("cannot add managed neighbour %s on ifindex %s: %s", gw, r.oif, e)
    return created


# --- tc egress programs and probe routing (health checks through the tunnel) -------------

TC_EGRESS_PARENT = "ffff:fff3"   # clsact egress
TC_FILTER_PRIO = 1               # fixed, so that the filter is found again (replaced, deleted)


def tc_attach_egress(ipr: IPRoute, idx: int, fd: int, name: str) -> None:
    """A clsact qdisc on ``idx`` (kept if present) and our direct-action bpf filter
    on its egress; an existing filter of ours is replaced in one step (no gap)."""
    try:
        ipr.tc("add", "clsact", idx)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
    ipr.tc("replace-filter", "bpf", idx, ":1", fd=fd, name=name, parent=TC_EGRESS_PARENT,
           classid=1, direct_action=True, prio=TC_FILTER_PRIO)


def tc_detach_egress(ipr: IPRoute, idx: int) -> None:
    """Remove our egress filter (the clsact qdisc stays: others may use it)."""
    try:
        ipr.tc("del-filter", "bpf", idx, ":1", parent=TC_EGRESS_PARENT, prio=TC_FILTER_PRIO)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EINVAL):
            raise


def ensure_veth(ipr: IPRoute, name: str, peer: str, mtu: int) -> int:
    """A veth pair, both ends up, ``name`` without ARP/ND (a packet routed to
    it needs no neighbour) and with ``mtu``; returns its ifindex."""
    if not ipr.link_lookup(ifname=name):
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer})
    idx = ifindex(ipr, name)
    for end in (name, peer):
        # No IPv6 link-local address and no autoconfiguration: nothing of its own to send.
        set_sysctl(f"/proc/sys/net/ipv6/conf/{end}/addr_gen_mode", "1")
        set_sysctl(f"/proc/sys/net/ipv6/conf/{end}/accept_ra", "0")
    ipr.link("set", index=idx, mtu=mtu, flags=IFF_NOARP | IFF_UP, change=IFF_NOARP | IFF_UP)
    ipr.link("set", index=ifindex(ipr, peer), state="up")
    return idx


def ensure_mark_routing(ipr: IPRoute, mark: int, mask: int, table: int, priority: int, oif: int) -> None:
    """Packets whose fwmark matches ``mark/mask`` take ``table``, whose default
    route (IPv4 and IPv6) leaves through ``oif``. Idempotent."""
    for family in (socket.AF_INET, socket.AF_INET6):
        have = [r for r in ipr.get_rules(family=family)
                if r.get_attr("FRA_TABLE") == table and r.get_attr("FRA_FWMARK") == mark
                and r.get_attr("FRA_PRIORITY") == priority]
        if not have:
            ipr.rule("add", family=family, table=table, priority=priority, fwmark=mark, fwmask=mask)
        ipr.route("replace", family=family, dst="0.0.0.0/0" if family == socket.AF_INET else "::/0",
                  table=table, oif=oif)

