"""Counters for the API and /metrics: the datapath's stats flattened, rated
between samples and laid out per service and backend (with each backend's
health from the overlay). Pure over what it is given; the control core
supplies the reads.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from l4lb.models import DesiredState


Counters = dict[tuple, tuple[int, int]]  # flat key -> (packets, bytes)


class Sample:
    """A datapath stats read, flattened only if a rate is ever computed from it:
    the periodic sample of 100,000 backends is then a few batch reads."""

    def __init__(self, raw: Any) -> None:
        self._raw: Any = raw
        self._flat: Counters | None = None

    @property
    def flat(self) -> Counters:
        if self._flat is None:
            self._flat = flatten_stats(self._raw)
        return self._flat


class RateTracker:
    """Keeps the last two samples; a fresh read is rated against the newest one at least
    ``min_age`` old, so rates are over a real interval whatever the request pattern."""

    def __init__(self, min_age: float = 1.0) -> None:
        self.min_age = min_age
        self._prev: tuple[float, Sample] | None = None
        self._last: tuple[float, Sample] | None = None

    def base(self, now: float) -> tuple[float, Sample] | None:
        for s in (self._last, self._prev):
            if s is not None and now - s[0] >= self.min_age:
                return s
        return None

    def observe(self, now: float, sample: Sample) -> None:
        if self._last is None or now - self._last[0] >= self.min_age:
            self._prev, self._last = self._last, (now, sample)


# Cached: every stats sample normalises every backend's key again (100,000 of them).
@lru_cache(maxsize=1 << 18)
def _norm_key(key: Any) -> tuple[str, int, str]:
    """Datapath service key (vip, port, proto) → Service.key form, whatever the datapath's types."""
    vip, port, proto = key
    proto_s = {6: "tcp", 17: "udp"}.get(proto, proto) if isinstance(proto, int) else getattr(proto, "value", str(proto))
    return (ipaddress.ip_address(vip).exploded, int(port), str(proto_s))


@lru_cache(maxsize=1 << 18)
def _norm_ident(ident: Any) -> tuple[str, int]:
    addr, port = ident
    return (ipaddress.ip_address(addr).exploded, int(port))


def _counter(v: Any) -> tuple[int, int]:
    if isinstance(v, Mapping):
        return int(v.get("packets", 0)), int(v.get("bytes", 0))
    return int(getattr(v, "packets", 0)), int(getattr(v, "bytes", 0))


def flatten_stats(raw: Any) -> Counters:
    out: Counters = {}
    for k, v in (getattr(raw, "services", None) or {}).items():
        out[("svc", _norm_key(k))] = _counter(v)
    for (sk, ident), v in (getattr(raw, "backends", None) or {}).items():
        out[("be", _norm_key(sk), _norm_ident(ident))] = _counter(v)
    for reason, v in (getattr(raw, "reasons", None) or {}).items():
        out[("reason", str(reason))] = _counter(v)
    return out



def stats_answer(revision: int, state: DesiredState, sample: Sample, base: tuple[float, Sample] | None,
                 now: float, health: Callable[[str, int], str | None], fail_open: frozenset[str]) -> dict[str, Any]:
    """The /v1/stats document: counters of every desired service and backend,
    rates against ``base``, ``health(service, backend index)`` per backend and
    whether a service fails open (every backend down, all kept)."""
    flat = sample.flat
    interval = (now - base[0]) if base else None
    then_flat = base[1].flat if base else {}

    def entry(key: tuple) -> dict[str, Any]:
        packets, nbytes = flat.get(key, (0, 0))
        out: dict[str, Any] = {"packets": packets, "bytes": nbytes, "pps": None, "bps": None}
        if base:
            # Not in the base sample: created since, and new counters start at 0.
            then = then_flat.get(key, (0, 0))
            dp, db = packets - then[0], nbytes - then[1]
            if dp >= 0 and db >= 0:  # a counter reset (slot reused) has no honest rate
                out["pps"] = round(dp / interval, 3)
                out["bps"] = round(8 * db / interval, 3)
        return out

    services = []
    for s in state.services:
        backends = [
            {"address": b.address.compressed, "port": b.identity(s.port)[1], "state": b.state.value,
             "health": health(s.name, i), **entry(("be", s.key, b.identity(s.port)))}
            for i, b in enumerate(s.backends)
        ]
        services.append({"name": s.name, "vip": s.vip.compressed, "port": s.port, "protocol": s.protocol.value,
                         "fail_open": s.name in fail_open, **entry(("svc", s.key)), "backends": backends})
    reasons = {k[1]: entry(k) for k in sorted(flat) if k[0] == "reason"}
    return {"revision": revision, "rate_interval_seconds": round(interval, 3) if interval else None,
            "services": services, "reasons": reasons}


def with_flows(doc: dict[str, Any], scan: Any | None) -> dict[str, Any]:
    """``doc`` (a /v1/stats document) with each backend's ``active_flows`` and
    ``inactive_flows`` from a flow-table scan (l4lb/datapath/flowscan.py), their
    sums per service, and the table's fill; null everywhere without a scan."""
    for s in doc["services"]:
        key = _norm_key((s["vip"], s["port"], s["protocol"]))
        tot = [0, 0]
        for b in s["backends"]:
            got = None if scan is None else scan.backends.get((key, _norm_ident((b["address"], b["port"]))), (0, 0))
            b["active_flows"], b["inactive_flows"] = got if got is not None else (None, None)
            if got is not None:
                tot = [tot[0] + got[0], tot[1] + got[1]]
        s["active_flows"], s["inactive_flows"] = tot if scan is not None else (None, None)
    doc["flows"] = None if scan is None else {
        "used": scan.used, "capacity": scan.capacity, "stale": scan.stale, "active_window_seconds": scan.window}
    return doc
