"""Prometheus /metrics: collectors that read the datapath on each scrape.

Per-CPU counters are summed by the datapath's stats(); this only labels them
(service name, VIP, backend, reason) and adds control-plane gauges, the flow
table (fill, active/inactive flows per backend: l4lb/datapath/flowscan.py),
the recorder, build info, the process (prometheus_client's collectors), the
apply-latency histogram, and the health room's gauges and check-duration
histograms (l4lb/health/report.py).

Labels of a counter never change over its life: a backend's state (active,
draining, maintenance) is a state set of its own (``l4lb_backend_state``), so a
drain does not start a new packet series and rate() stays whole. OpenMetrics
is answered when the scraper's Accept header asks for it.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric, StateSetMetricFamily,
)
from prometheus_client.exposition import choose_encoder

from l4lb.applymetrics import TIMED
from l4lb.control import Control
from l4lb.health.report import metrics as health_metrics
from l4lb.models import BackendState


class L4lbCollector:
    def __init__(self, control: Control, flows: Callable[[], Any] = lambda: None) -> None:
        self._control = control
        self._flows = flows     # the daemon's FlowWatch, or None

    def collect(self) -> Iterator[Metric]:
        c = self._control
        state, flat = c.raw_stats()
        watch = self._flows()
        scan = watch.get() if watch is not None else None

        svc_labels = ["service", "vip", "port", "protocol"]
        svc_p = CounterMetricFamily("l4lb_service_packets", "Packets sent to a service's backends", labels=svc_labels)
        svc_b = CounterMetricFamily("l4lb_service_bytes", "Bytes sent to a service's backends", labels=svc_labels)
        be_labels = ["service", "backend", "backend_port"]
        be_p = CounterMetricFamily("l4lb_backend_packets", "Packets sent to a backend", labels=be_labels)
        be_b = CounterMetricFamily("l4lb_backend_bytes", "Bytes sent to a backend", labels=be_labels)
        be_w = GaugeMetricFamily("l4lb_backend_weight", "Configured backend weight", labels=be_labels)
        be_s = StateSetMetricFamily("l4lb_backend_state", "Configured backend state (active, draining, maintenance)",
                                    labels=be_labels)
        act = GaugeMetricFamily("l4lb_backend_active_flows", "Flows in the flow table for the backend seen within "
                                "the active window (ipvsadm's ActiveConn, estimated)", labels=be_labels)
        inact = GaugeMetricFamily("l4lb_backend_inactive_flows", "Flows in the flow table for the backend seen "
                                  "longer ago (ipvsadm's InActConn, estimated)", labels=be_labels)
        for s in state.services:
            labels = [s.name, s.vip.compressed, str(s.port), s.protocol.value]
            packets, nbytes = flat.get(("svc", s.key), (0, 0))
            svc_p.add_metric(labels, packets)
            svc_b.add_metric(labels, nbytes)
            for b in s.backends:
                ident = b.identity(s.port)
                bl = [s.name, b.address.compressed, str(ident[1])]
                packets, nbytes = flat.get(("be", s.key, ident), (0, 0))
                be_p.add_metric(bl, packets)
                be_b.add_metric(bl, nbytes)
                be_w.add_metric(bl, b.weight)
                be_s.add_metric(bl, {st.value: b.state is st for st in BackendState})
                if scan is not None:
                    a, i = scan.backends.get((s.key, ident), (0, 0))
                    act.add_metric(bl, a)
                    inact.add_metric(bl, i)
        yield from (svc_p, svc_b, be_p, be_b, be_w, be_s)
        if scan is not None:
            yield from (act, inact)
            yield GaugeMetricFamily("l4lb_flow_table_entries", "Flow-table entries holding a flow", value=scan.used)
            yield GaugeMetricFamily("l4lb_flow_table_capacity", "Flow-table entries in all", value=scan.capacity)
            yield GaugeMetricFamily("l4lb_flow_table_stale_entries", "Flow-table entries of backends no longer in "
                                    "force (counted for nobody, overwritten as room is needed)", value=scan.stale)
            yield GaugeMetricFamily("l4lb_flow_table_scan_seconds", "Time the last flow-table read took",
                                    value=scan.seconds)

        r_p = CounterMetricFamily("l4lb_datapath_packets", "Packets by datapath verdict reason", labels=["reason"])
        r_b = CounterMetricFamily("l4lb_datapath_bytes", "Bytes by datapath verdict reason", labels=["reason"])
        for key, (packets, nbytes) in sorted(flat.items()):
            if key[0] == "reason":
                r_p.add_metric([key[1]], packets)
                r_b.add_metric([key[1]], nbytes)
        yield from (r_p, r_b)

        yield GaugeMetricFamily("l4lb_desired_revision", "Revision of the desired state in force", value=c.revision)
        yield GaugeMetricFamily("l4lb_services", "Services in the desired state", value=len(state.services))
        by_state = GaugeMetricFamily("l4lb_backends", "Backends in the desired state", labels=["state"])
        for st in BackendState:
            by_state.add_metric([st.value], sum(1 for s in state.services for b in s.backends if b.state is st))
        yield by_state
        yield GaugeMetricFamily("l4lb_ready", "1 when the datapath holds the committed state", value=int(c.ready))
        yield GaugeMetricFamily("l4lb_degraded", "1 when a rollback failed and the datapath may differ",
                                value=int(c.degraded is not None))
        applies = CounterMetricFamily("l4lb_apply", "Desired-state writes by result", labels=["result"])
        for result in ("ok", "failed", "unchanged"):
            applies.add_metric([result], c.apply_metrics.results.get(result, 0))
        yield applies
        hist = HistogramMetricFamily("l4lb_apply_duration_seconds", "Time a desired-state write took to reach the "
                                     "store and the datapath (or to fail and roll back)", labels=["result"])
        for result in TIMED:
            buckets, total = c.apply_metrics.histogram(result)
            hist.add_metric([result], buckets, total)
        yield hist
        ifaces = GaugeMetricFamily("l4lb_interface_attached", "XDP attached, by interface and mode",
                                   labels=["interface", "mode"])
        for iface, mode in sorted(c.interfaces.items()):
            ifaces.add_metric([iface, mode], 1)
        yield ifaces
        dp = c.status().get("datapath", {})
        flows = dp.get("maps", {}).get("flows") if isinstance(dp, dict) else None
        if isinstance(flows, dict) and scan is not None:
            flows["used"] = scan.used
        yield from _map_metrics(dp)


def _map_metrics(dp: dict[str, Any]) -> Iterator[Metric]:
    """Map fill levels, if the datapath's status() reports them as {map: {entries, max_entries}}."""
    maps = dp.get("maps") if isinstance(dp, dict) else None
    if not isinstance(maps, dict):
        return
    used = GaugeMetricFamily("l4lb_map_entries", "Entries in use per BPF map", labels=["map"])
    size = GaugeMetricFamily("l4lb_map_capacity", "Capacity per BPF map", labels=["map"])
    for name, info in sorted(maps.items()):
        if not isinstance(info, dict):
            continue
        n = info.get("entries", info.get("used"))
        cap = info.get("max_entries", info.get("capacity", info.get("max")))
        if isinstance(n, (int, float)):
            used.add_metric([name], n)
        if isinstance(cap, (int, float)):
            size.add_metric([name], cap)
    yield used
    yield size


class HealthCollector:
    def __init__(self, control: Control, health: Callable[[], Any]) -> None:
        self._control, self._health = control, health

    def collect(self) -> Iterator[Metric]:
        yield from health_metrics(self._control.view(), self._control.health, self._health())


class RecorderCollector:
    """Recordings running, and packets captured / samples lost by recordings of
    this daemon process. The totals stay monotonic when a recording is deleted
    (its last seen counts are kept); recordings loaded from disk at the start
    count from their state then. A recording started and deleted between two
    scrapes is not seen."""

    def __init__(self, recorder: Callable[[], Any]) -> None:
        self._recorder = recorder
        self._lock = threading.Lock()
        self._first: dict[str, tuple[int, int]] = {}   # counts when first seen (loaded from disk: not ours)
        self._last: dict[str, tuple[int, int]] = {}
        self._gone = (0, 0)
        self._born_ns = time.time_ns()

    def collect(self) -> Iterator[Metric]:
        mgr = self._recorder()
        if mgr is None:
            return
        recs = mgr.list()
        with self._lock:
            now = {}
            for r in recs:
                counts = (r.packets, r.lost)
                self._first.setdefault(r.id, counts if r.started_ns < self._born_ns else (0, 0))
                now[r.id] = counts
            for rid in set(self._last) - set(now):  # deleted: keep what it had counted
                (p, lo), (p0, lo0) = self._last[rid], self._first.pop(rid)
                self._gone = (self._gone[0] + p - p0, self._gone[1] + lo - lo0)
            self._last = now
            packets = self._gone[0] + sum(now[i][0] - self._first[i][0] for i in now)
            lost = self._gone[1] + sum(now[i][1] - self._first[i][1] for i in now)
        yield GaugeMetricFamily("l4lb_recordings_active", "Recordings running",
                                value=sum(1 for r in recs if r.state == "running"))
        yield CounterMetricFamily("l4lb_recorder_packets", "Packets written by recordings", value=packets)
        yield CounterMetricFamily("l4lb_recorder_lost", "Samples a recording wanted but the datapath could not "
                                  "hand over (its per-CPU ring was full)", value=lost)
        yield CounterMetricFamily("l4lb_recorder_ring_lost", "Samples the perf rings reported lost (PERF_RECORD_LOST)",
                                  value=mgr.lost_in_ring)


class BuildCollector:
    def __init__(self, version: str) -> None:
        self._labels = {"version": version, "python": platform.python_version(), "kernel": os.uname().release,
                        "bcc": _bcc_version()}

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("l4lb_build", "l4lbd version and what it runs on", value=self._labels)


def _bcc_version() -> str:
    try:
        import bcc  # noqa: PLC0415 - only to read its version; the datapath imports it anyway

        return str(getattr(bcc, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - a test app without BCC
        return "unavailable"


class Metrics:
    def __init__(self, control: Control, health: Callable[[], Any] = lambda: None, *,
                 flows: Callable[[], Any] = lambda: None, recorder: Callable[[], Any] = lambda: None,
                 version: str = "unknown") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(L4lbCollector(control, flows))  # type: ignore[arg-type]
        self.registry.register(HealthCollector(control, health))  # type: ignore[arg-type]
        self.registry.register(RecorderCollector(recorder))  # type: ignore[arg-type]
        self.registry.register(BuildCollector(version))  # type: ignore[arg-type]
        ProcessCollector(registry=self.registry)   # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=self.registry)  # python_info

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition the Accept header asks for: OpenMetrics, or the text format (0.0.4) by default."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
