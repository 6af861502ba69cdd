"""Typed access to the datapath maps, through BCC's generated ctypes types."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import socket
from typing import Any

import numpy as np

from l4lb.datapath import libbpf

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FAMILY = {4: 4, 6: 6}


def addr_words(addr: IPAddress) -> list[int]:
    """Four 32-bit words holding the address bytes in network order
    (IPv4 in word 0), as the C structs store them."""
    raw = addr.packed.ljust(16, b"\0")
    return list(np.frombuffer(raw, dtype="<u4").tolist())


def words_addr(words: Any, family: int) -> IPAddress:
    raw = bytes(np.array(list(words), dtype="<u4").tobytes())
    return ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw)


def port_be(port: int) -> int:
    return socket.htons(port)


def port_host(port_be_value: int) -> int:
    return socket.ntohs(port_be_value)


class Tables:
    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self.services = bpf[b"services"]
        self.maglev_outer = bpf[b"maglev_outer"]
        self.backends = bpf[b"backends"]
        self.flows = bpf[b"flows"]
        self.config = bpf[b"config"]
        self.ifaces = bpf[b"ifaces"]
        self.tx_ports = bpf[b"tx_ports"]
        self.svc_stats = bpf[b"svc_stats"]
        self.backend_stats = bpf[b"backend_stats"]
        self.reason_stats = bpf[b"reason_stats"]
        self.nexthops = bpf[b"nexthops"]

    # --- next hops ------------------------------------------------------------
    def write_nexthop(self, bid: int, ifindex: int, gen: int, mtu: int, smac: bytes, dmac: bytes) -> None:
        v = self.nexthops.Leaf()
        v.ifindex, v.gen, v.mtu = ifindex, gen, mtu
        v.smac[:] = list(smac)
        v.dmac[:] = list(dmac)
        self.nexthops[ct.c_uint32(bid)] = v

    def clear_nexthop(self, bid: int) -> None:
        self.nexthops[ct.c_uint32(bid)] = self.nexthops.Leaf()

    # --- services -------------------------------------------------------------
    def svc_key(self, vip: IPAddress, port: int, proto: int) -> Any:
        k = self.services.Key()
        k.vip[:] = addr_words(vip)
        k.port = port_be(port)
        k.proto = proto
        k.family = vip.version
        return k

    def read_services(self) -> dict[tuple[str, int, int], tuple[int, int]]:
        """(vip exploded, port, proto) -> (id, flags) of what is in the map."""
        out = {}
        for k, v in self.services.items():
            vip = words_addr(k.vip, k.family)
            out[(vip.exploded, port_host(k.port), k.proto)] = (v.id, v.flags)
        return out

    # --- maglev ---------------------------------------------------------------
    def swap_maglev(self, svc_id: int, ids: np.ndarray) -> None:
        """Build a fresh inner array and swap it in with one outer update:
        a packet sees either the whole old table or the whole new one."""
        fd = libbpf.array_create(f"maglev_{svc_id}", 4, len(ids))
        try:
            libbpf.array_update_all(fd, ids.astype("<u4").tobytes(), 4)
            self.maglev_outer[ct.c_int(svc_id)] = ct.c_int(fd)
        finally:
            os.close(fd)

    def read_maglev(self, svc_id: int) -> np.ndarray | None:
        key = ct.c_int(svc_id)
        map_id = ct.c_uint32()
        if not libbpf.map_lookup(self.maglev_outer.map_fd, key, map_id) or not map_id.value:
            return None
        fd = libbpf.map_fd_by_id(map_id.value)
        try:
            n = libbpf.map_info(fd).max_entries
            out = np.zeros(n, dtype=np.uint32)
            v = ct.c_uint32()
            for i in range(n):
                libbpf.map_lookup(fd, ct.c_uint32(i), v)
                out[i] = v.value
            return out
        finally:
            os.close(fd)

    # --- backends ------------------------------------------------------------
    def read_backends(self) -> dict[int, Any]:
        """id -> backend_info for every used slot (one batch read)."""
        out = {}
        try:
            items = self.backends.items_lookup_batch()
        except Exception:
            items = self.backends.items()
        for k, v in items:
            if v.family:
                out[k if isinstance(k, int) else k.value] = v
        return out

    def write_backend(self, bid: int, addr: IPAddress, port: int, svc_id: int, gen: int, flags: int) -> None:
        v = self.backends.Leaf()
        v.addr[:] = addr_words(addr)
        v.port = port_be(port)
        v.family = addr.version
        v.flags = flags
        v.svc_id = svc_id
        v.gen = gen
        self.backends[ct.c_uint32(bid)] = v

    def clear_backend(self, bid: int) -> None:
        self.backends[ct.c_uint32(bid)] = self.backends.Leaf()

    # --- counters ------------------------------------------------------------
    @staticmethod
    def percpu_sum(table: Any, idx: int) -> tuple[int, int]:
        vals = table[ct.c_uint32(idx)]
        return sum(v.packets for v in vals), sum(v.bytes for v in vals)

    @staticmethod
    def percpu_zero(table: Any, idx: int) -> None:
        # BCC's per-CPU Leaf is an array of one struct per possible CPU.
        table[ct.c_uint32(idx)] = table.Leaf()
