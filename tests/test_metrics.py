"""/metrics, /v1/stats and `l4lbctl stats`/`status` of a real l4lbd (one daemon,
one BPF compile for the module): Prometheus output parsed with
prometheus_client's own parsers in both formats, stable backend series across
a drain, the flow table read back (fill, active flows per backend) after the
daemon's pinned program inserted flows (BPF_PROG_TEST_RUN on SYNs), and the
display-only zero point. The pure pieces (zero baseline, apply histogram,
recorder totals) are tested without root below.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from scapy.all import IP, TCP, Ether, raw
from test_daemon_harness import DaemonLab

from api.metrics import RecorderCollector
from l4lb.applymetrics import ApplyMetrics
from l4lb.datapath import libbpf
from l4lb.models import DesiredState
from l4lb.zeroing import Baseline

VIP = "198.51.100.40"
BACKENDS = ["192.0.2.41", "192.0.2.42", "192.0.2.43"]
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@pytest.fixture(scope="module")
def lab(bpffs: Path):
    with DaemonLab.started(bpffs, "metrics", ns_prefix="l4m") as the_lab:
        yield the_lab


@pytest.fixture
def api(lab: DaemonLab):
    with lab.client() as c:
        assert c.put("/v1/state", json={"services": []}).status_code == 200
        yield c


def syns(lab: DaemonLab, ports: range, vip: str = VIP, dport: int = 80) -> None:
    """Run SYNs through the daemon's own pinned program: each inserts a flow."""
    fd = libbpf.obj_get(str(lab.pin_dirs()[0] / "prog"))
    try:
        for p in ports:
            libbpf.test_run(fd, raw(Ether() / IP(src="203.0.113.9", dst=vip) / TCP(sport=p, dport=dport, flags="S")))
    finally:
        os.close(fd)


def clear_flows(lab: DaemonLab) -> None:
    """Empty the pinned flow table (tests share the daemon; the daemon itself never does this)."""
    fd = libbpf.obj_get(str(lab.pin_dirs()[0] / "flows"))
    try:
        info = libbpf.map_info(fd)
        zero = ct.create_string_buffer(info.value_size)
        for i in range(info.max_entries):
            libbpf.map_update(fd, ct.c_uint32(i), zero)
    finally:
        os.close(fd)


def ctl(lab: DaemonLab, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("L4LBCTL_")} | {"L4LBCTL_SOCKET": str(lab.socket)}
    return subprocess.run([str(Path(sys.executable).parent / "l4lbctl"), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def families(text: str, parser: Any = parse_text) -> dict[str, Any]:
    return {f.name: f for f in parser(text)}


def samples(fams: dict[str, Any], name: str, suffix: str = "") -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for s in fams[name].samples if s.name == name + suffix}


def be(addr: str, port: int = 80, service: str = "web") -> tuple:
    return tuple(sorted({"service": service, "backend": addr, "backend_port": str(port)}.items()))


def poll(fn: Any, ok: Any, timeout: float = 5.0) -> Any:
    """fn() until ok(result): the flow scan is cached for a second."""
    deadline = time.monotonic() + timeout
    while not ok(got := fn()):
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    return got


def test_metrics_both_formats_flows_and_stable_backend_series(lab: DaemonLab, api: httpx.Client) -> None:
    clear_flows(lab)
    assert api.put("/v1/services/web", json={"vip": VIP, "port": 80,
                                             "backends": [{"address": a} for a in BACKENDS]}).status_code == 201
    syns(lab, range(42000, 42060))
    stats = poll(lambda: api.get("/v1/stats").json(), lambda d: d["flows"]["used"] == 60)
    (svc,) = stats["services"]
    per = {b["address"]: (b["active_flows"], b["inactive_flows"]) for b in svc["backends"]}
    assert sum(a for a, _ in per.values()) == 60 and all(i == 0 for _, i in per.values()), per
    assert (svc["active_flows"], svc["inactive_flows"]) == (60, 0)
    assert stats["flows"] == {"used": 60, "capacity": 4096, "stale": 0, "active_window_seconds": 10.0}
    assert api.get("/v1/status").json()["datapath"]["maps"]["flows"] == {"used": 60, "max": 4096}

    r = api.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    fams = families(r.text)
    # No state label on counters; the state is a state set of its own.
    assert set(samples(fams, "l4lb_backend_packets", "_total")) == {be(a) for a in BACKENDS}
    assert set(samples(fams, "l4lb_backend_weight")) == {be(a) for a in BACKENDS}
    state = samples(fams, "l4lb_backend_state")
    assert state[tuple(sorted(dict(be(BACKENDS[0]), l4lb_backend_state="active").items()))] == 1
    assert state[tuple(sorted(dict(be(BACKENDS[0]), l4lb_backend_state="draining").items()))] == 0
    active = samples(fams, "l4lb_backend_active_flows")
    assert {k: int(v) for k, v in active.items()} == {be(a): per[a][0] for a in BACKENDS}
    assert samples(fams, "l4lb_flow_table_entries") == {(): 60.0}
    assert samples(fams, "l4lb_flow_table_capacity") == {(): 4096.0}
    assert samples(fams, "l4lb_map_entries")[(("map", "flows"),)] == 60.0
    (build,) = fams["l4lb_build_info"].samples  # an info metric: a gauge of 1 in the text format
    assert build.labels["version"] and build.labels["kernel"] == os.uname().release and build.value == 1
    assert fams["process_resident_memory_bytes"].samples[0].value > 0
    assert "python_info" in fams
    ok = samples(fams, "l4lb_apply", "_total")[(("result", "ok"),)]
    hist = {s.labels.get("le"): s.value for s in fams["l4lb_apply_duration_seconds"].samples
            if s.labels["result"] == "ok" and s.name.endswith("_bucket")}
    assert hist["+Inf"] == ok >= 1 and list(hist.values()) == sorted(hist.values())
    assert samples(fams, "l4lb_recordings_active") == {(): 0.0}
    assert samples(fams, "l4lb_recorder_packets", "_total") == {(): 0.0}

    # OpenMetrics when asked: the strict parser takes it whole (# EOF, types, units).
    r = api.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text") and r.text.endswith("# EOF\n")
    om = families(r.text, parse_openmetrics)
    assert om["l4lb_backend_packets"].type == "counter" and om["l4lb_backend_state"].type == "stateset"
    assert om["l4lb_build"].type == "info" and om["l4lb_apply_duration_seconds"].type == "histogram"

    # A drain keeps the packet series (same labels, same value): rate() stays whole.
    before = samples(fams, "l4lb_backend_packets", "_total")
    assert api.patch(f"/v1/services/web/backends/{BACKENDS[0]}", json={"state": "draining"}).status_code == 200
    after = families(api.get("/metrics").text)
    assert samples(after, "l4lb_backend_packets", "_total") == before
    state = samples(after, "l4lb_backend_state")
    assert state[tuple(sorted(dict(be(BACKENDS[0]), l4lb_backend_state="draining").items()))] == 1
    assert samples(after, "l4lb_apply", "_total")[(("result", "ok"),)] == ok + 1

    # The CLI: ACTIVE/INACTIVE per backend, and flows in use in status.
    out = ctl(lab, "stats", "web")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["PROT", "ADDRESS:PORT", "NAME", "WEIGHT", "STATE", "HEALTH", "ACTIVE", "INACTIVE",
                                "PACKETS", "BYTES"]
    rows = {ln.split()[1]: ln.split() for ln in lines[1:] if ln.strip().startswith("->")}
    assert {a: int(rows[f"{a}:80"][5]) for a in BACKENDS} == {a: per[a][0] for a in BACKENDS}
    assert "ACTIVE = seen in the last 10 s" in out.stdout and "60/4096 entries in use" in out.stdout
    status = ctl(lab, "status")
    assert "flows 60/4096" in status.stdout, status.stdout


def test_stats_zero_is_a_display_baseline(lab: DaemonLab, api: httpx.Client) -> None:
    for name, vip in (("web", VIP), ("alt", "198.51.100.41")):
        assert api.put(f"/v1/services/{name}", json={"vip": vip, "port": 80,
                                                     "backends": [{"address": BACKENDS[0]}]}).status_code == 201
    syns(lab, range(43000, 43010))
    syns(lab, range(43000, 43005), vip="198.51.100.41")
    raw_doc = api.get("/v1/stats").json()
    web = next(s for s in raw_doc["services"] if s["name"] == "web")
    assert web["packets"] >= 10 and web["zeroed_at"] is None

    # Unknown names: 404 and nothing zeroed.
    r = api.post("/v1/stats/zero", json={"services": ["web", "nope"]})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert next(s for s in api.get("/v1/stats").json()["services"] if s["name"] == "web")["zeroed_at"] is None
    assert api.post("/v1/stats/zero", json={"services": ["web"], "extra": 1}).status_code == 422

    t0 = time.time()
    doc = api.post("/v1/stats/zero", json={"services": ["web"]}).json()
    by = {s["name"]: s for s in doc["services"]}
    assert by["web"]["packets"] == 0 and by["web"]["backends"][0]["packets"] == 0 and by["web"]["zeroed_at"] >= t0 - 1
    assert by["alt"]["packets"] >= 5 and by["alt"]["zeroed_at"] is None and doc["reasons_zeroed_at"] is None
    syns(lab, range(43100, 43107))
    by = {s["name"]: s for s in api.get("/v1/stats").json()["services"]}
    assert by["web"]["packets"] == 7 and by["web"]["backends"][0]["packets"] == 7
    # Prometheus keeps the raw, monotonic counters.
    prom = samples(families(api.get("/metrics").text), "l4lb_service_packets", "_total")
    assert next(v for k, v in prom.items() if ("service", "web") in k) == web["packets"] + 7

    # Zero everything (and the reasons) from the CLI.
    out = ctl(lab, "stats", "--zero")
    assert out.returncode == 0, out.stderr
    assert "(l4lbctl stats --zero)" in out.stdout
    doc = api.get("/v1/stats").json()
    assert all(s["packets"] == 0 for s in doc["services"]) and doc["reasons_zeroed_at"] is not None
    assert all(c["packets"] == 0 for c in doc["reasons"].values())
    assert ctl(lab, "stats", "--zero", "nope").returncode != 0

    # A removed service forgets its zero: re-created, it shows its own counters.
    assert api.delete("/v1/services/alt").status_code == 204
    assert api.put("/v1/services/alt", json={"vip": "198.51.100.41", "port": 80,
                                             "backends": [{"address": BACKENDS[1]}]}).status_code == 201
    syns(lab, range(43300, 43303), vip="198.51.100.41")
    alt = next(s for s in api.get("/v1/stats").json()["services"] if s["name"] == "alt")
    assert alt["zeroed_at"] is None and alt["packets"] == 3

    # kill -9 and a new start: the zero is kept (state_dir/stats-zero.json), the pinned counters went on.
    zeroed = next(s for s in api.get("/v1/stats").json()["services"] if s["name"] == "web")
    api.close()
    lab.kill9()
    lab.start()
    with lab.client() as c:
        web = next(s for s in c.get("/v1/stats").json()["services"] if s["name"] == "web")
    assert web["zeroed_at"] == zeroed["zeroed_at"] and web["packets"] == zeroed["packets"] == 0


# --- the pure pieces (no root) ----------------------------------------------------------------------------------------

def _doc(web: int, be1: int, reason: int) -> dict[str, Any]:
    return {"services": [{"name": "web", "vip": "198.51.100.1", "port": 80, "protocol": "tcp", "packets": web,
                          "bytes": 10 * web, "backends": [{"address": "192.0.2.1", "port": 80, "packets": be1,
                                                           "bytes": 10 * be1}]}],
            "reasons": {"tx": {"packets": reason, "bytes": 10 * reason}}}


def test_baseline_subtracts_forgets_on_reset_and_on_removal() -> None:
    z = Baseline(clock=lambda: 1000.0)
    z.zero(_doc(100, 60, 500))
    got = z.apply(_doc(130, 70, 510))
    assert (got["services"][0]["packets"], got["services"][0]["bytes"]) == (30, 300)
    assert got["services"][0]["backends"][0]["packets"] == 10 and got["reasons"]["tx"]["packets"] == 10
    assert got["services"][0]["zeroed_at"] == 1000.0 and got["reasons_zeroed_at"] == 1000.0
    # A counter below its zero restarted (a reused slot): the raw counter, and the zero is gone for good.
    assert z.apply(_doc(130, 5, 510))["services"][0]["backends"][0]["packets"] == 5
    assert z.apply(_doc(130, 80, 510))["services"][0]["backends"][0]["packets"] == 80
    # A backend removed from the service forgets its zero; the service keeps its own.
    web = {"name": "web", "vip": "198.51.100.1", "port": 80, "backends": [{"address": "192.0.2.9"}]}
    z.zero(_doc(100, 60, 500), ["web"])
    z.prune(DesiredState(services=[web]))
    got = z.apply(_doc(130, 70, 510))
    assert (got["services"][0]["packets"], got["services"][0]["backends"][0]["packets"]) == (30, 70)
    # Another VIP under the same name is another service: its zero is gone.
    z.prune(DesiredState(services=[dict(web, vip="198.51.100.2")]))
    assert z.apply(_doc(130, 70, 510))["services"][0]["zeroed_at"] is None
    # Removal from the desired state forgets the service's zero (not the reasons').
    z.zero(_doc(100, 60, 500), ["web"])
    z.prune(DesiredState(services=[]))
    got = z.apply(_doc(140, 90, 520))
    assert got["services"][0]["packets"] == 140 and got["services"][0]["zeroed_at"] is None
    assert got["reasons"]["tx"]["packets"] == 20


def test_apply_histogram_is_cumulative() -> None:
    m = ApplyMetrics()
    for s in (0.0005, 0.003, 0.003, 0.2, 100.0):
        m.observe("ok", s)
    m.observe("failed", 0.02)
    m.observe("unchanged")
    buckets, total = m.histogram("ok")
    b = dict(buckets)
    assert (b["0.001"], b["0.005"], b["0.25"], b["60.0"], b["+Inf"]) == (1, 3, 4, 4, 5)
    assert total == pytest.approx(100.2065) and m.last_seconds == 100.0
    assert dict(m.histogram("failed")[0])["+Inf"] == 1 and m.results == Counter(ok=5, failed=1, unchanged=1)


def test_recorder_totals_stay_monotonic_when_recordings_go() -> None:
    now = time.time_ns()
    old = SimpleNamespace(id="old", packets=1000, lost=3, state="stopped", started_ns=now - 10**12)
    a = SimpleNamespace(id="a", packets=0, lost=0, state="running", started_ns=now + 1)
    recs = [old, a]
    mgr = SimpleNamespace(list=lambda: list(recs), lost_in_ring=2)
    col = RecorderCollector(lambda: mgr)

    def read() -> dict[str, float]:
        return {m.name: m.samples[0].value for m in col.collect()}

    assert read() == {"l4lb_recordings_active": 1, "l4lb_recorder_packets": 0, "l4lb_recorder_lost": 0,
                      "l4lb_recorder_ring_lost": 2}
    a.packets, a.lost = 50, 1
    assert read()["l4lb_recorder_packets"] == 50
    recs.remove(a)   # deleted: its packets stay counted
    recs.remove(old)
    got = read()
    assert (got["l4lb_recorder_packets"], got["l4lb_recorder_lost"], got["l4lb_recordings_active"]) == (50, 1, 0)


def test_flowwatch_caches_and_never_queues_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    """One scan at a time; a caller arriving during a rescan gets the previous scan at once."""
    import threading

    from l4lb.datapath import flowscan

    release, started, n = threading.Event(), threading.Event(), [0]

    def fake_scan(flows: Any, labels: Any, clock: Any, window: float) -> flowscan.FlowScan:
        n[0] += 1
        if n[0] == 2:
            started.set()
            assert release.wait(10)
        return flowscan.FlowScan(capacity=8, used=n[0], stale=0, window=window, at=time.monotonic())

    monkeypatch.setattr(flowscan, "scan", fake_scan)
    watch = flowscan.FlowWatch(lambda: (None, ([], [])), ttl=0.05, clock=SimpleNamespace(close=lambda: None))
    assert watch.get().used == 1 and watch.get().used == 1      # cached
    time.sleep(0.06)
    t = threading.Thread(target=watch.get)
    t.start()
    assert started.wait(10)
    t0 = time.monotonic()
    assert watch.get().used == 1 and time.monotonic() - t0 < 1  # the previous scan, no waiting
    release.set()
    t.join(10)
    assert watch.get().used == 2 and n[0] == 2


def test_flowwatch_failure_is_none_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from l4lb.datapath import flowscan

    calls = [0]

    def broken(*_: Any) -> flowscan.FlowScan:
        calls[0] += 1
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(flowscan, "scan", broken)
    watch = flowscan.FlowWatch(lambda: (None, ([], [])), ttl=0.05, clock=SimpleNamespace(close=lambda: None))
    assert watch.get() is None and watch.get() is None and calls[0] == 2   # an OSError is tried twice at once
    time.sleep(0.06)
    assert watch.get() is None and calls[0] == 4
    assert len([r for r in caplog.records if "flow table not readable" in r.getMessage()]) == 1


def test_baseline_survives_a_restart_in_its_file(tmp_path: Path) -> None:
    path = tmp_path / "stats-zero.json"
    z = Baseline(clock=lambda: 1000.0, path=path)
    z.zero(_doc(100, 60, 500))
    again = Baseline(path=path)
    got = again.apply(_doc(130, 70, 510))
    assert (got["services"][0]["packets"], got["services"][0]["backends"][0]["packets"]) == (30, 10)
    assert got["services"][0]["zeroed_at"] == 1000.0 and got["reasons"]["tx"]["packets"] == 10
    # A counter found below its zero forgets it in the file too: maps made afresh may
    # count past the old zero before the next restart.
    again.apply(_doc(130, 5, 510))
    assert Baseline(path=path).apply(_doc(130, 80, 510))["services"][0]["backends"][0]["packets"] == 80
    # Removal forgets it in the file.
    Baseline(path=path).prune(DesiredState(services=[]))
    assert Baseline(path=path).apply(_doc(140, 90, 520))["services"][0]["zeroed_at"] is None
    # A file that cannot be read is ignored (logged): a display baseline never stops a start.
    for junk in ("{", '{"version": 99}', '{"version": 1, "services": {"web": {"since": 1}}}', "[]"):
        path.write_text(junk)
        assert Baseline(path=path).apply(_doc(140, 90, 520))["services"][0]["packets"] == 140
