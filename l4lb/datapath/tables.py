"""Typed access to the datapath maps, through BCC's generated ctypes types."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import os
import socket
from typing import Any

import numpy as np

from l4lb.datapath import libbpf
from l4lb.datapath.flags import bit
from l4lb.datapath.pinned import MapHandle

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


# The maps Tables gives names to; they are what a program adopted without
# compiling must bring (loader.py keeps BCC's types of exactly these).
MAPS = ("services", "maglev_outer", "backends", "flows", "config", "ifaces", "tx_ports", "svc_stats",
        "backend_stats", "reason_stats", "nexthops", "vips", "frags", "src_ranges", "cache_epoch")


def handle(bpf: Any, name: str) -> MapHandle:
    """``bpf[name]`` as a MapHandle: a bcc.BPF's table wrapped, an adopted program's as it is."""
    table = bpf[name.encode()]
    return table if isinstance(table, MapHandle) else MapHandle.of_bcc(name, table)


class Tables:
    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self.services = handle(bpf, "services")
        self.maglev_outer = handle(bpf, "maglev_outer")
        self.backends = handle(bpf, "backends")
        self.flows = handle(bpf, "flows")
        self.config = handle(bpf, "config")
        self.ifaces = handle(bpf, "ifaces")
        self.tx_ports = handle(bpf, "tx_ports")
        self.svc_stats = handle(bpf, "svc_stats")
        self.backend_stats = handle(bpf, "backend_stats")
        self.reason_stats = handle(bpf, "reason_stats")
        self.nexthops = handle(bpf, "nexthops")
        self.vips = handle(bpf, "vips")      # vips.py
        self.frags = handle(bpf, "frags")    # the datapath's own (lib/frag.h): read by tests
        self.src_ranges = handle(bpf, "src_ranges")  # srcranges.py
        self.cache_epoch = handle(bpf, "cache_epoch")
        self.tables_changed()  # a program loaded just now has empty caches; this makes them usable

    # --- the datapath's per-CPU caches of services and ifaces (bpf_src/lib/hotcache.h) ----------
    def tables_changed(self) -> None:
        """Call after every write to ``services`` or ``ifaces``: bumps ``cache_epoch``, so no
        CPU uses a cached copy of an entry from before the write (at 0, a new map's
        value, the datapath uses no cache). One writer: the daemon's change path."""
        key = ct.c_uint32(0)
        now = int(self.cache_epoch[key].value)
        self.cache_epoch[key] = ct.c_uint64(now + 1)

    # --- run-time config ---------------------------------------------------------
    def write_config(self, cfg: Any, hash_seed: int) -> None:
        """``lb_config`` from a DatapathConfig: flow-hash seed, outer-source prefixes, reply
        rate, whether ICMP errors go to the flow's backend."""
        c = self.config.Leaf()
        c.hash_seed = hash_seed
        c.icmp_rate = cfg.icmp_rate
        c.icmp_burst = max(1, cfg.icmp_rate // 10)
        flags = 0
        if cfg.outer_src_v4 is not None:
            net = cfg.outer_src_v4
            c.src4_prefix = int.from_bytes(net.network_address.packed, "little")
            c.src4_hostmask = int.from_bytes(net.hostmask.packed, "little")
            flags |= bit("CFG_F_SRC_PREFIX4")
        if cfg.outer_src_v6 is not None:
            net6 = cfg.outer_src_v6
            pre, host = net6.network_address.packed, net6.hostmask.packed
            for i in range(4):
                c.src6_prefix[i] = int.from_bytes(pre[4 * i:4 * i + 4], "little")
                c.src6_hostmask[i] = int.from_bytes(host[4 * i:4 * i + 4], "little")
            flags |= bit("CFG_F_SRC_PREFIX6")
        c.flags = flags | (bit("CFG_F_ICMP_FWD") if cfg.forward_icmp_errors else 0)
        key = self.config.Key(0)
        if bytes(self.config[key]) != bytes(c):  # a restart with the same config writes nothing
            self.config[key] = c

    # --- next hops ------------------------------------------------------------
    def write_nexthop(self, bid: int, ifindex: int, gen: int, mtu: int, smac: bytes, dmac: bytes) -> None:
        v = self.nexthops.Leaf()
        v.ifindex, v.gen, v.mtu = ifindex, gen, mtu
        v.smac[:] = list(smac)
        v.dmac[:] = list(dmac)
        self.nexthops[ct.c_uint32(bid)] = v

    def write_nexthops(self, rows: list[tuple[int, Any, int]]) -> None:
        """write_nexthop for many (bid, next hop, gen) in one batch syscall; the
        next hop has ifindex, mtu, smac, dmac (nexthop.NextHop)."""
        if not rows:
            return
        vals = np.zeros(len(rows), dtype=np.dtype(self.nexthops.Leaf))
        vals["gen"] = [r[2] for r in rows]
        # Column by column per distinct next hop: 100,000 slots share a few.
        hops: dict[Any, list[int]] = {}
        for i, r in enumerate(rows):
            hops.setdefault(r[1], []).append(i)
        for nh, idx in hops.items():
            vals["ifindex"][idx] = nh.ifindex
            vals["mtu"][idx] = nh.mtu
            vals["smac"][idx] = np.frombuffer(bytes(nh.smac), dtype=np.uint8)
            vals["dmac"][idx] = np.frombuffer(bytes(nh.dmac), dtype=np.uint8)
        libbpf.update_batch(self.nexthops.map_fd, np.array([r[0] for r in rows], dtype=np.uint32), vals,
                            "next hops batch update")

    def clear_nexthops(self, bids: list[int]) -> None:
        vals = np.zeros(len(bids), dtype=np.dtype(self.nexthops.Leaf))
        libbpf.update_batch(self.nexthops.map_fd, np.array(bids, dtype=np.uint32), vals, "next hops batch clear")

    # --- services -------------------------------------------------------------
    def svc_key(self, vip: IPAddress, port: int, proto: int) -> Any:
        k = self.services.Key()
        k.vip[:] = addr_words(vip)
        k.port = port_be(port)
        k.proto = proto
        k.family = vip.version
        return k

    def read_services(self) -> dict[tuple[str, int, int], tuple[int, int, int, int, int]]:
        """(vip exploded, port, proto) -> (id, flags, ring, gen, affinity_prefix) of what is in the map."""
        out = {}
        for k, v in self.services.items():
            vip = words_addr(k.vip, k.family)
            out[(vip.exploded, port_host(k.port), k.proto)] = (v.id, v.flags, v.ring, v.gen, v.affinity_prefix)
        return out

    # --- maglev (written through rings.py) -----------------------------------------------
    def read_maglev(self, ring: int) -> np.ndarray | None:
        """Table at outer index ``ring`` (a service entry's ``ring``), element by
        element through the syscall: an independent check of what rings.py wrote."""
        map_id = ct.c_uint32()
        if not libbpf.map_lookup(self.maglev_outer.map_fd, ct.c_int(ring), map_id) or not map_id.value:
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
        """id -> backend_info (ctypes) for every used slot (one batch read)."""
        bids, rows = self.backend_rows()
        leaf = self.backends.Leaf
        return {int(b): leaf.from_buffer_copy(r.tobytes()) for b, r in zip(bids, rows)}

    def backend_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(slot ids, backend_info rows as numpy) of every used slot, in one batch read."""
        rows = self.backends.values_array()
        used = np.flatnonzero(rows["family"])
        return used, rows[used]

    def write_backends(self, bids: list[int], addrs: list[IPAddress], ports: list[int], svc_ids: list[int],
                       gens: list[int], flags: list[int]) -> None:
        """Backend entries for many slots in one batch syscall (slots in list order)."""
        if not bids:
            return
        rows = np.zeros(len(bids), dtype=self._backend_dtype())
        raw = b"".join(a.packed.ljust(16, b"\0") for a in addrs)
        rows["addr"] = np.frombuffer(raw, dtype="<u4").reshape(len(bids), 4)
        rows["port"] = np.array(ports, dtype=np.uint16).byteswap()  # network order, as port_be()
        rows["family"] = [a.version for a in addrs]
        rows["flags"] = flags
        rows["svc_id"] = svc_ids
        rows["gen"] = gens
        libbpf.update_batch(self.backends.map_fd, np.array(bids, dtype=np.uint32), rows, "backends batch update")

    def clear_backends(self, bids: list[int]) -> None:
        rows = np.zeros(len(bids), dtype=self._backend_dtype())
        libbpf.update_batch(self.backends.map_fd, np.array(bids, dtype=np.uint32), rows, "backends batch clear")

    def _backend_dtype(self) -> np.dtype:
        # numpy's view of BCC's ctypes Leaf: the C struct stays the only layout.
        dt = np.dtype(self.backends.Leaf)
        assert dt.itemsize == ct.sizeof(self.backends.Leaf)
        return dt

    # --- counters ------------------------------------------------------------
    @staticmethod
    def percpu_sums(table: Any) -> np.ndarray:
        """[packets, bytes] summed over CPUs for every index of a per-CPU counter
        array, in one batch read (a stats sample must not do one syscall per backend)."""
        raw = libbpf.array_lookup_all(table.map_fd, table.max_entries, ct.sizeof(table.Leaf))
        per_cpu = raw.view(np.dtype(table.sLeaf)).reshape(table.max_entries, -1)  # BCC's struct counter
        return np.stack([per_cpu["packets"].sum(axis=1), per_cpu["bytes"].sum(axis=1)], axis=1)

    @staticmethod
    def percpu_zero(table: Any, idx: int) -> None:
        # BCC's per-CPU Leaf is an array of one struct per possible CPU.
        table[ct.c_uint32(idx)] = table.Leaf()

    @staticmethod
    def percpu_zero_many(table: Any, ids: list[int]) -> None:
        """percpu_zero for many slots in one batch syscall."""
        zeros = np.zeros(len(ids) * ct.sizeof(table.Leaf), dtype=np.uint8)
        libbpf.update_batch(table.map_fd, np.array(ids, dtype=np.uint32), zeros, "counters batch reset")
