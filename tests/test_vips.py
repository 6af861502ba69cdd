"""The `vips` map's upkeep (l4lb/datapath/vips.py), pure: on a dict standing in
for the BPF hash, against a rebuild from scratch after every change."""

from __future__ import annotations

import ipaddress
import random

import pytest

from l4lb.datapath.vips import VIP_F_PING, Vips
from l4lb.models import Service


class FakeTable:
    """The BCC hash API Vips uses: Key/Leaf, items, set, delete."""

    class Key:
        def __init__(self) -> None:
            self.family = 0
            self.addr = [0, 0, 0, 0]

    class Leaf:
        flags = 0

    def __init__(self, fail_after: int | None = None) -> None:
        self.d: dict[tuple[int, tuple[int, ...]], int] = {}
        self.fail_after = fail_after

    def _tick(self) -> None:
        if self.fail_after is not None:
            if self.fail_after == 0:
                raise OSError("injected")
            self.fail_after -= 1

    def items(self):
        for (fam, addr), flags in self.d.items():
            k = self.Key()
            k.family, k.addr = fam, list(addr)
            v = self.Leaf()
            v.flags = flags
            yield k, v

    def __setitem__(self, k, v) -> None:
        self._tick()
        self.d[(k.family, tuple(k.addr))] = v.flags

    def __delitem__(self, k) -> None:
        self._tick()
        del self.d[(k.family, tuple(k.addr))]

    def vips(self) -> dict[str, int]:
        out = {}
        for (fam, addr), flags in self.d.items():
            raw = b"".join(w.to_bytes(4, "little") for w in addr)
            out[str(ipaddress.ip_address(raw[:4] if fam == 4 else raw))] = flags
        return out


def expected(services: list[Service]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in services:
        out[str(s.vip)] = out.get(str(s.vip), 0) | (VIP_F_PING if s.options.answer_ping else 0)
    return out


def svc(i: int, vip: str, port: int, ping: bool = True) -> Service:
    return Service(name=f"s{i}", vip=vip, port=port, options={"answer_ping": ping})


def test_random_changes_keep_the_map_equal_to_the_services() -> None:
    rng = random.Random(7)
    vips = ["198.51.100.1", "198.51.100.2", "2001:db8::1", "2001:db8::2", "203.0.113.9"]
    table, v = FakeTable(), Vips()
    current: list[Service] = []
    n = 0
    for _ in range(300):
        op = rng.randrange(3)
        if op == 0 or not current:
            n += 1
            current = current + [svc(n, rng.choice(vips), 1000 + n, rng.random() < 0.5)]
        elif op == 1:
            current = [s for j, s in enumerate(current) if j != rng.randrange(len(current))]
        else:   # a new object for one service: a drain, or its ping switched
            j = rng.randrange(len(current))
            s = current[j]
            current = current[:j] + [svc(n + 1000, str(s.vip), s.port, rng.random() < 0.5)] + current[j + 1:]
        v.sync(table, current)
        assert table.vips() == expected(current)


def test_starts_from_what_the_map_holds_and_recovers_from_a_failed_write() -> None:
    table = FakeTable()
    stale = [svc(1, "198.51.100.9", 80)]
    Vips().sync(table, stale)                       # a previous daemon's entries
    services = [svc(2, "198.51.100.1", 80, ping=False), svc(3, "198.51.100.1", 81)]
    v = Vips()
    v.sync(table, services)
    assert table.vips() == {"198.51.100.1": VIP_F_PING}
    table.fail_after = 0
    with pytest.raises(OSError):
        v.sync(table, [svc(4, "2001:db8::1", 80)])
    table.fail_after = None
    v.sync(table, [svc(4, "2001:db8::1", 80)])
    assert table.vips() == {"2001:db8::1": VIP_F_PING}
