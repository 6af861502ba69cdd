"""Prometheus /metrics: a custom collector that reads the datapath on each scrape.

Per-CPU counters are summed by the datapath's stats(); this only labels them
(service name, VIP, backend, reason) and adds control-plane gauges, and the
health room's gauges and check-duration histograms (l4lb/health/report.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from l4lb.control import Control
from l4lb.health.report import metrics as health_metrics
from l4lb.models import BackendState


class L4lbCollector:
    def __init__(self, control: Control) -> None:
        self._control = control

    def collect(self) -> Iterator[Metric]:
        c = self._control
        state, flat = c.raw_stats()

        svc_labels = ["service", "vip", "port", "protocol"]
        svc_p = CounterMetricFamily("l4lb_service_packets", "Packets sent to a service's backends", labels=svc_labels)
        svc_b = CounterMetricFamily("l4lb_service_bytes", "Bytes sent to a service's backends", labels=svc_labels)
        be_labels = svc_labels[:1] + ["backend", "backend_port", "state"]
        be_p = CounterMetricFamily("l4lb_backend_packets", "Packets sent to a backend", labels=be_labels)
        be_b = CounterMetricFamily("l4lb_backend_bytes", "Bytes sent to a backend", labels=be_labels)
        be_w = GaugeMetricFamily("l4lb_backend_weight", "Configured backend weight", labels=be_labels)
        for s in state.services:
            labels = [s.name, s.vip.compressed, str(s.port), s.protocol.value]
            packets, nbytes = flat.get(("svc", s.key), (0, 0))
            svc_p.add_metric(labels, packets)
            svc_b.add_metric(labels, nbytes)
            for b in s.backends:
                ident = b.identity(s.port)
                bl = [s.name, b.address.compressed, str(ident[1]), b.state.value]
                packets, nbytes = flat.get(("be", s.key, ident), (0, 0))
                be_p.add_metric(bl, packets)
                be_b.add_metric(bl, nbytes)
                be_w.add_metric(bl, b.weight)
        yield from (svc_p, svc_b, be_p, be_b, be_w)

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
        yield CounterMetricFamily("l4lb_apply_seconds", "Time spent applying to store and datapath",
                                  value=c.apply_metrics.total_seconds)
        ifaces = GaugeMetricFamily("l4lb_interface_attached", "XDP attached, by interface and mode",
                                   labels=["interface", "mode"])
        for iface, mode in sorted(c.interfaces.items()):
            ifaces.add_metric([iface, mode], 1)
        yield ifaces
        yield from _map_metrics(c.status().get("datapath", {}))


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


class Metrics:
    def __init__(self, control: Control, health: Callable[[], Any] = lambda: None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(L4lbCollector(control))  # type: ignore[arg-type]
        self.registry.register(HealthCollector(control, health))  # type: ignore[arg-type]

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
