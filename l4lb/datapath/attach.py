"""Attaching the program to interfaces: the interface table and devmap the
program redirects by, atomic replacement of a running program
(XDP_FLAGS_REPLACE, never a detach first), deliberate detach, and what is
attached where.

Only our own program is ever replaced: the one pinned under our bpffs
directory, or an l4lb program whose maps are pinned there. An l4lb program of
another daemon (other pins, same NIC) is refused, as is any other program.
The pinned one is opened by path, which needs no CAP_SYS_ADMIN; anything else
can only be inspected by id, which does.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from l4lb.datapath import libbpf, netlink
from l4lb.datapath.config import DatapathError
from l4lb.datapath.loader import FUNC, PROG_PIN, Program
from l4lb.datapath.tables import Tables

log = logging.getLogger(__name__)

IF_F_V4 = 1
IF_F_V6 = 2


def attach(t: Tables, prog: Program, interfaces: Sequence[str], mode: str) -> tuple[dict[str, str], bool]:
    """Fill the interface table and devmap, then attach (or atomically replace)
    on each interface; returns (interface -> XDP mode used, whether any
    interface got the program only now)."""
    if mode not in ("native", "generic", "auto"):
        raise DatapathError(f"XDP mode must be native, generic or auto, not {mode!r}")
    bpffs = prog.pin_dir.parent
    mine = libbpf.prog_info(prog.fd).id
    with IPRoute() as ipr:
        infos = [netlink.iface_addrs(ipr, name) for name in interfaces]
        # Interface table and devmap first: the program may redirect to any
        # of them as soon as it runs. Entries that hold this already are not rewritten.
        for slot, (name, info) in enumerate(zip(interfaces, infos)):
            _put(t.tx_ports, ctypes.c_int(slot), ctypes.c_int(info.ifindex))
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
            _put(t.ifaces, t.ifaces.Key(info.ifindex), v)
            # NO_NEIGH hands the encapsulated packet (our own source) to the
            # kernel; accept_local lets IPv4 forward it instead of calling it martian.
            netlink.set_sysctl(f"/proc/sys/net/ipv4/conf/{name}/accept_local", "1")
        t.tables_changed()  # the datapath's cached copies of `ifaces` entries (lib/hotcache.h)
        result, fresh = {}, False
        for name, info in zip(interfaces, infos):
            current = netlink.xdp_state(ipr, info.ifindex)
            if current.prog_id == mine and current.mode in ("native", "generic") and mode in ("auto", current.mode):
                result[name] = current.mode  # an adopted program, attached already: nothing to do
                log.info("%s: XDP program id %d already attached (%s)", name, mine, current.mode)
                continue
            expected = None
            if current.prog_id:
                expected, problem = inspect(bpffs, name, current.prog_id)
                if problem is not None:
                    raise DatapathError(problem)
            try:
                result[name] = netlink.attach(ipr, name, prog.fd, mode, expected, current)
            finally:
                if expected is not None:
                    os.close(expected)
            fresh = True
            if current.prog_id:
                log.info("%s: replaced XDP program id %d atomically (%s)", name, current.prog_id, result[name])
            else:
                log.info("%s: attached XDP (%s)", name, result[name])
    return result, fresh


def _put(table: Any, key: Any, value: Any) -> None:
    try:
        if bytes(table[key]) == bytes(value):
            return
    except KeyError:
        pass
    table[key] = value


def inspect(bpffs: Path, name: str, prog_id: int) -> tuple[int | None, str | None]:
    """(an fd of program ``prog_id`` to replace it by, None) if it is ours,
    else (None, why it must not be replaced)."""
    for pin in sorted(bpffs.glob(f"maps-*/{PROG_PIN}")):
        fd = libbpf.obj_get(str(pin))
        if libbpf.prog_info(fd).id == prog_id:
            return fd, None
        os.close(fd)
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except OSError as e:
        return None, (f"{name} runs XDP program id {prog_id}, which is not the l4lb program pinned under {bpffs}, "
                      f"and it cannot be inspected ({e.strerror}; that needs CAP_SYS_ADMIN): refusing to replace it. "
                      "If another l4lbd runs on this interface, stop it (or `l4lbd --detach` with its config) first")
    info_name = libbpf.prog_info(fd).name.decode()
    if info_name != FUNC[:15]:
        os.close(fd)
        return None, f"{name} already runs XDP program {info_name!r} (id {prog_id}), not l4lb; refusing to replace it"
    if set(libbpf.prog_map_ids(fd)) & _pinned_map_ids(bpffs):
        return fd, None  # ours, attached but not pinned (a crash between attach and pin)
    os.close(fd)
    return None, (f"{name} runs another l4lbd's program (id {prog_id}): its maps are not pinned under {bpffs}. "
                  "Refusing to replace it; stop that daemon (or `l4lbd --detach` with its config) first")


def _pinned_map_ids(bpffs: Path) -> set[int]:
    ids = set()
    for pin in bpffs.glob("maps-*/services"):
        fd = libbpf.obj_get(str(pin))
        try:
            ids.add(libbpf.map_info(fd).id)
        finally:
            os.close(fd)
    return ids


def foreign(bpffs: Path, interfaces: Iterable[str]) -> list[str]:
    """Why attaching to ``interfaces`` would be refused (programs that are not
    ours), checked before anything is loaded; interfaces that do not exist are
    the preflight's business."""
    problems = []
    with IPRoute() as ipr:
        for name in interfaces:
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                continue
            current = netlink.xdp_state(ipr, idx[0])
            if not current.prog_id:
                continue
            fd, problem = inspect(bpffs, name, current.prog_id)
            if fd is not None:
                os.close(fd)
            if problem is not None:
                problems.append(problem)
    return problems


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
