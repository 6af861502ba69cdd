"""The ``vips`` map (bpf_src/lib/maps.h ``struct vip_key`` / ``vip_info``):
one entry per VIP of the applied services, for what is addressed to a VIP
rather than to a service: echo requests (answered when a service on the VIP
has ``answer_ping``) and later fragments whose first was not seen (dropped
for a VIP, left to the kernel for any other address)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from l4lb.datapath.flags import bit
from l4lb.models import Service

VIP_F_PING = bit("VIP_F_PING")

VipKey = tuple[int, bytes]  # (family, packed address)


def wanted(services: Sequence[Service]) -> dict[VipKey, int]:
    """VIP -> flags: a VIP answers pings if any of its services asks for it."""
    out: dict[VipKey, int] = {}
    for s in services:
        k = (s.vip.version, s.vip.packed)
        out[k] = out.get(k, 0) | (VIP_F_PING if s.options.answer_ping else 0)
    return out


class Vips:
    """Keeps the map equal to the VIPs of a service set, writing only differences."""

    def __init__(self) -> None:
        self._written: dict[VipKey, int] | None = None  # None: read the map first

    def sync(self, table: Any, services: Sequence[Service]) -> None:
        want = wanted(services)
        if self._written is None:
            self._written = {self._unkey(k): v.flags for k, v in table.items()}
        if want == self._written:
            return
        have, self._written = self._written, None  # unknown until every write went through
        for k in have.keys() - want.keys():
            del table[self._key(table, k)]
        for k, flags in want.items():
            if have.get(k) != flags:
                v = table.Leaf()
                v.flags = flags
                table[self._key(table, k)] = v
        self._written = want

    @staticmethod
    def _key(table: Any, k: VipKey) -> Any:
        key = table.Key()
        key.family = k[0]
        raw = k[1].ljust(16, b"\0")
        key.addr[:] = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]
        return key

    @staticmethod
    def _unkey(key: Any) -> VipKey:
        raw = b"".join(int(w).to_bytes(4, "little") for w in key.addr)
        return (key.family, raw[:4] if key.family == 4 else raw)
