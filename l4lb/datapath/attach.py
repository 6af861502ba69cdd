"""Attaching the program to interfaces: the interface table and devmap the
program redirects by, atomic replacement of a running program
(XDP_FLAGS_REPLACE, never a detach first), deliberate detach, and what is
attached where."""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterable, Sequence

from pyroute2 import IPRoute

from l4lb.datapath import netlink
from l4lb.datapath.config import DatapathError
from l4lb.datapath.libbpf import prog_fd_by_id, prog_info
from l4lb.datapath.loader import FUNC, Program
from l4lb.datapath.tables import Tables

log = logging.getLogger(__name__)

IF_F_V4 = 1
IF_F_V6 = 2


def attach(t: Tables, prog: Program, interfaces: Sequence[str], mode: str) -> dict[str, str]:
    """Fill the interface table and devmap, then attach (or atomically replace)
    on each interface; returns interface -> XDP mode used."""
    if mode not in ("native", "generic", "auto"):
        raise DatapathError(f"XDP mode must be native, generic or auto, not {mode!r}")
    with IPRoute() as ipr:
        infos = [netlink.iface_addrs(ipr, name) for name in interfaces]
        # Interface table and devmap first: the program may redirect to any
        # of them as soon as it runs.
        for slot, (name, info) in enumerate(zip(interfaces, infos)):
            t.tx_ports[ctypes.c_int(slot)] = ctypes.c_int(info.ifindex)
            v = t.ifaces.Leaf()
            flags = 0
            if info.v4 is not None:
                v.v4 = int.from_bytes(info.v4.packed, "little")
                flags |= IF_F_V4
            if info.v6 is not None:
                raw = info.v6.packed
                for i in range(4):
                    v.v6[i] = int.from_bytes(raw[4 * i:4 * i + 4], "little")
                flags |= IF_F_V6
            v.tx_slot = slot
            v.flags = flags
            t.ifaces[t.ifaces.Key(info.ifindex)] = v
            # NO_NEIGH hands the encapsulated packet (our own source) to the
            # kernel; accept_local lets IPv4 forward it instead of calling it martian.
            netlink.set_sysctl(f"/proc/sys/net/ipv4/conf/{name}/accept_local", "1")
        result = {}
        for name, info in zip(interfaces, infos):
            current = netlink.xdp_state(ipr, info.ifindex)
            expected = None
            if current.prog_id:
                expected = replaceable_fd(name, current.prog_id)
            try:
                result[name] = netlink.attach(ipr, name, prog.fd, mode, expected, current)
            finally:
                if expected is not None:
                    os.close(expected)
            if current.prog_id:
                log.info("%s: replaced XDP program id %d atomically (%s)", name, current.prog_id, result[name])
            else:
                log.info("%s: attached XDP (%s)", name, result[name])
    return result


def replaceable_fd(name: str, prog_id: int) -> int:
    fd = prog_fd_by_id(prog_id)
    info = prog_info(fd)
    if info.name.decode() != FUNC[:15]:
        os.close(fd)
        raise DatapathError(
            f"{name} already runs XDP program {info.name.decode()!r} (id {prog_id}), not l4lb; refusing to replace it"
        )
    return fd


def detach(interfaces: Iterable[str]) -> None:
    with IPRoute() as ipr:
        for name in interfaces:
            netlink.detach(ipr, name)


def interface_status(names: Iterable[str]) -> dict[str, dict[str, object]]:
    """interface -> {mode, prog_id} as the kernel reports it now."""
    ifaces: dict[str, dict[str, object]] = {}
    try:
        with IPRoute() as ipr:
            for name in names:
                st = netlink.xdp_state(ipr, netlink.ifindex(ipr, name))
                ifaces[name] = {"mode": st.mode, "prog_id": st.prog_id}
    except Exception as e:
        log.warning("interface status: %s", e)
    return ifaces
