"""The datapath's books: which service id and which backend slot (with its
generation) every service and backend holds in the maps, what each service
entry points at, and the indexes the reconcile and the next-hop upkeep look
them up by. Rebuilt from the pinned maps on start, so a restarted daemon keeps
the flow table's (backend id, generation) pairs valid and connections survive.
"""

from __future__ import annotations

import logging
import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from l4lb.addrtext import exploded_rows
from l4lb.datapath.tables import Tables

log = logging.getLogger(__name__)

ServiceKey = tuple[str, int, str]          # (vip exploded, port, "tcp"/"udp")
BackendKey = tuple[str, int]               # (address exploded, port)
PROTO = {"tcp": 6, "udp": 17}
PROTO_NAME = {6: "tcp", 17: "udp"}
Labels = tuple[list[tuple[ServiceKey, int]], list[tuple[int, "BackendSlot"]]]


@dataclass(slots=True)
class BackendSlot:
    svc_id: int
    ident: BackendKey
    gen: int
    flags: int


class ServiceEntry(NamedTuple):
    """What a service entry in the map holds besides its id (maps.h svc_info)."""

    flags: int
    ring: int
    gen: int = 0              # of its source ranges (srcranges.py)
    affinity_prefix: int = 0


class Slots:
    def __init__(self) -> None:
        self.svc_ids: dict[ServiceKey, int] = {}
        self._svc_keys: dict[int, ServiceKey] = {}  # svc_ids the other way round
        # What each service entry in the map holds, and the buffer each
        # service id's table is in force in (the entry's ring).
        self.svc_entry: dict[ServiceKey, ServiceEntry] = {}
        self.ring: dict[int, int] = {}
        self.backends: dict[int, BackendSlot] = {}
        self.next_gen = 1
        # Slots freed by the last changes: re-adding the same service/backend
        # (an undo, a rollback) gets the same id and generation back, so flow
        # entries pinned to it stay valid and the maps end up byte-identical.
        self.freed_svc: dict[ServiceKey, int] = {}
        self.freed_be: dict[tuple[ServiceKey, BackendKey], tuple[int, int]] = {}
        # backends by owner (svc id -> identity -> slot) and by address text.
        self.by_svc: dict[int, dict[BackendKey, int]] = {}
        self.by_addr: dict[str, set[int]] = {}  # backend address (exploded) -> its slots
        self.nh_dirty: set[int] = set()  # slots changed since the last next-hop refresh (see set())
        self._labels: Labels | None = None

    # --- changes ------------------------------------------------------------------
    def set(self, bid: int, sid: int, ident: BackendKey, gen: int, flags: int) -> BackendSlot:
        slot = BackendSlot(sid, ident, gen, flags)
        old = self.backends.get(bid)
        if old is not None and (old.svc_id, old.ident) != (sid, ident):
            self.drop(bid)
        self.backends[bid] = slot
        self._labels = None
        self.by_svc.setdefault(sid, {})[ident] = bid
        self.by_addr.setdefault(ident[0], set()).add(bid)
        self.nh_dirty.add(bid)
        return slot

    def drop(self, bid: int) -> BackendSlot:
        slot = self.backends.pop(bid)
        self._labels = None
        mine = self.by_svc[slot.svc_id]
        del mine[slot.ident]
        if not mine:
            del self.by_svc[slot.svc_id]
        same = self.by_addr[slot.ident[0]]
        same.discard(bid)
        if not same:
            del self.by_addr[slot.ident[0]]
        self.nh_dirty.add(bid)
        return slot

    def set_service(self, key: ServiceKey, sid: int) -> None:
        old = self.svc_ids.get(key)
        if old is not None and self._svc_keys.get(old) == key:
            del self._svc_keys[old]
        self.svc_ids[key] = sid
        self._svc_keys[sid] = key
        self._labels = None

    def drop_service(self, key: ServiceKey) -> int:
        sid = self.svc_ids.pop(key)
        if self._svc_keys.get(sid) == key:
            del self._svc_keys[sid]
        self._labels = None
        return sid

    def key_of(self, sid: int) -> ServiceKey | None:
        """The key of the service that holds id ``sid`` (None: none does)."""
        return self._svc_keys.get(sid)

    def reindex(self) -> None:
        self.by_svc = {}
        self.by_addr = {}
        for bid, slot in self.backends.items():
            self.by_svc.setdefault(slot.svc_id, {})[slot.ident] = bid
            self.by_addr.setdefault(slot.ident[0], set()).add(bid)

    # --- reads ------------------------------------------------------------------------
    def labels(self) -> Labels:
        """(service key, id) and (slot, backend) pairs for stats, snapshotted once per change of ids."""
        if self._labels is None:
            self._labels = (list(self.svc_ids.items()), list(self.backends.items()))
        return self._labels

    def flow_labels(self) -> Labels:
        """labels() with each backend slot's gen as flow entries hold it: plus its
        service's source-range gen (bpf_src/lib/lookup.h), for reading the flow table."""
        svc_ids, slots = self.labels()
        extra = {sid: self.svc_entry[key].gen for key, sid in svc_ids if key in self.svc_entry}
        if not any(extra.values()):
            return svc_ids, slots
        return svc_ids, [(bid, dataclasses.replace(s, gen=(s.gen + extra.get(s.svc_id, 0)) & 0xFFFFFFFF))
                         for bid, s in slots]

    def backend_id(self, service: ServiceKey, ident: BackendKey) -> int | None:
        sid = self.svc_ids.get(service)
        return None if sid is None else self.by_svc.get(sid, {}).get(ident)

    # --- restart ----------------------------------------------------------------------
    def recover(self, t: Tables) -> None:
        """Rebuild id allocation from pinned maps (a restart keeps flows valid)."""
        self.svc_ids.clear()
        self._svc_keys.clear()
        self._labels = None
        self.svc_entry.clear()
        self.ring.clear()
        for (vip, port, proto), (sid, flags, ring, gen, affinity) in t.read_services().items():
            key = (vip, port, PROTO_NAME.get(proto, str(proto)))
            self.svc_ids[key] = sid
            self._svc_keys[sid] = key
            self.svc_entry[key] = ServiceEntry(flags, ring, gen, affinity)
            self.ring[sid] = ring
        self.backends.clear()
        bids, rows = t.backend_rows()
        # Column by column (100,000 slots at 1,000 x 100): address texts formatted by
        # numpy, ports swapped from network order, then one pass that builds the slots.
        addrs = exploded_rows(rows["addr"].view(np.uint8).reshape(len(bids), 16), rows["family"] == 4)
        ports = rows["port"].byteswap().tolist()
        backends = self.backends
        for bid, addr, port, svc_id, gen, flags in zip(bids.tolist(), addrs, ports, rows["svc_id"].tolist(),
                                                       rows["gen"].tolist(), rows["flags"].tolist()):
            backends[bid] = BackendSlot(svc_id, (addr, port), gen, flags)
        if len(bids):
            self.next_gen = max(self.next_gen, int(rows["gen"].max()) + 1)
        self.reindex()
