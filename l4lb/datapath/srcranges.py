"""Services' source ranges in the datapath's LPM trie (bpf_src/lib/srcrange.h):
one entry per (service id, range), written through BCC's ctypes of
``struct src_range_key``.

Order, for packets in flight (the reconcile calls these around a service
entry write): a service's new ranges are added and its removed ones deleted
*before* its entry gets the new gen, so no flow is created with the new gen
from a source the new ranges refuse; the entry's gen change then has every
existing flow checked again. A removed service's ranges go after its entry.
The books are read back from the map after a restart (``forget``), so
entries left by a crash are deleted rather than inherited by a reused id.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress

from l4lb.datapath import libbpf
from l4lb.datapath.config import DatapathError
from l4lb.datapath.context import Context
from l4lb.datapath.tables import addr_words
from l4lb.models import IPNetwork

Range = tuple[tuple[int, ...], int]  # (address words, prefix length): the trie key less the id
ID_BITS = 32                         # src_range_key.svc_id, counted in prefixlen


def range_of(net: IPNetwork) -> Range:
    return tuple(addr_words(net.network_address)), net.prefixlen


class SourceRanges:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._have: dict[int, set[Range]] | None = None

    def forget(self) -> None:
        """The map is the truth again (a restart, a new program)."""
        self._have = None

    def _books(self) -> dict[int, set[Range]]:
        if self._have is None:
            have: dict[int, set[Range]] = {}
            for k in self.ctx.tables.src_ranges.keys():
                have.setdefault(k.svc_id, set()).add((tuple(k.addr), k.prefixlen - ID_BITS))
            self._have = have
        return self._have

    def count(self) -> int:
        return sum(map(len, self._books().values()))

    def of(self, sid: int) -> set[Range]:
        return set(self._books().get(sid, ()))

    def networks(self, sid: int, family: int) -> list[IPNetwork]:
        """The ranges the map holds for ``sid`` as networks (for adopting a datapath)."""
        out: list[IPNetwork] = []
        for words, plen in sorted(self.of(sid), key=lambda r: (r[0], r[1])):
            raw = b"".join(w.to_bytes(4, "little") for w in words)
            out.append(ipaddress.ip_network((raw[:4] if family == 4 else raw, plen)))
        return sorted(out, key=lambda n: (n.network_address, n.prefixlen))

    def _key(self, sid: int, r: Range) -> ct.Structure:
        k = self.ctx.tables.src_ranges.Key()
        k.prefixlen = ID_BITS + r[1]
        k.svc_id = sid
        k.addr[:] = list(r[0])
        return k

    def sync(self, sid: int, nets: list[IPNetwork]) -> int:
        """Make the trie hold exactly ``nets`` for ``sid``: additions first,
        then deletions. Returns the number of map writes."""
        books = self._books()
        have = books.setdefault(sid, set())
        want = {range_of(n) for n in nets}
        t = self.ctx.tables.src_ranges
        one = ct.c_uint32(1)
        add = sorted(want - have)
        for r in add:
            try:
                libbpf.map_update(t.map_fd, self._key(sid, r), one)
            except OSError as e:
                raise DatapathError(f"source range table: {e} (datapath holds {sum(map(len, books.values()))} "
                                    "ranges)") from e
            have.add(r)
        gone = sorted(have - want)
        for r in gone:
            libbpf.map_delete(t.map_fd, self._key(sid, r))
            have.discard(r)
        if not have:
            del books[sid]
        return len(add) + len(gone)

    def drop(self, sid: int) -> None:
        if sid in self._books():
            self.sync(sid, [])

    def prune(self, live: set[int]) -> None:
        """Ranges of ids no service holds (left by a crash half-way)."""
        for sid in [s for s in self._books() if s not in live]:
            self.sync(sid, [])
