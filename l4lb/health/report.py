"""What the API and /metrics show about health: read-only, built from a View,
the control core's facts in force and the manager's probe states."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    StateSetMetricFamily,
)

from l4lb.health.manager import HealthManager
from l4lb.health.worker import LATENCY_BUCKETS
from l4lb.health.overlay import Health
from l4lb.health.targets import _text, probes_of
from l4lb.models import Service
from l4lb.view import View

HealthOf = Callable[[str, int], str | None]   # Control.health: service, backend index -> fact in force


def _probes(svc: Service, manager: HealthManager | None) -> tuple[Any, ...]:
    return manager.service_probes(svc) if manager is not None else probes_of(svc)


def service_report(svc: Service, view: View, health_of: HealthOf, manager: HealthManager | None,
                   details: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One service's backends with their health; ``details`` is the manager's
    snapshot of probe states (fetched here when not given)."""
    probes = _probes(svc, manager)
    if details is None:
        details = manager.details() if manager is not None and probes else {}
    backends = []
    for i, b in enumerate(svc.backends):
        p = probes[i] if probes else None
        row: dict[str, Any] = {"address": _text(b.address), "port": b.port or svc.port,
                               "state": b.state.value, "health": health_of(svc.name, i)}
        if p is not None:
            row["key"] = p.key
            detail = details.get(p.key)
            if detail is not None:
                row.update({k: v for k, v in detail.items() if k != "health"})  # the fact in force is shown
            else:
                row["check"] = p.spec.description
        backends.append(row)
    return {"name": svc.name, "checked": bool(probes),
            "on_all_down": svc.health.on_all_down if svc.health is not None else None,
            "fail_open": svc.name in view.fail_open, "backends": backends}


def report(view: View, health_of: HealthOf, manager: HealthManager | None, *, services: bool = True) -> dict[str, Any]:
    """The whole picture; ``services=False`` leaves out the per-backend part (cheap at 10,000 backends)."""
    details = manager.details() if manager is not None and services else {}
    counts = {h.value: 0 for h in Health}
    if manager is not None:
        counts.update(manager.stats.states)
    out: dict[str, Any] = {
        "revision": view.revision, "runtime": view.runtime, "enabled": manager is not None,
        "probes": counts, "fail_open": sorted(view.fail_open),
        "services": [service_report(s, view, health_of, manager, details) for s in view.desired.services]
        if services else [],
    }
    if manager is not None:
        st = manager.stats
        out["checks"] = {**st.results, "not_run": st.not_run, "late": st.late, "failed_by": dict(st.failed_by)}
        out["tunnel"] = {"ready": manager.tunnel is not None and manager.tunnel_error is None,
                         "error": manager.tunnel_error,
                         "packets": manager.tunnel.counters() if manager.tunnel is not None else {}}
        now = time.time()
        out["recent_transitions"] = [
            {"key": t.key, "from": t.old.value, "to": t.new.value, "reason": t.reason, "at": t.at,
             "seconds_ago": round(now - t.at, 3)} for t in list(manager.transitions)[-50:]]
        # Single failed checks, most of which change nothing (fall not reached): why a
        # probe failed, when, and its source port to find it in a packet capture.
        out["recent_failures"] = [
            {"key": f.key, "error": f.error, "at": f.at, "seconds_ago": round(now - f.at, 3),
             "latency_seconds": round(f.latency, 6), "source_port": f.source_port} for f in manager.failures]
    return out


def metrics(view: View, health_of: HealthOf, manager: HealthManager | None) -> Iterator[Metric]:
    """Health state is a gauge of its own (a state set), never a label on packet counters."""
    labels = ["service", "backend", "backend_port"]
    state = StateSetMetricFamily("l4lb_backend_health", "Health of a checked backend (up, down, unknown)",
                                 labels=labels)
    fail_open = GaugeMetricFamily("l4lb_service_fail_open",
                                  "1 while every backend of the service is down and all are kept (fail_open)",
                                  labels=["service"])
    for s in view.desired.services:
        probes = _probes(s, manager)
        if not probes:
            continue
        fail_open.add_metric([s.name], int(s.name in view.fail_open))
        for i, b in enumerate(s.backends):
            h = health_of(s.name, i)
            if h is not None:
                state.add_metric([s.name, _text(b.address), str(b.port or s.port)],
                                 {v.value: v.value == h for v in Health})
    yield state
    yield fail_open
    if manager is None:
        return
    hist = HistogramMetricFamily("l4lb_health_check_duration_seconds", "Duration of health checks",
                                 labels=["type", "via"])
    for (kind, via), lat in sorted(manager.latency.items()):
        acc, buckets = 0, []
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), lat.counts):
            acc += n
            buckets.append((bound, acc))
        hist.add_metric([kind, via], buckets, lat.total)
    yield hist
    st = manager.stats
    checks = CounterMetricFamily("l4lb_health_checks", "Health checks by result", labels=["result"])
    for k, v in (*st.results.items(), ("not_run", st.not_run)):
        checks.add_metric([k], v)
    yield checks
    failed = CounterMetricFamily("l4lb_health_check_failures", "Failed health checks by kind of failure",
                                 labels=["kind"])
    for k, v in sorted(st.failed_by.items()):
        failed.add_metric([k], v)
    yield failed
    probes = GaugeMetricFamily("l4lb_health_probes", "Distinct probes by state", labels=["state"])
    counts = {h.value: 0 for h in Health}
    counts.update(st.states)
    for k, n in counts.items():
        probes.add_metric([k], n)
    yield probes
    if manager.tunnel is not None:
        tun = CounterMetricFamily("l4lb_health_tunnel_packets", "Probe packets at the tunnel encapsulator",
                                  labels=["reason"])
        for k, n in manager.tunnel.counters().items():
            tun.add_metric([k], n)
        yield tun
