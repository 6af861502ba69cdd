"""``l4lbctl stats --zero``: counters shown from a zero point, like ``ipvsadm -Z``,
without ever writing the datapath's counters.

The BPF counters stay monotonic (Prometheus' rate() and increase() rely on it,
and a second client's view must not change under it). A zero is a baseline:
the counters at the moment of the zero, kept by the daemon and subtracted from
what /v1/stats shows. Rates are differences and need no baseline.

A baseline entry is forgotten, and the raw counter shown again, when its service
or backend leaves the desired state (``prune``, on every committed change: a
re-added backend starts from fresh counters) or when a counter reads lower
than its baseline (a slot reused: the counter restarted). The baseline lives
in the daemon's memory: a restarted daemon shows the counters since the
program's maps were created again (they are pinned, so these go on counting).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from l4lb.models import DesiredState

Key = tuple  # ("svc", name, vip, port, proto) / ("be", name, vip, port, proto, address, port) / ("reason", name)


def _svc_key(s: dict[str, Any]) -> tuple:
    return ("svc", s["name"], s["vip"], s["port"], s["protocol"])


def _be_key(s: dict[str, Any], b: dict[str, Any]) -> tuple:
    return ("be", *_svc_key(s)[1:], b["address"], b["port"])


class Baseline:
    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._base: dict[Key, tuple[int, int]] = {}
        self._since: dict[Key, float] = {}   # service key (or ("reasons",)) -> when it was zeroed

    def zero(self, doc: dict[str, Any], names: list[str] | None = None) -> None:
        """Take the raw counters of ``doc`` (a /v1/stats document before apply())
        as the new zero of the services ``names`` (all, and the reasons, if None)."""
        now = self._clock()
        with self._lock:
            for s in doc["services"]:
                if names is not None and s["name"] not in names:
                    continue
                sk = _svc_key(s)
                self._base[sk] = (s["packets"], s["bytes"])
                self._since[sk] = now
                for b in s["backends"]:
                    self._base[_be_key(s, b)] = (b["packets"], b["bytes"])
            if names is None:
                for r, c in doc["reasons"].items():
                    self._base[("reason", r)] = (c["packets"], c["bytes"])
                self._since[("reasons",)] = now

    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` with every zeroed counter shown from its zero (in place), and
        ``zeroed_at`` (epoch seconds or null) per service and for the reasons."""
        with self._lock:
            for s in doc["services"]:
                sk = _svc_key(s)
                self._sub(sk, s)
                s["zeroed_at"] = self._since.get(sk)
                for b in s["backends"]:
                    self._sub(_be_key(s, b), b)
            for r, c in doc["reasons"].items():
                self._sub(("reason", r), c)
            doc["reasons_zeroed_at"] = self._since.get(("reasons",))
        return doc

    def _sub(self, key: Key, c: dict[str, Any]) -> None:
        base = self._base.get(key)
        if base is None:
            return
        if c["packets"] < base[0] or c["bytes"] < base[1]:  # the counter restarted: its zero is gone
            del self._base[key]
            return
        c["packets"] -= base[0]
        c["bytes"] -= base[1]

    def prune(self, desired: DesiredState) -> None:
        """Forget the zero of services and backends no longer in ``desired``."""
        keep: set[Key] = set()
        for s in desired.services:
            sk = ("svc", s.name, s.vip.compressed, s.port, s.protocol.value)
            keep.add(sk)
            keep.update(("be", *sk[1:], b.address.compressed, b.identity(s.port)[1]) for b in s.backends)
        with self._lock:
            for k in [k for k in self._base if k[0] != "reason" and k not in keep]:
                del self._base[k]
            for k in [k for k in self._since if k[0] == "svc" and k not in keep]:
                del self._since[k]
