"""The ``vips`` map (bpf_src/lib/maps.h ``struct vip_key`` / ``vip_info``):
one entry per VIP of the applied services, for what is addressed to a VIP
rather than to a service: echo requests (answered when a service on the VIP
has ``answer_ping``) and later fragments whose first was not seen (dropped
for a VIP, left to the kernel for any other address)."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from l4lb.datapath.flags import bit
from l4lb.datapath.tables import addr_words
from l4lb.inplace import replaced_at
from l4lb.models import Service

VIP_F_PING = bit("VIP_F_PING")

VipKey = IPv4Address | IPv6Address


class Vips:
    """Keeps the map equal to the VIPs of a service set, writing only differences.

    It runs on every apply, a drain's too, so it works from what changed:
    services passed again as the same objects are known unchanged by identity
    (as engine.py does), and per VIP it keeps how many services it has and
    how many of them answer pings. A drain at 1,000 services looks at the
    service it replaced alone (l4lb/inplace.py), not at the 1,000."""

    def __init__(self) -> None:
        self._written: dict[VipKey, int] | None = None  # None: read the map first
        self._objs: dict[int, tuple[Service, VipKey, bool]] = {}
        self._counts: dict[VipKey, list[int]] = {}       # VIP -> [services, answering pings]
        self._last: Sequence[Service] = ()                # the list _objs was made from

    def sync(self, table: Any, services: Sequence[Service]) -> None:
        touched: set[VipKey] = set()
        if self._written is None:  # first, or after a failed write: start from the map itself
            self._written = {self._unkey(k): v.flags for k, v in table.items()}
            self._objs, self._counts = {}, {}
            touched.update(self._written)
        old, new = self._objs, {}
        at = replaced_at(self._last, services) if self._objs else None
        if at is not None:  # a few services replaced (a drain): those alone
            new = dict(old)
            for i in at:
                gone, s = new.pop(id(self._last[i])), services[i]
                new[id(s)] = o = (s, s.vip, s.options.answer_ping)
                self._count(gone, -1)
                self._count(o, 1)
                touched.update((gone[1], o[1]))
        else:
            for s in services:
                o = old.get(id(s))
                if o is None or o[0] is not s:
                    o = (s, s.vip, s.options.answer_ping)
                    self._count(o, 1)
                    touched.add(o[1])
                new[id(s)] = o
            for i, o in old.items():
                if new.get(i) is not o:
                    self._count(o, -1)
                    touched.add(o[1])
        self._objs, self._last = new, list(services)
        want = {v: self._flags(v) for v in touched}
        if all(self._written.get(v) == f for v, f in want.items()):
            return
        have, self._written = self._written, None  # unknown until every write went through
        for vip, flags in want.items():
            if flags is None:
                if vip in have:
                    del table[self._key(table, vip)]
                    del have[vip]
            elif have.get(vip) != flags:
                v = table.Leaf()
                v.flags = flags
                table[self._key(table, vip)] = v
                have[vip] = flags
        self._written = have

    def _count(self, o: tuple[Service, VipKey, bool], n: int) -> None:
        c = self._counts.setdefault(o[1], [0, 0])
        c[0] += n
        c[1] += n if o[2] else 0

    def _flags(self, vip: VipKey) -> int | None:
        c = self._counts.get(vip)
        if not c or not c[0]:
            self._counts.pop(vip, None)
            return None
        return VIP_F_PING if c[1] else 0

    @staticmethod
    def _key(table: Any, vip: VipKey) -> Any:
        key = table.Key()
        key.family = vip.version
        key.addr[:] = addr_words(vip)
        return key

    @staticmethod
    def _unkey(key: Any) -> VipKey:
        raw = b"".join(int(w).to_bytes(4, "little") for w in key.addr)
        return ip_address(raw[:4] if key.family == 4 else raw)
