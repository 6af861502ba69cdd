"""Counters of the datapath, summed over CPUs and labelled by service key and
backend identity."""

from __future__ import annotations

import numpy as np

from l4lb.datapath.slots import BackendKey, Labels, ServiceKey
from l4lb.datapath.tables import Tables


class DatapathStats:
    """Counters summed over CPUs, labelled by service key and backend identity.
    Read as arrays; the per-backend dicts are built only when asked for, so a
    periodic sample of 100,000 backends costs a few batch reads, not 0.5 s of
    Python that would compete with requests for the GIL."""

    def __init__(self, timestamp: float, svc: np.ndarray, be: np.ndarray, why: np.ndarray,
                 labels: Labels, reasons: list[str]) -> None:
        self.timestamp = timestamp
        self._arrays = (svc, be, why)
        self._labels = labels
        self._reason_names = reasons
        self._built: tuple[dict, dict, dict] | None = None

    def _build(self) -> tuple[dict, dict, dict]:
        if self._built is None:
            svc, be, why = (a.tolist() for a in self._arrays)  # plain ints
            svc_ids, slots = self._labels
            services = {key: {"packets": svc[sid][0], "bytes": svc[sid][1]} for key, sid in svc_ids}
            rev = {sid: key for key, sid in svc_ids}
            backends = {(rev[slot.svc_id], slot.ident): {"packets": be[bid][0], "bytes": be[bid][1]}
                        for bid, slot in slots if slot.svc_id in rev}
            reasons = {name: {"packets": why[i][0], "bytes": why[i][1]} for i, name in enumerate(self._reason_names)}
            self._built = (services, backends, reasons)
        return self._built

    @property
    def services(self) -> dict[ServiceKey, dict[str, int]]:
        return self._build()[0]

    @property
    def backends(self) -> dict[tuple[ServiceKey, BackendKey], dict[str, int]]:
        return self._build()[1]

    @property
    def reasons(self) -> dict[str, dict[str, int]]:
        return self._build()[2]


def read_counters(t: Tables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Service, backend and reason counters as [packets, bytes] arrays (a few batch reads)."""
    return t.percpu_sums(t.svc_stats), t.percpu_sums(t.backend_stats), t.percpu_sums(t.reason_stats)
