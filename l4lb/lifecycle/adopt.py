"""Rebuild a desired state from what the datapath's maps hold (pure), for
``l4lbd --adopt-datapath``.

The maps hold, per service: VIP, port, protocol, flags (L4 DNAT, client-IP
affinity, the no-backend policy, answering ping), the affinity prefix and the
source ranges (their LPM trie); per backend: address, port
and the maintenance flag; and the Maglev table in force. What they do not
hold, and how it is recovered:

* service names: made from the key, ``tcp-198.51.100.10-80`` (IPv6 colons
  become dots);
* backend weights: not stored. A backend's share of the table is its quota,
  the weight-proportional share of M (maglev.py), so weights are recovered as
  the simplest ratios whose quotas are exactly those shares, times 100 (equal
  weights come out as 100 each, 2:1 as 200 and 100), and accepted only if
  building the table from them gives the table in force slot for slot. Where no such weights are found the
  closest ones are used and the service is reported: converging then rewrites
  the slots that differ (new flows there may pick another backend;
  established flows keep theirs through the flow table);
* a backend with no slot that is not in maintenance: draining (weight 0 and
  "draining" look the same in the maps); weights of draining and maintenance
  backends: 100;
* ``maglev_weights = false``: indistinguishable from equal weights (same table).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from l4lb import maglev
from l4lb.datapath.flags import bit
from l4lb.models import MAX_WEIGHT, DesiredState, Service

SVC_F_DNAT, SVC_F_NO_SPORT, SVC_F_NO_BACKEND_DROP, SVC_F_PING, SVC_F_AFFINITY_PREFIX, BE_F_DOWN = (
    bit(n) for n in ("SVC_F_DNAT", "SVC_F_NO_SPORT", "SVC_F_NO_BACKEND_DROP", "SVC_F_PING", "SVC_F_AFFINITY_PREFIX",
                     "BE_F_DOWN"))
DEFAULT_WEIGHT = 100
RATIO_STEPS = 64  # simplest ratios tried: the largest weight 1..RATIO_STEPS


@dataclass
class Adopted:
    state: DesiredState
    exact: int = 0                        # services whose table is reproduced slot for slot
    inexact: list[str] = field(default_factory=list)  # "name: N of M slots differ"


def service_name(key: tuple[str, int, str]) -> str:
    vip, port, proto = key
    return f"{proto}-{ipaddress.ip_address(vip).compressed.replace(':', '.')}-{port}"


def _table_of(weights: dict[tuple[str, int], int], slot_of: dict[tuple[str, int], int], m: int,
              seed: bytes) -> np.ndarray:
    """The table ``weights`` build, as backend slots (0: none), like the datapath holds it."""
    t = maglev.build(weights, m, seed)
    ids = np.array([*(slot_of[i] for i in t.identities), 0], dtype=np.uint32)
    return ids[t.table]


def _candidates(counts: dict[tuple[str, int], int]) -> list[dict[tuple[str, int], int]]:
    """Weights whose quotas could be ``counts``: equal ones, then the simplest
    ratios (largest weight 1, 2, ...), then the counts themselves."""
    top = max(counts.values())
    out = [{i: DEFAULT_WEIGHT for i in counts}]
    for step in range(1, RATIO_STEPS + 1):
        w = {i: max(1, round(c * step / top)) for i, c in counts.items()}
        out += [{i: v * DEFAULT_WEIGHT for i, v in w.items()}, w]  # 2:1 as 200:100, as people write weights
    shrink = max(1, -(-top // MAX_WEIGHT))
    out.append({i: max(1, c // shrink) for i, c in counts.items()})
    return out


def _weights(counts: dict[tuple[str, int], int], slot_of: dict[tuple[str, int], int], table: np.ndarray,
             m: int, seed: bytes) -> tuple[dict[tuple[str, int], int], int]:
    """Weights of the active backends, and how many slots their table differs in (0: exact)."""
    best: tuple[int, dict[tuple[str, int], int]] | None = None
    tried: set[tuple[int, ...]] = set()
    order = sorted(counts)
    for w in _candidates(counts):
        sig = tuple(w[i] for i in order)
        if sig in tried:
            continue
        tried.add(sig)
        built = _table_of(w, slot_of, m, seed)
        diff = int(np.count_nonzero(built != table))
        if diff == 0:
            return w, 0
        if best is None or diff < best[0]:
            best = (diff, w)
    assert best is not None
    return best[1], best[0]


def desired_from_maps(in_force: Sequence[dict[str, Any]], m: int, seed: bytes) -> Adopted:
    """``in_force``: Datapath.in_force() (key, flags, affinity_prefix, source_ranges, backends {slot:
    (identity, flags)}, table)."""
    services, result = [], Adopted(DesiredState())
    for entry in in_force:
        vip, port, proto = entry["key"]
        name = service_name(entry["key"])
        table = entry["table"]
        slots: dict[int, tuple[tuple[str, int], int]] = entry["backends"]
        if table is None:
            table = np.zeros(m, dtype=np.uint32)  # no table readable: every backend counts as draining
        present, counts = np.unique(table, return_counts=True)
        share = {int(b): int(c) for b, c in zip(present, counts) if b}
        slot_of = {ident: bid for bid, (ident, _) in slots.items()}
        active = {ident: share[bid] for bid, (ident, flags) in slots.items()
                  if not flags & BE_F_DOWN and share.get(bid)}
        weights, diff = _weights(active, slot_of, table, m, seed) if active else ({}, 0)
        backends = []
        for bid, (ident, flags) in sorted(slots.items(), key=lambda s: s[1][0]):
            addr, bport = ident
            state = "maintenance" if flags & BE_F_DOWN else ("active" if ident in active else "draining")
            backends.append({"address": addr, "port": None if bport == port else bport, "state": state,
                             "weight": weights.get(ident, DEFAULT_WEIGHT)})
        svc = Service.model_validate({
            "name": name, "vip": vip, "port": port, "protocol": proto, "backends": backends,
            "options": {"l4_dnat": bool(entry["flags"] & SVC_F_DNAT),
                        "hash_src_port": not entry["flags"] & SVC_F_NO_SPORT,
                        "no_backend": "drop" if entry["flags"] & SVC_F_NO_BACKEND_DROP else "reject",
                        "answer_ping": bool(entry["flags"] & SVC_F_PING),
                        "affinity_prefix": (entry.get("affinity_prefix")
                                            if entry["flags"] & SVC_F_AFFINITY_PREFIX else None)},
            "source_ranges": [str(n) for n in entry.get("source_ranges", ())]})
        services.append(svc)
        if diff:
            result.inexact.append(f"{name}: {diff} of {m} slots differ")
        else:
            result.exact += 1
    result.state = DesiredState(services=sorted(services, key=lambda s: s.name))
    return result
