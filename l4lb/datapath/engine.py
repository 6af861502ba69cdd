"""Datapath: the one object the daemon drives. A thin facade over the parts:

* loader.py      compile the program, pin and reuse its maps;
* slots.py       which id and slot every service and backend holds;
* reconcile.py   desired services -> map writes, in a packet-safe order;
* maglevbuild.py Maglev tables (prefetched, cached, built by workers);
* rings.py       the buffers tables are written into and swapped by;
* upkeep.py      neighbour entries and the next-hop cache;
* attach.py      attach / atomic replace / detach;
* stats.py       counters.

Every change runs under the one lock in the shared Context.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from l4lb.datapath import attach as attaching
from l4lb.datapath.config import DatapathConfig, DatapathError, seed_digest
from l4lb.datapath.context import Context
from l4lb.datapath.libbpf import prog_info
from l4lb.datapath.loader import (Program, adopt_program, compile_program, layout_cflags, pin_program,
                                  remove_stale_pins)
from l4lb.datapath.maglevbuild import TableBuilder
from l4lb.datapath.pinned import Record
from l4lb.datapath.reconcile import ApplyTimings, Reconciler
from l4lb.datapath.rings import Rings
from l4lb.datapath.slots import BackendKey, Labels, ServiceKey, Slots
from l4lb.datapath.stats import DatapathStats, read_counters
from l4lb.datapath.survey import converged_record
from l4lb.datapath.tables import Tables
from l4lb.datapath.upkeep import Upkeep
from l4lb.datapath.vips import Vips
from l4lb.models import Service

log = logging.getLogger(__name__)


def hash_seed(seed: bytes) -> int:
    """32-bit flow-hash seed derived from the Maglev seed: same config, same
    hashing on every box."""
    return int.from_bytes(hashlib.blake2b(seed, digest_size=4, person=b"l4lb-flow").digest(), "little")


class Datapath:
    def __init__(self, cfg: DatapathConfig) -> None:
        self._ctx = ctx = Context(cfg)
        self._lock = ctx.lock
        self.prog: Program | None = None
        self._slots = Slots()
        self._rings = Rings(cfg.maglev_m, 2 * cfg.max_services)  # maps.h: maglev_outer
        self._builder = TableBuilder(ctx)
        self._rec = Reconciler(ctx, self._slots, self._rings, self._builder)
        self._upkeep = Upkeep(ctx, self._slots)
        self._vips = Vips()
        self._applied: list[Service] = []
        self.last_timings = ApplyTimings()          # of the last successful apply()
        self._attached: dict[str, str] = {}
        self._converged: Record | None = None
        self._clean: bool | None = None  # what the converged record says (None: not read yet)
        self._rec.before_write = self._mark_changing
        self._from_pins = False  # see load()

    # --- shared state -------------------------------------------------------------
    @property
    def cfg(self) -> DatapathConfig:
        return self._ctx.cfg

    @cfg.setter
    def cfg(self, cfg: DatapathConfig) -> None:
        self._ctx.cfg = cfg

    @property
    def t(self) -> Tables | None:
        return self._ctx.t

    @t.setter
    def t(self, t: Tables | None) -> None:
        self._ctx.t = t

    @property
    def tables(self) -> Tables:
        return self._ctx.tables

    @property
    def prog_fd(self) -> int:
        assert self.prog is not None, "load() first"
        return self.prog.fd

    @property
    def fail_after_writes(self) -> int | None:
        """Test hook: fail the reconcile after this many map writes."""
        return self._rec.fail_after_writes

    @fail_after_writes.setter
    def fail_after_writes(self, n: int | None) -> None:
        self._rec.fail_after_writes = n

    # --- load -----------------------------------------------------------------
    def load(self, *, adopt: bool = False) -> None:
        """Compile the program (against the pinned maps); with ``adopt`` (the
        daemon's way), take the pinned program and maps over without compiling
        when the pinned program was built from the same source and flags
        (loader.py), and once a compiled one is attached and pinned, work from
        the pins and let BCC go (tests and benches keep BCC's objects)."""
        self._from_pins = adopt
        with self._lock:
            prog = adopt_program(self.cfg) if adopt else None
            self.prog = prog if prog is not None else compile_program(self.cfg)
            self.t = Tables(self.prog.bpf)
            self._rings.pin_dir = self.prog.pin_dir / "maglev"
            self._write_config()
            self._recover()

    def update_runtime(self, cfg: DatapathConfig) -> None:
        """Apply run-time knobs (outer source prefixes, ICMP rate, seed) without
        recompiling; layout changes need a new load()."""
        if layout_cflags(cfg) != layout_cflags(self.cfg):
            raise DatapathError("map layout changed (M, limits): a restart with a new program is needed")
        with self._lock:
            seed_changed = cfg.maglev_seed != self.cfg.maglev_seed
            self.cfg = cfg
            self._write_config()
            if seed_changed:
                self._rec.forget()
                self._rings.forget_contents()
                self._rec.reconcile(list(self._applied))

    def _write_config(self) -> None:
        self.tables.write_config(self.cfg, hash_seed(self.cfg.maglev_seed))

    def _recover(self) -> None:
        """Rebuild id allocation from pinned maps (a restart keeps flows valid)."""
        t = self.tables
        assert self.prog is not None
        self._slots.recover(t)
        self._rings.recover(t.maglev_outer.map_fd, list(self._slots.ring.values()))
        self._upkeep.recover()
        self._rec.forget()
        self._converged, self._clean = converged_record(self.prog.pin_dir), None
        if self._slots.svc_ids:
            log.info("recovered %d services and %d backends from pinned maps",
                     len(self._slots.svc_ids), len(self._slots.backends))

    # --- what the maps were converged to (l4lb/lifecycle/guard.py) ----------------------
    def converged(self) -> dict[str, Any] | None:
        """The converged record of the loaded maps: {store_id, revision, clean, seed}."""
        assert self._converged is not None, "load() first"
        return self._converged.read()

    def mark_converged(self, store_id: str, revision: int, exact: bool = True) -> None:
        """The maps hold revision ``revision`` of store ``store_id`` (a commit, a
        converge); ``exact``: its very services, no run-time overlay (health)."""
        with self._lock:
            assert self._converged is not None, "load() first"
            self._converged.write({"store_id": store_id, "revision": revision, "clean": exact,
                                   "seed": seed_digest(self.cfg.maglev_seed)})
            self._clean = exact

    def _mark_changing(self) -> None:
        """Before a reconcile's first write: the maps no longer hold the revision
        the record names (until mark_converged), so a restart must not trust them."""
        if self._converged is None or self._clean is False:
            return
        record = self._converged.read()
        if record is not None and record.get("clean"):
            self._converged.write({**record, "clean": False})
        self._clean = False

    def adopt_in_force(self, services: Sequence[Service]) -> int:
        """Take the tables in force as those of ``services`` without building
        them, for every service whose entry and slots are exactly its own. Only
        for maps converged to this very state (the converged record says so):
        a restart then writes nothing and builds nothing. Returns how many."""
        with self._lock:
            return sum(self._rec.adopt(s.key, s) for s in services)

    def in_force(self) -> list[dict[str, Any]]:
        """What the maps hold, per service (Reconciler.in_force), for
        rebuilding a desired state from the maps (l4lb/lifecycle/adopt.py)."""
        with self._lock:
            return [self._rec.in_force(key, sid) for key, sid in sorted(self._slots.svc_ids.items())]

    # --- reconcile --------------------------------------------------------------
    def apply(self, services: Sequence[Service], *, settle: bool = True) -> None:
        """Make the maps hold exactly `services`. All or nothing: on failure
        the previous set is written back before the error is raised.
        ``settle=False`` leaves the neighbour entries and next-hop cache of new
        backends to a later settle() (see there)."""
        t0, rec = time.perf_counter(), self._rec
        services = list(services)  # ours: kept as the list in force (never changed in place)
        with self._lock:
            previous = self._applied
            rec.timing = timing = ApplyTimings()
            rec.new_addrs = set()
            try:
                rec.check_capacity(services)
                rec.reconcile(services)
                self._vips.sync(self.tables.vips, services)
            except Exception as e:
                rec.fail_after_writes = None
                try:
                    rec.reconcile(previous)
                    self._vips.sync(self.tables.vips, previous)
                except Exception:  # pragma: no cover - logged, the original error matters
                    log.exception("rollback to the previous service set failed")
                if isinstance(e, DatapathError):
                    raise
                raise DatapathError(f"datapath update failed: {e}") from e
            self._applied = services  # also keeps the objects, so their ids stay theirs
            rec.clean = services
            self._upkeep.unsettled |= rec.new_addrs
            rec.new_addrs = set()
        self._rings.grace_soon()  # so the buffers retired now are writable by the next change
        timing.total = time.perf_counter() - t0
        self.last_timings = timing
        if settle:
            self.settle()

    def settle(self, pause: Callable[[], None] | None = None) -> None:
        """Neighbour entries and next-hop cache entries for what applies added
        (upkeep.py). Packets do not depend on it, so the daemon runs it right
        after answering, and a 100,000-backend PUT does not wait for it."""
        self._upkeep.settle(self.last_timings, pause)

    def prefetch(self, services: Sequence[Service]) -> None:
        """Start building the Maglev tables that applying ``services`` will need
        while the caller diffs and stages the change (maglevbuild.py)."""
        with self._lock:
            done, keys = dict(self._rec.done), self._rec._keys
        self._builder.prefetch(services, done, keys)

    # --- attach -------------------------------------------------------------------
    def attach(self, interfaces: Sequence[str], mode: str = "auto") -> dict[str, str]:
        with self._lock:
            assert self.prog is not None
            result, fresh = attaching.attach(self.tables, self.prog, interfaces, mode)
            self._attached.update(result)
            if not self.prog.adopted:  # an adopted program is the pinned one already
                pin_program(self.prog)
            remove_stale_pins(self.cfg, self.prog.pin_dir)
            self._shed_compiler()
        if fresh:
            self.refresh_nexthops()
        # else: an adopted program attached already (a restart) keeps the next hops it
        # had (recovered from the map); the periodic refresh follows changes since.
        return result

    def _shed_compiler(self) -> None:
        """A program BCC compiled keeps its LLVM module (~85 MB here) as long as
        the bcc.BPF lives. Once pinned, take the same program and maps over by
        path, as a restart would, and let BCC go (bench switches in extra_cflags keep it)."""
        assert self.prog is not None
        if not self._from_pins or self.prog.adopted or self.cfg.extra_cflags:
            return
        pinned = adopt_program(self.cfg)
        if pinned is None or pinned.digest != self.prog.digest:
            return
        old, self.prog, self.t = self.prog, pinned, Tables(pinned.bpf)
        old.bpf.cleanup()

    def detach(self, interfaces: Sequence[str]) -> None:
        with self._lock:
            for name in interfaces:
                attaching.detach([name])
                self._attached.pop(name, None)

    def refresh_nexthops(self, full: bool = True, pause: Callable[[], None] | None = None) -> int:
        """Resolve backends' next hops from the kernel into the ``nexthops`` map (upkeep.py)."""
        return self._upkeep.refresh_nexthops(full, pause)

    def id_names(self) -> tuple[dict[int, str], dict[int, str]]:
        """(service id -> "vip:port/proto", backend id -> "addr:port"), for capture comments."""
        with self._lock:
            svcs = {sid: f"{_hostport(vip, port)}/{proto}" for (vip, port, proto), sid in self._slots.svc_ids.items()}
            bes = {bid: _hostport(*slot.ident) for bid, slot in self._slots.backends.items()}
            return svcs, bes

    # --- read side ---------------------------------------------------------------------
    def stats(self) -> DatapathStats:
        # Under the lock only the labels (snapshotted once per change of ids, not
        # per read). The counters are read after it: at 100,000 backends that is
        # ~3 MB and 10-20 ms that a drain must not wait for. A slot reused in
        # between reads as a counter reset, which rates already treat as "no rate".
        with self._lock:
            t = self.tables
            labels = self._slots.labels()
            assert self.prog is not None
            reasons = list(self.prog.reasons)
        try:
            arrays = read_counters(t)
        except OSError:  # the program (and these fds) replaced meanwhile: read under the lock
            with self._lock:
                arrays = read_counters(self.tables)
        return DatapathStats(time.time(), *arrays, labels, reasons)

    def backend_id(self, service: ServiceKey, ident: BackendKey) -> int | None:
        return self._slots.backend_id(service, ident)

    def service_id(self, service: ServiceKey) -> int | None:
        return self._slots.svc_ids.get(service)

    def flow_source(self) -> tuple[Any, Labels]:
        """The flow map and the slot labels in force, for flowscan.FlowWatch."""
        with self._lock:
            return self.tables.flows, self._slots.flow_labels()  # gens as flow entries hold them

    def status(self) -> dict[str, Any]:
        with self._lock:
            assert self.prog is not None
            info = prog_info(self.prog.fd)
            return {
                "program_id": info.id,
                "program_tag": bytes(info.tag).hex(),
                "pin_dir": str(self.prog.pin_dir),
                "interfaces": attaching.interface_status(self._attached),
                "maglev_m": self.cfg.maglev_m,
                "maps": {
                    "services": {"used": len(self._slots.svc_ids), "max": self.cfg.max_services},
                    "backends": {"used": len(self._slots.backends), "max": self.cfg.max_backends - 1},
                    "flows": {"max": self.cfg.flow_table_size},
                    "source_ranges": {"used": self._rec.ranges.count(), "max": self.tables.src_ranges.max_entries},
                },
            }

    def maglev_table(self, sid: int) -> np.ndarray | None:
        """The table in force for service id ``sid`` (backend ids), as packets see it."""
        with self._lock:
            ring = self._slots.ring.get(sid)
            return None if ring is None else self._rings.read(ring)

    def close(self) -> None:
        with self._lock:
            self._rings.close()
            if self.prog is not None:
                self.prog.bpf.cleanup()
                self.prog = None
                self.t = None


def _hostport(addr: str, port: int) -> str:
    a = ipaddress.ip_address(addr)
    return f"[{a.compressed}]:{port}" if a.version == 6 else f"{a.compressed}:{port}"


__all__ = ["Datapath", "DatapathStats", "hash_seed"]
