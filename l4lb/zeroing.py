"""``l4lbctl stats --zero``: counters shown from a zero point, like ``ipvsadm -Z``,
without ever writing the datapath's counters.

The BPF counters stay monotonic (Prometheus' rate() and increase() rely on it,
and a second client's view must not change under it). A zero is a baseline:
the counters at the moment of the zero, kept by the daemon and subtracted from
what /v1/stats shows. Rates are differences and need no baseline.

A baseline entry is forgotten, and the raw counter shown again, when its service
or backend leaves the desired state (``prune``, on every committed change: a
re-added backend starts from fresh counters) or when a counter reads lower
than its baseline (a slot reused: the counter restarted). The daemon keeps the
baseline in a file of its state directory, written (atomically) on every zero
and every prune that forgets something, so a restart keeps it: the pinned
counters go on counting across a restart, and maps made afresh (a layout
change) read below their zeros, which forgets them as above. A file that cannot
be read is logged and ignored: a display baseline never stops a start.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from l4lb.atomicfile import write_atomic
from l4lb.models import DesiredState, Service

Key = tuple  # ("svc", name, vip, port, proto) / ("be", name, vip, port, proto, address, port)
FILE_VERSION = 1
log = logging.getLogger(__name__)


def _svc_key(s: dict[str, Any]) -> tuple:
    return ("svc", s["name"], s["vip"], s["port"], s["protocol"])


def _be_key(s: dict[str, Any], b: dict[str, Any]) -> tuple:
    return ("be", *_svc_key(s)[1:], b["address"], b["port"])


class Baseline:
    def __init__(self, clock: Any = time.time, path: Path | None = None) -> None:
        self._clock = clock
        self._path = path   # None: memory only
        self._lock = threading.Lock()
        # Per service name: its own and its backends' zeros, and when it was zeroed.
        self._base: dict[str, dict[Key, tuple[int, int]]] = {}
        self._since: dict[str, float] = {}
        self._reasons: dict[str, tuple[int, int]] = {}
        self._reasons_since: float | None = None
        self._checked: dict[str, Service] = {}   # the Service object prune() last checked a name against
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != FILE_VERSION:
                raise ValueError(f"version {doc.get('version')!r}, not {FILE_VERSION}")
            base = {name: {tuple(z[:-2]): (int(z[-2]), int(z[-1])) for z in svc["zeros"]}
                    for name, svc in doc["services"].items()}
            since = {name: float(svc["since"]) for name, svc in doc["services"].items()}
            reasons = {r: (int(p), int(b)) for r, (p, b) in doc["reasons"].items()}
            reasons_since = None if doc["reasons_since"] is None else float(doc["reasons_since"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("stats zero baseline %s ignored (%s): counters show from when the maps were made", path, e)
            return
        self._base, self._since, self._reasons, self._reasons_since = base, since, reasons, reasons_since

    def _save(self) -> None:
        """Write the baseline (the caller holds the lock): a temporary file, fsync, rename."""
        if self._path is None:
            return
        doc = {"version": FILE_VERSION,
               "services": {name: {"since": self._since[name], "zeros": [[*k, *v] for k, v in base.items()]}
                            for name, base in self._base.items()},
               "reasons": {r: list(v) for r, v in self._reasons.items()},
               "reasons_since": self._reasons_since}
        try:
            write_atomic(self._path, json.dumps(doc, separators=(",", ":")))
        except OSError as e:
            log.warning("stats zero baseline not saved to %s (%s): a restart will not keep it", self._path, e)

    def zero(self, doc: dict[str, Any], names: list[str] | None = None) -> None:
        """Take the raw counters of ``doc`` (a /v1/stats document before apply())
        as the new zero of the services ``names`` (all, and the reasons, if None)."""
        now = self._clock()
        with self._lock:
            for s in doc["services"]:
                if names is not None and s["name"] not in names:
                    continue
                base = {_svc_key(s): (s["packets"], s["bytes"])}
                base.update((_be_key(s, b), (b["packets"], b["bytes"])) for b in s["backends"])
                self._base[s["name"]] = base
                self._since[s["name"]] = now
                self._checked.pop(s["name"], None)
            if names is None:
                self._reasons = {r: (c["packets"], c["bytes"]) for r, c in doc["reasons"].items()}
                self._reasons_since = now
            self._save()

    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` with every zeroed counter shown from its zero (in place), and
        ``zeroed_at`` (epoch seconds or null) per service and for the reasons."""
        with self._lock:
            forgot = False
            for s in doc["services"]:
                base = self._base.get(s["name"])
                if base is not None:
                    forgot |= self._sub(base, _svc_key(s), s)
                    for b in s["backends"]:
                        forgot |= self._sub(base, _be_key(s, b), b)
                s["zeroed_at"] = self._since.get(s["name"])
            for r, c in doc["reasons"].items():
                forgot |= self._sub(self._reasons, r, c)
            doc["reasons_zeroed_at"] = self._reasons_since
            if forgot:  # else a restart would bring back a zero its counter has left below
                self._save()
        return doc

    @staticmethod
    def _sub(base: dict, key: Any, c: dict[str, Any]) -> bool:
        """Subtract the zero of ``key`` from ``c``; True if the zero was forgotten."""
        zero = base.get(key)
        if zero is None:
            return False
        if c["packets"] < zero[0] or c["bytes"] < zero[1]:  # the counter restarted: its zero is gone
            del base[key]
            return True
        c["packets"] -= zero[0]
        c["bytes"] -= zero[1]
        return False

    def prune(self, desired: DesiredState) -> None:
        """Forget the zero of services and backends no longer in ``desired``. Runs
        after every committed change: only zeroed services whose Service object
        changed since the last check are looked into (a drain at 100,000 backends
        must not pay for walking them all)."""
        with self._lock:
            if not self._base:
                return
            forgot = False
            current = {s.name: s for s in desired.services}
            for name in list(self._base):
                svc = current.get(name)
                if svc is None:
                    del self._base[name], self._since[name]
                    self._checked.pop(name, None)
                    forgot = True
                    continue
                if self._checked.get(name) is svc:
                    continue
                sk = ("svc", svc.name, svc.vip.compressed, svc.port, svc.protocol.value)
                keep = {sk, *(("be", *sk[1:], b.address.compressed, b.identity(svc.port)[1]) for b in svc.backends)}
                base = self._base[name]
                if sk not in base:      # another VIP, port or protocol: another service's counters
                    del self._base[name], self._since[name]
                    self._checked.pop(name, None)
                    forgot = True
                    continue
                gone = [k for k in base if k not in keep]
                for k in gone:
                    del base[k]
                forgot = forgot or bool(gone)
                self._checked[name] = svc
            if forgot:
                self._save()
