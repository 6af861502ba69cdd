"""A digest of what this box forwards, comparable across the boxes of a tier.

Boxes behind one ECMP group must hold bit-identical Maglev tables, or a flow
that ECMP moves to another box lands on another backend. Backend ids are
local slot numbers (they differ per box with its history), so a table is
hashed in backend *identities*: the table in force is read back from the
datapath (what packets see, not what we meant to write), each slot replaced
by its backend's position in the service's identity-sorted backend list.

The seed is never shown: only a keyed hash of it. Revisions are shown but not
part of the digest (each box counts its own writes).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Protocol

import numpy as np

from l4lb.models import Service
from l4lb.view import View


class TableSource(Protocol):
    def service_id(self, service: tuple[str, int, str]) -> int | None: ...
    def backend_id(self, service: tuple[str, int, str], ident: tuple[str, int]) -> int | None: ...
    def maglev_table(self, sid: int) -> np.ndarray | None: ...


def seed_hash(seed: bytes, m: int) -> str:
    return hashlib.blake2b(seed + m.to_bytes(4, "little"), digest_size=8, person=b"l4lb-seed-dig").hexdigest()


def table_hash(svc: Service, dp: TableSource) -> str:
    """Hash of the table in force for ``svc`` in backend identities ("missing" if it has none)."""
    sid = dp.service_id(svc.key)
    table = None if sid is None else dp.maglev_table(sid)
    if table is None:
        return "missing"
    idents = sorted(b.identity(svc.port) for b in svc.backends)
    bids = [dp.backend_id(svc.key, i) for i in idents]
    lut = np.zeros(max([b or 0 for b in bids] + [int(table.max(initial=0))]) + 1, dtype=np.uint32)
    for pos, bid in enumerate(bids, start=1):
        if bid is not None:
            lut[bid] = pos  # 0: a slot that is no backend of this service (or "no backend")
    h = hashlib.blake2b(digest_size=16, person=b"l4lb-table-dig")
    # Source ranges decide who reaches the table: part of it. Fields added later
    # count only when set, so a service that does not use them hashes as on a box
    # of the version before (a tier mid-upgrade still compares equal).
    ranges = tuple(str(n) for n in svc.source_ranges)
    options = svc.options.model_dump_json(exclude_none=True)
    h.update(repr((svc.key, options, idents, *((ranges,) if ranges else ()))).encode())
    h.update(lut[table.astype(np.int64)].astype("<u4").tobytes())
    return h.hexdigest()


class Digester:
    """Digest of the tables in force, recomputed after each change the control core publishes."""

    def __init__(self, dp: TableSource, seed: bytes, m: int) -> None:
        self._dp = dp
        self._seed = seed_hash(seed, m)
        self._lock = threading.Lock()
        self._view: View | None = None
        self._cached: tuple[View, dict[str, Any]] | None = None

    def on_view(self, view: View) -> None:
        self._view = view  # a subscriber only records; the digest is computed when asked

    def set_seed(self, seed: bytes, m: int) -> None:
        self._seed = seed_hash(seed, m)
        self._cached = None

    def digest(self) -> dict[str, Any]:
        view = self._view
        if view is None:
            return {"revision": None, "seed": self._seed, "services": {}, "digest": None}
        with self._lock:
            if self._cached is not None and self._cached[0] is view:
                return self._cached[1]
            services = {s.name: table_hash(s, self._dp) for s in view.effective}
            h = hashlib.blake2b(digest_size=16, person=b"l4lb-fleet-dig")
            h.update(self._seed.encode())
            for name in sorted(services):
                h.update(f"\0{name}\0{services[name]}".encode())
            out = {"revision": view.revision, "seed": self._seed, "services": services, "digest": h.hexdigest()}
            self._cached = (view, out)
            return out
