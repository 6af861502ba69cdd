"""What the pins under a bpffs directory hold, read before anything is loaded
or written: how many services each pinned map set carries and which store
revision it was last converged to (the ``converged`` record, pinned.py).
Nothing here needs the program's types or changes a map."""

from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l4lb.datapath import libbpf
from l4lb.datapath.pinned import Record

CONVERGED = "converged"
CONVERGED_SIZE = 512


@dataclass(frozen=True)
class PinSet:
    path: Path                        # <bpffs>/maps-<layout digest>
    services: int                     # entries in its services map
    converged: dict[str, Any] | None  # its converged record, if any


def count_entries(path: Path) -> int:
    """Entries of a pinned hash map, walked by key (no types needed)."""
    fd = libbpf.obj_get(str(path))
    try:
        size = libbpf.map_info(fd).key_size
        prev, n = None, 0
        while True:
            nxt = (ct.c_ubyte * size)()
            if not libbpf.map_next_key(fd, prev, nxt):
                return n
            n += 1
            prev = nxt
    finally:
        os.close(fd)


def survey(bpffs: Path) -> list[PinSet]:
    """Every pinned map set under ``bpffs``, most services first."""
    out = []
    for d in sorted(bpffs.glob("maps-*")):
        services = d / "services"
        n = count_entries(services) if services.exists() else 0
        out.append(PinSet(d, n, converged_record(d).read()))
    return sorted(out, key=lambda p: -p.services)


def converged_record(pin_dir: Path) -> Record:
    """Which store revision the maps in ``pin_dir`` were last converged to:
    {"store_id", "revision", "clean", "seed"} (l4lb/lifecycle/guard.py reads it)."""
    return Record(pin_dir / CONVERGED, CONVERGED_SIZE)
