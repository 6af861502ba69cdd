"""Datapath: compile, reconcile desired services into the maps, attach.

Reconcile order keeps packets in flight safe: backend entries are written
before any Maglev table refers to them; a service's new table is complete
before the outer slot is swapped; the service entry is written last; removed
backends are cleared only after no table points to them any more. IDs are
recovered from the pinned maps on start, so a restarted daemon keeps the
flow table's (backend id, generation) pairs valid and connections survive.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pyroute2 import IPRoute

from l4lb import maglev
from l4lb.datapath import netlink, nexthop
from l4lb.datapath.config import DatapathConfig, DatapathError
from l4lb.datapath.libbpf import prog_fd_by_id, prog_info
from l4lb.datapath.loader import FUNC, Program, compile_program, pin_program, remove_stale_pins
from l4lb.datapath.nexthop import IPAddress, NextHop
from l4lb.datapath.tables import Tables, words_addr
from l4lb.models import BackendState, Service

log = logging.getLogger(__name__)

SVC_F_DNAT = 1
SVC_F_NO_SPORT = 2
BE_F_DOWN = 1
CFG_F_SRC_PREFIX4 = 1
CFG_F_SRC_PREFIX6 = 2
PROTO = {"tcp": 6, "udp": 17}
PROTO_NAME = {6: "tcp", 17: "udp"}

ServiceKey = tuple[str, int, str]          # (vip exploded, port, "tcp"/"udp")
BackendKey = tuple[str, int]               # (address exploded, port)


@dataclass
class DatapathStats:
    services: dict[ServiceKey, dict[str, int]] = field(default_factory=dict)
    backends: dict[tuple[ServiceKey, BackendKey], dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    timestamp: float = 0.0


@dataclass
class _BackendSlot:
    svc_id: int
    ident: BackendKey
    gen: int
    flags: int


def hash_seed(seed: bytes) -> int:
    """32-bit flow-hash seed derived from the Maglev seed: same config, same
    hashing on every box."""
    return int.from_bytes(hashlib.blake2b(seed, digest_size=4, person=b"l4lb-flow").digest(), "little")


class Datapath:
    def __init__(self, cfg: DatapathConfig) -> None:
        self.cfg = cfg
        self.prog: Program | None = None
        self.t: Tables | None = None
        self._lock = threading.RLock()
        self._svc_ids: dict[ServiceKey, int] = {}
        self._svc_flags: dict[ServiceKey, int] = {}
        self._backends: dict[int, _BackendSlot] = {}
        # svc id -> the inputs of the table written (weights, backend ids): an
        # apply rebuilds only the tables whose inputs changed.
        self._tables: dict[int, tuple[Any, ...]] = {}
        self._next_gen = 1
        self._applied: list[Service] = []
        # Slots freed by the last changes: re-adding the same service/backend
        # (an undo, a rollback) gets the same id and generation back, so flow
        # entries pinned to it stay valid and the maps end up byte-identical.
        self._freed_svc: dict[ServiceKey, int] = {}
        self._freed_be: dict[tuple[ServiceKey, BackendKey], tuple[int, int]] = {}
        self._attached: dict[str, str] = {}
        # Next hops: address -> what the kernel resolved, and what each backend
        # slot's `nexthops` entry holds (None = no entry: the program uses the FIB).
        self._nh_cache: dict[IPAddress, NextHop | None] = {}
        self._nh_written: dict[int, tuple[NextHop, int] | None] = {}
        self.fail_after_writes: int | None = None  # test hook: fail mid-reconcile

    # --- load -----------------------------------------------------------------
    def load(self) -> None:
        with self._lock:
            self.prog = compile_program(self.cfg)
            self.t = Tables(self.prog.bpf)
            self._write_config()
            self._recover()

    def update_runtime(self, cfg: DatapathConfig) -> None:
        """Apply run-time knobs (outer source prefixes, ICMP rate, seed) without
        recompiling; layout changes need a new load()."""
        from l4lb.datapath.loader import layout_cflags

        if layout_cflags(cfg) != layout_cflags(self.cfg):
            raise DatapathError("map layout changed (M, limits): a restart with a new program is needed")
        with self._lock:
            seed_changed = cfg.maglev_seed != self.cfg.maglev_seed
            self.cfg = cfg
            self._write_config()
            if seed_changed:
                self._tables.clear()
                self._reconcile(list(self._applied))

    @property
    def prog_fd(self) -> int:
        assert self.prog is not None, "load() first"
        return self.prog.fd

    @property
    def tables(self) -> Tables:
        assert self.t is not None, "load() first"
        return self.t

    def _write_config(self) -> None:
        t = self.tables
        c = t.config.Leaf()
        c.hash_seed = hash_seed(self.cfg.maglev_seed)
        c.icmp_rate = self.cfg.icmp_rate
        c.icmp_burst = max(1, self.cfg.icmp_rate // 10)
        flags = 0
        if self.cfg.outer_src_v4 is not None:
            net = self.cfg.outer_src_v4
            c.src4_prefix = int.from_bytes(net.network_address.packed, "little")
            c.src4_hostmask = int.from_bytes(net.hostmask.packed, "little")
            flags |= CFG_F_SRC_PREFIX4
        if self.cfg.outer_src_v6 is not None:
            net6 = self.cfg.outer_src_v6
            pre, host = net6.network_address.packed, net6.hostmask.packed
            for i in range(4):
                c.src6_prefix[i] = int.from_bytes(pre[4 * i:4 * i + 4], "little")
                c.src6_hostmask[i] = int.from_bytes(host[4 * i:4 * i + 4], "little")
            flags |= CFG_F_SRC_PREFIX6
        c.flags = flags
        t.config[t.config.Key(0)] = c

    def _recover(self) -> None:
        """Rebuild id allocation from pinned maps (a restart keeps flows valid)."""
        t = self.tables
        self._svc_ids.clear()
        self._svc_flags.clear()
        for (vip, port, proto), (sid, flags) in t.read_services().items():
            key = (vip, port, PROTO_NAME.get(proto, str(proto)))
            self._svc_ids[key] = sid
            self._svc_flags[key] = flags
        self._backends.clear()
        for bid, v in t.read_backends().items():
            addr = words_addr(v.addr, v.family)
            self._backends[bid] = _BackendSlot(v.svc_id, (addr.exploded, _ntohs(v.port)), v.gen, v.flags)
            self._next_gen = max(self._next_gen, v.gen + 1)
        self._tables.clear()
        if self._svc_ids:
            log.info("recovered %d services and %d backends from pinned maps",
                     len(self._svc_ids), len(self._backends))

    # --- reconcile --------------------------------------------------------------
    def apply(self, services: Sequence[Service]) -> None:
        """Make the maps hold exactly `services`. All or nothing: on failure
        the previous set is written back before the error is raised."""
        with self._lock:
            previous = list(self._applied)
            try:
                self._check_capacity(services)
                self._reconcile(list(services))
            except Exception as e:
                self.fail_after_writes = None
                try:
                    self._reconcile(previous)
                except Exception:  # pragma: no cover - logged, the original error matters
                    log.exception("rollback to the previous service set failed")
                if isinstance(e, DatapathError):
                    raise
                raise DatapathError(f"datapath update failed: {e}") from e
            self._applied = list(services)
        self._neighbours(services)
        self.refresh_nexthops(full=False)

    def _check_capacity(self, services: Sequence[Service]) -> None:
        if len(services) > self.cfg.max_services:
            raise DatapathError(f"{len(services)} services exceed the datapath limit of {self.cfg.max_services}")
        n = sum(len(s.backends) for s in services)
        if n > self.cfg.max_backends - 1:
            raise DatapathError(f"{n} backends exceed the datapath limit of {self.cfg.max_backends - 1}")

    def _tick(self) -> None:
        if self.fail_after_writes is not None:
            if self.fail_after_writes <= 0:
                raise DatapathError("injected failure (test hook)")
            self.fail_after_writes -= 1

    def _reconcile(self, services: list[Service]) -> None:
        t = self.tables
        want = {s.key: s for s in services}
        # 1. service ids
        used = set(self._svc_ids.values())
        free_svc = (i for i in range(self.cfg.max_services) if i not in used)
        new_ids: dict[ServiceKey, int] = {}
        for key in sorted(want):
            new_ids[key] = self._svc_ids.get(key, -1)
            if new_ids[key] < 0:
                old = self._freed_svc.pop(key, -1)
                new_ids[key] = old if old >= 0 and old not in used else next(free_svc)
                while new_ids[key] in used:
                    new_ids[key] = next(free_svc)
                used.add(new_ids[key])
        # 2. backends: existing slots by (svc id, identity), new ones allocated
        by_owner = {(slot.svc_id, slot.ident): bid for bid, slot in self._backends.items()}
        used_b = set(self._backends)
        keep_b: set[int] = set()
        free_b = (i for i in range(1, self.cfg.max_backends) if i not in used_b)
        for key, svc in sorted(want.items()):
            sid = new_ids[key]
            if key not in self._svc_ids:
                t.percpu_zero(t.svc_stats, sid)
            for b in svc.backends:
                ident = b.identity(svc.port)
                flags = BE_F_DOWN if b.state is BackendState.maintenance else 0
                bid = by_owner.get((sid, ident))
                if bid is None:
                    old_bid, old_gen = self._freed_be.pop((key, ident), (None, 0))
                    if old_bid is not None and old_bid not in self._backends:
                        bid, slot = old_bid, _BackendSlot(sid, ident, old_gen, flags)
                    else:
                        bid = next(free_b)
                        while bid in self._backends:
                            bid = next(free_b)
                        slot = _BackendSlot(sid, ident, self._next_gen, flags)
                        self._next_gen += 1
                        t.percpu_zero(t.backend_stats, bid)
                elif self._backends[bid].flags != flags:
                    slot = _BackendSlot(sid, ident, self._backends[bid].gen, flags)
                else:
                    keep_b.add(bid)
                    continue
                self._tick()
                t.write_backend(bid, b.address, ident[1], sid, slot.gen, flags)
                self._backends[bid] = slot
                by_owner[(sid, ident)] = bid
                keep_b.add(bid)
        # 3. Maglev tables, then service entries
        for key, svc in sorted(want.items()):
            sid = new_ids[key]
            weights = svc.maglev_weights()
            inputs = (tuple(sorted(weights.items())), tuple(by_owner[(sid, i)] for i in sorted(weights)))
            if self._tables.get(sid) != inputs:
                self._tick()
                t.swap_maglev(sid, self._maglev_ids(weights, sid, by_owner))
                self._tables[sid] = inputs
            flags = (SVC_F_DNAT if svc.options.l4_dnat else 0) | (0 if svc.options.hash_src_port else SVC_F_NO_SPORT)
            if self._svc_ids.get(key) != sid or self._svc_flags.get(key) != flags:
                self._tick()
                k = t.svc_key(svc.vip, svc.port, PROTO[svc.protocol.value])
                v = t.services.Leaf()
                v.id, v.flags = sid, flags
                t.services[k] = v
                self._svc_ids[key] = sid
                self._svc_flags[key] = flags
        # 4. services that go away: entry first, then their table
        for key in [k for k in self._svc_ids if k not in want]:
            sid = self._svc_ids[key]
            vip, port, proto = key
            self._tick()
            k = t.svc_key(ipaddress.ip_address(vip), port, PROTO[proto])
            try:
                del t.services[k]
            except KeyError:
                pass
            try:
                del t.maglev_outer[ctypes.c_int(sid)]
            except KeyError:
                pass
            del self._svc_ids[key]
            self._freed_svc[key] = sid
            self._svc_flags.pop(key, None)
            self._tables.pop(sid, None)
        # 5. backend slots nothing points at any more
        rev = {sid: key for key, sid in new_ids.items()} | {sid: key for key, sid in self._freed_svc.items()}
        for bid in [b for b in self._backends if b not in keep_b]:
            self._tick()
            t.clear_backend(bid)
            slot = self._backends.pop(bid)
            if slot.svc_id in rev:
                self._freed_be[(rev[slot.svc_id], slot.ident)] = (bid, slot.gen)
        # Forget freed slots that have been handed to someone else since.
        self._freed_be = {k: v for k, v in self._freed_be.items() if v[0] not in self._backends}
        in_use = set(self._svc_ids.values())
        self._freed_svc = {k: v for k, v in self._freed_svc.items() if v not in in_use}

    def _maglev_ids(self, weights: dict[BackendKey, int], sid: int,
                    by_owner: dict[tuple[int, BackendKey], int]) -> np.ndarray:
        table = maglev.build(weights, self.cfg.maglev_m, self.cfg.maglev_seed)
        lut = np.array([by_owner[(sid, ident)] for ident in table.identities] + [0], dtype=np.uint32)
        # -1 (no backend) indexes the trailing 0: "none" in the datapath.
        return lut[table.table]

    def _neighbours(self, services: Sequence[Service]) -> None:
        addrs = sorted({b.address for s in services for b in s.backends if b.state is not BackendState.maintenance},
                       key=lambda a: (a.version, a.packed))
        if not addrs:
            return
        try:
            with IPRoute() as ipr:
                netlink.ensure_neighbours(ipr, addrs)
        except Exception as e:  # neighbour upkeep must never break an apply
            log.warning("neighbour upkeep failed: %s", e)

    # --- attach -------------------------------------------------------------------
    def attach(self, interfaces: Sequence[str], mode: str = "auto") -> dict[str, str]:
        if mode not in ("native", "generic", "auto"):
            raise DatapathError(f"XDP mode must be native, generic or auto, not {mode!r}")
        with self._lock, IPRoute() as ipr:
            t = self.tables
            infos = [netlink.iface_addrs(ipr, name) for name in interfaces]
            # Interface table and devmap first: the program may redirect to any
            # of them as soon as it runs.
            for slot, (name, info) in enumerate(zip(interfaces, infos)):
                t.tx_ports[ctypes.c_int(slot)] = ctypes.c_int(info.ifindex)
                v = t.ifaces.Leaf()
                flags = 0
                if info.v4 is not None:
                    v.v4 = int.from_bytes(info.v4.packed, "little")
                    flags |= 1
                if info.v6 is not None:
                    raw = info.v6.packed
                    for i in range(4):
                        v.v6[i] = int.from_bytes(raw[4 * i:4 * i + 4], "little")
                    flags |= 2
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
                    expected = self._replaceable_fd(name, current.prog_id)
                try:
                    result[name] = netlink.attach(ipr, name, self.prog_fd, mode, expected, current)
                finally:
                    if expected is not None:
                        os.close(expected)
                if current.prog_id:
                    log.info("%s: replaced XDP program id %d atomically (%s)", name, current.prog_id, result[name])
                else:
                    log.info("%s: attached XDP (%s)", name, result[name])
            self._attached.update(result)
            assert self.prog is not None
            pin_program(self.prog)
            remove_stale_pins(self.cfg, self.prog.pin_dir)
        self.refresh_nexthops()
        return result

    def _replaceable_fd(self, name: str, prog_id: int) -> int:
        fd = prog_fd_by_id(prog_id)
        info = prog_info(fd)
        if info.name.decode() != FUNC[:15]:
            os.close(fd)
            raise DatapathError(
                f"{name} already runs XDP program {info.name.decode()!r} (id {prog_id}), not l4lb; refusing to replace it"
            )
        return fd

    def detach(self, interfaces: Sequence[str]) -> None:
        with self._lock, IPRoute() as ipr:
            for name in interfaces:
                netlink.detach(ipr, name)
                self._attached.pop(name, None)

    # --- next hops (NEXTHOP_CACHE) -------------------------------------------------------
    def refresh_nexthops(self, full: bool = True) -> int:
        """Resolve backends' next hops from the kernel and write the ``nexthops``
        map; returns how many entries changed. ``full=False`` resolves only
        addresses not seen before (after an apply); the daemon calls the full
        refresh periodically so route/neighbour/MTU changes reach the cache.
        Netlink runs outside the lock; entries are written for the slots (and
        generations) current at write time. Best effort: logs, never raises."""
        if not self.cfg.nexthop_cache or self.t is None:
            return 0
        with self._lock:
            addrs = {ipaddress.ip_address(slot.ident[0]) for slot in self._backends.values()}
            ifindexes = {k.value for k in self.tables.ifaces.keys()}
        todo = addrs if full else addrs - set(self._nh_cache)
        try:
            with IPRoute() as ipr:
                resolved = nexthop.resolve(ipr, todo, ifindexes)
        except Exception as e:  # noqa: BLE001 - the FIB path still forwards
            log.warning("next-hop refresh failed: %s", e)
            return 0
        changed = 0
        with self._lock:
            self._nh_cache = ({} if full else self._nh_cache) | resolved
            t = self.tables
            for bid in set(self._nh_written) - set(self._backends):
                t.clear_nexthop(bid)
                del self._nh_written[bid]
                changed += 1
            for bid, slot in self._backends.items():
                nh = self._nh_cache.get(ipaddress.ip_address(slot.ident[0]))
                want = (nh, slot.gen) if nh is not None else None
                if self._nh_written.get(bid, "unset") == want:
                    continue
                if want is None:
                    t.clear_nexthop(bid)
                else:
                    t.write_nexthop(bid, nh.ifindex, slot.gen, nh.mtu, nh.smac, nh.dmac)
                self._nh_written[bid] = want
                changed += 1
        return changed

    # --- recorder: whole-program replacement (l4lb/datapath/recorder.py) -------------
    def replace_program(self, extra_cflags: Sequence[str],
                        prepare: "Callable[[Program], None] | None" = None) -> Program | None:
        """Compile again with ``extra_cflags`` (e.g. a new recorder mask set), let ``prepare``
        fill the new program's unpinned maps, then swap it in atomically on every attached
        interface (XDP_FLAGS_REPLACE via attach()). Pinned maps are shared, so flows survive.
        Returns the old Program, still open: the caller drains and closes it."""
        from dataclasses import replace

        with self._lock:
            old, old_t, old_cfg = self.prog, self.t, self.cfg
            cfg = replace(self.cfg, extra_cflags=tuple(extra_cflags))
            prog = compile_program(cfg)
            try:
                if prepare is not None:
                    prepare(prog)
                self.prog, self.t, self.cfg = prog, Tables(prog.bpf), cfg
                if self._attached:
                    self.attach(list(self._attached), "auto")
            except BaseException:
                self.prog, self.t, self.cfg = old, old_t, old_cfg
                prog.bpf.cleanup()
                raise
            return old

    def id_names(self) -> tuple[dict[int, str], dict[int, str]]:
        """(service id -> "vip:port/proto", backend id -> "addr:port"), for capture comments."""
        with self._lock:
            svcs = {sid: f"{_hostport(vip, port)}/{proto}" for (vip, port, proto), sid in self._svc_ids.items()}
            bes = {bid: _hostport(*slot.ident) for bid, slot in self._backends.items()}
            return svcs, bes

    # --- read side ---------------------------------------------------------------------
    def stats(self) -> DatapathStats:
        with self._lock:
            t = self.tables
            st = DatapathStats(timestamp=time.time())
            for key, sid in self._svc_ids.items():
                p, b = t.percpu_sum(t.svc_stats, sid)
                st.services[key] = {"packets": p, "bytes": b}
            rev = {sid: key for key, sid in self._svc_ids.items()}
            for bid, slot in self._backends.items():
                if slot.svc_id in rev:
                    p, b = t.percpu_sum(t.backend_stats, bid)
                    st.backends[(rev[slot.svc_id], slot.ident)] = {"packets": p, "bytes": b}
            assert self.prog is not None
            for i, name in enumerate(self.prog.reasons):
                p, b = t.percpu_sum(t.reason_stats, i)
                st.reasons[name] = {"packets": p, "bytes": b}
            return st

    def backend_id(self, service: ServiceKey, ident: BackendKey) -> int | None:
        sid = self._svc_ids.get(service)
        for bid, slot in self._backends.items():
            if slot.svc_id == sid and slot.ident == ident:
                return bid
        return None

    def service_id(self, service: ServiceKey) -> int | None:
        return self._svc_ids.get(service)

    def status(self) -> dict[str, Any]:
        with self._lock:
            assert self.prog is not None
            info = prog_info(self.prog.fd)
            ifaces = {}
            try:
                with IPRoute() as ipr:
                    for name in self._attached:
                        st = netlink.xdp_state(ipr, netlink.ifindex(ipr, name))
                        ifaces[name] = {"mode": st.mode, "prog_id": st.prog_id}
            except Exception as e:
                log.warning("interface status: %s", e)
            return {
                "program_id": info.id,
                "program_tag": bytes(info.tag).hex(),
                "pin_dir": str(self.prog.pin_dir),
                "interfaces": ifaces,
                "maglev_m": self.cfg.maglev_m,
                "maps": {
                    "services": {"used": len(self._svc_ids), "max": self.cfg.max_services},
                    "backends": {"used": len(self._backends), "max": self.cfg.max_backends - 1},
                    "flows": {"max": self.cfg.flow_table_size},
                },
            }

    def close(self) -> None:
        with self._lock:
            if self.prog is not None:
                self.prog.bpf.cleanup()
                self.prog = None
                self.t = None


def _hostport(addr: str, port: int) -> str:
    a = ipaddress.ip_address(addr)
    return f"[{a.compressed}]:{port}" if a.version == 6 else f"{a.compressed}:{port}"


def _ntohs(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


__all__ = ["Datapath", "DatapathStats", "hash_seed"]
