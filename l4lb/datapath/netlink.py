"""Netlink (pyroute2): XDP attach / atomic replace, interface addresses,
neighbour upkeep for backends, sysctls of attached interfaces."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import (
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_REPLACE,
    XDP_FLAGS_SKB_MODE,
)

from l4lb.datapath.config import DatapathError

log = logging.getLogger(__name__)

# IFLA_XDP_ATTACHED, as a number or as pyroute2's decoded name.
XDP_ATTACHED_NAMES = {0: "none", 1: "native", 2: "generic", 3: "offload", 4: "multi",
                      "none": "none", "xdp": "native", "xdpgeneric": "generic",
                      "xdpoffload": "offload", "xdpmulti": "multi"}
NTF_EXT_MANAGED = 1  # NDA_FLAGS_EXT: the kernel keeps the entry resolved (Linux >= 5.16)
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


def ensure_neighbours(ipr: IPRoute, addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> int:
    """Make the kernel resolve and keep neighbour entries for the next hops of
    backends (managed entries), so bpf_fib_lookup rarely says NO_NEIGH.
    Returns how many entries were created. Best effort: logs, never raises."""
    created = 0
    # One neighbour dump per (family, interface), not one per backend: pyroute2
    # parses every entry of a dump in Python, and this runs beside API requests.
    known: dict[tuple[int, int], dict[str, int]] = {}
    for addr in addrs:
        try:
            routes = ipr.route("get", dst=str(addr))
        except NetlinkError as e:
            log.warning("no route to backend %s: %s", addr, e)
            continue
        if not routes:
            continue
        r = routes[0]
        oif = r.get_attr("RTA_OIF")
        gw = r.get_attr("RTA_GATEWAY") or r.get_attr("RTA_VIA") or str(addr)
        if oif is None or isinstance(gw, dict):
            continue
        family = 10 if ":" in str(gw) else 2
        table = known.get((family, oif))
        if table is None:
            table = known[(family, oif)] = {}
            for n in ipr.get_neighbours(family=family, ifindex=oif):
                dst = n.get_attr("NDA_DST")
                table[dst] = table.get(dst, 0) | n["state"]
        if table.get(str(gw), 0) & NUD_VALID:
            continue
        try:
            ipr.neigh("replace", dst=str(gw), ifindex=oif, family=family, state=0x01,
                      NDA_FLAGS_EXT=NTF_EXT_MANAGED)
            table[str(gw)] = NUD_VALID  # done: other backends behind this gateway need nothing
            created += 1
        except NetlinkError as e:
            log.warning("cannot add managed neighbour %s on ifindex %s: %s", gw, oif, e)
    return created
