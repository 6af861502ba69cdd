"""Health checks end to end: a real l4lbd in the netns lab checks real servers
(the lab's HTTP/HTTPS servers, dnsmasq) through the tunnel and directly, and
takes failed backends out of the real datapath while curl traffic runs.

One lab, one daemon and one module-wide set of services (interval 0.6 s,
fall 3, rise 2); each test changes something on the backends and restores it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from l4lb.lab import netns
from l4lb.lab.l4lbd import L4lbd, default_config
from l4lb.lab.topology import Lab

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

L4LBCTL = Path(sys.executable).parent / "l4lbctl"
# 0.5 s to answer: with 0.25 s, a loaded 2-core test box (two test files at once, a BPF
# compile) sometimes answered late three times in a row and a live backend went down.
INTERVAL, TIMEOUT, RISE, FALL = 0.6, 0.5, 2, 3
DNS_NAME = "health.l4lb.test"
VIP4B, VIP6B = "198.51.100.11", "2001:db8:0:100::11"
DNS_FAILED = rf"receive: connection refused|timeout after {re.escape(f'{TIMEOUT:g}')} s \(receiving\)"


def check(kind: str, **kw: Any) -> dict[str, Any]:
    return {"type": kind, "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL, **kw}


def services(lab: Lab) -> list[dict[str, Any]]:
    v4 = [{"address": b.ip4} for b in lab.backends.values()]
    v6 = [{"address": b.ip6} for b in lab.backends.values()]
    return [
        # Through the tunnel (the default) and directly, to the same backends and VIP.
        {"name": "web", "vip": lab.vip4, "port": 80, "backends": v4, "health": check("http", path="/health")},
        {"name": "tun", "vip": lab.vip4, "port": 8080, "backends": v4, "health": check("tcp")},
        {"name": "dir", "vip": lab.vip4, "port": 5353, "protocol": "udp", "backends": v4,
         "health": check("tcp", port=8080, via="direct")},
        {"name": "web6", "vip": lab.vip6, "port": 8080, "backends": v6,
         "health": check("http", body_contains="backend=")},
        {"name": "tls", "vip": VIP4B, "port": 443, "backends": v4,
         "health": check("https", path="/tls", expect_status="200", body_contains="path=/tls")},
        {"name": "dns", "vip": VIP4B, "port": 53, "protocol": "udp", "backends": v4,
         "health": check("udp-dns", query=DNS_NAME)},
        # Checks that fail everywhere (nothing listens on port 9): the two policies.
        {"name": "open", "vip": lab.vip6, "port": 80, "backends": v6, "health": check("tcp", port=9)},
        {"name": "closed", "vip": VIP6B, "port": 80, "backends": v6,
         "health": check("tcp", port=9, on_all_down="fail_closed")},
    ]


@dataclass
class HealthLab:
    lab: Lab
    daemon: L4lbd
    work: Path

    def api(self) -> httpx.Client:
        return self.daemon.client(timeout=30)

    def backends(self, service: str) -> dict[str, dict[str, Any]]:
        """backend name -> its entry of GET /v1/services/NAME/health."""
        with self.api() as c:
            r = c.get(f"/v1/services/{service}/health")
        assert r.status_code == 200, r.text
        return {self.lab.backend_by_addr(b["address"]): b for b in r.json()["backends"]}

    def health(self, service: str) -> dict[str, str]:
        return {n: b["health"] for n, b in self.backends(service).items()}

    def wait(self, what: str, ok: Callable[[], bool], timeout: float) -> float:
        """Poll ``ok`` every 50 ms; returns the seconds it took, fails with ``what``."""
        t0 = time.monotonic()
        while not ok():
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{what}: not within {timeout} s\n{self.daemon.log_tail(25)}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def ctl(self, *args: str) -> str:
        cp = subprocess.run([str(L4LBCTL), "--socket", str(self.daemon.socket), *args], capture_output=True,
                            text=True, timeout=60)
        assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
        return cp.stdout


def make_cert(work: Path) -> tuple[str, str]:
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=l4lb-lab"],
                   check=True, capture_output=True, timeout=30)
    return str(cert), str(key)


def start_dnsmasq(lab: Lab, name: str, work: Path) -> subprocess.Popen:
    b = lab.backends[name]
    p = lab.popen(name, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                  "--bind-interfaces", f"--listen-address={VIP4B},{b.ip4}", "--port=53", "--user=root",
                  f"--pid-file={work / f'dnsmasq-{name}.pid'}", f"--address=/{DNS_NAME}/192.0.2.200",
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.2)
    assert p.poll() is None, f"dnsmasq on {name}: {p.stderr.read().decode() if p.stderr else ''}"
    return p


@pytest.fixture(scope="module")
def hl(bpffs: Path, lab_decap: Any) -> Iterator[HealthLab]:
    work = Path(tempfile.mkdtemp(prefix="l4lbd-health-"))
    dns: list[subprocess.Popen] = []
    try:
        cert = make_cert(work)
        with Lab(clients=1, backends=3, prefix="l4hc", decap=lab_decap, https_ports=(443,), tls_cert=cert) as lab:
            dns = [start_dnsmasq(lab, n, work) for n in ("b1", "b2")]   # b3 has none
            pins = bpffs / f"health-{lab.tag}"
            pins.mkdir()
            daemon = L4lbd(lab.lb_ns, work, default_config(work, pins, [lab.lb_if]))
            try:
                daemon.start()
                with daemon.client() as c:
                    r = c.put("/v1/state", json={"services": services(lab)})
                    assert r.status_code == 200, r.text
                hl = HealthLab(lab, daemon, work)
                # The tunnel compiles once a check needs it (seconds when quiet, a minute on a
                # loaded 2-core box, as the main program's compile); then every probe reports.
                hl.wait("every probe checked", lambda: all(
                    b["health"] != "unknown" for s in services(lab) for b in hl.backends(s["name"]).values()), 120)
                yield hl
            finally:
                daemon.kill()
                for p in dns:
                    p.kill()
                    p.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Traffic(threading.Thread):
    """New curl connections to ``url`` one after another: (start time, backend or None)."""

    def __init__(self, lab: Lab, url: str) -> None:
        super().__init__(daemon=True)
        self.lab, self.url = lab, url
        self.log: list[tuple[float, str | None]] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            t = time.monotonic()
            r = self.lab.curl("c1", self.url, timeout=2)
            self.log.append((t, r.backend if r.ok else None))

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(30)


# --- every kind of check ------------------------------------------------------------------------------


def test_every_check_kind_against_real_servers_and_both_policies(hl: HealthLab) -> None:
    lab = hl.lab
    up3 = {"b1": "up", "b2": "up", "b3": "up"}
    for name in ("web", "tun", "dir", "web6", "tls"):
        assert hl.health(name) == up3, name
    # dnsmasq answers on b1 and b2; b3 has none: its VIP answers the query with port
    # unreachable (or, past the kernel's ICMP rate limit, not at all).
    dns = hl.backends("dns")
    assert {n: b["health"] for n, b in dns.items()} == {"b1": "up", "b2": "up", "b3": "down"}
    assert re.fullmatch(DNS_FAILED, dns["b3"]["last_error"]), dns["b3"]
    # Every backend of "open" and "closed" fails its check: open keeps all, closed none.
    open_, closed = hl.backends("open"), hl.backends("closed")
    assert all(b["health"] == "down" for b in [*open_.values(), *closed.values()])
    assert open_["b1"]["last_error"] == "connect: connection refused"
    with hl.api() as c:
        h = c.get("/v1/health").json()
        metrics = c.get("/metrics").text
        om = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}).text
    # The health families in OpenMetrics too: the strict parser takes the whole exposition.
    om_types = {f.name: f.type for f in parse_openmetrics(om)}
    assert om_types["l4lb_backend_health"] == "stateset" and om_types["l4lb_health_check_duration_seconds"] == "histogram"
    assert h["fail_open"] == ["open"] and h["tunnel"]["ready"] and h["tunnel"]["packets"]["tx"] > 0
    # Each failed check is counted by kind and listed with its reason and source port.
    kinds = {k for k, n in h["checks"]["failed_by"].items() if n}
    assert h["checks"]["failed_by"]["refused"] > 0 and kinds <= {"refused", "timeout"}, h["checks"]
    mine = [f for f in h["recent_failures"] if f["key"] == open_["b1"]["key"]]
    assert mine and all(f["error"] == "connect: connection refused" and 1024 <= f["source_port"] <= 65535
                        and 0 <= f["latency_seconds"] < TIMEOUT for f in mine), mine
    assert re.search(r'l4lb_health_check_failures_total\{kind="refused"\} [1-9]', metrics)
    assert lab.curl("c1", lab.url(lab.vip6)).ok, "fail_open keeps every backend"
    assert not lab.curl("c1", lab.url(VIP6B), timeout=1).ok, "fail_closed takes every backend out"
    assert 'l4lb_service_fail_open{service="open"} 1.0' in metrics
    assert 'l4lb_service_fail_open{service="closed"} 0.0' in metrics
    assert re.search(r'l4lb_backend_health\{backend="2001:db8:0:1::101",backend_port="80",'
                     r'l4lb_backend_health="down",service="closed"\} 1.0', metrics)
    for kind in ("http", "https", "udp-dns", "tcp"):
        assert re.search(rf'l4lb_health_check_duration_seconds_count\{{type="{kind}",via="tunnel"\}} [1-9]', metrics)
    assert "every backend of service open is down: FAILING OPEN" in hl.daemon.log_text()
    # The CLI shows it: a HEALTH column in stats and service show, and `l4lbctl health`.
    stats = hl.ctl("stats", "dns", "open")
    assert re.search(r"\s->\s+192\.0\.2\.103:53\s+100\s+active\s+DOWN", stats), stats
    assert re.search(r"TCP\s+\[2001:db8:0:100::10\]:80\s+open\s+FAIL-OPEN", stats), stats
    show = hl.ctl("service", "show", "dns")
    assert "udp-dns A health.l4lb.test via tunnel" in show
    assert re.search(r"192\.0\.2\.103:53\s+100\s+active\s+DOWN\s+\S+\s+(?:" + DNS_FAILED + ")", show), show
    listing = hl.ctl("health")
    assert "FAILING OPEN: open" in listing
    assert re.search(r"checks since the start: \d+ ok, \d+ failed \(refused \d+", listing), listing


def test_a_lost_vip_fails_the_tunnel_check_but_not_the_direct_one(hl: HealthLab) -> None:
    lab = hl.lab
    lab.run("b2", "ip", "addr", "del", f"{lab.vip4}/32", "dev", "lo")
    try:
        took = hl.wait("tunnel check of b2 down", lambda: hl.health("tun")["b2"] == "down",
                       FALL * INTERVAL + 1 + 2)
        # Clients of "dir" lost b2 as well, but its direct check cannot see it.
        time.sleep(RISE * INTERVAL + 0.3)
        assert hl.health("dir") == {"b1": "up", "b2": "up", "b3": "up"}
        assert hl.backends("tun")["b2"]["last_error"].startswith(f"timeout after {TIMEOUT:g} s (connecting)")
        assert hl.health("tun")["b1"] == "up", took
    finally:
        lab.run("b2", "ip", "addr", "add", f"{lab.vip4}/32", "dev", "lo")
    hl.wait("tunnel check of b2 up again", lambda: hl.health("tun")["b2"] == "up", RISE * INTERVAL + 3)


# --- a backend dies and comes back, under traffic -------------------------------------------------------


def test_a_dead_backend_gets_no_new_connections_within_fall_times_interval(hl: HealthLab) -> None:
    lab = hl.lab
    traffic = Traffic(lab, lab.url(lab.vip4))
    traffic.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        wall0 = time.time()
        lab.stop_server("b1")
        hl.wait("b1 down", lambda: hl.health("web")["b1"] == "down", FALL * INTERVAL + 3)
        detected = hl.backends("web")["b1"]["since"] - wall0
        deadline = t0 + FALL * INTERVAL + 1
        time.sleep(max(0.0, deadline - time.monotonic()) + 1.5)
        after = [b for t, b in traffic.log if t >= deadline]
        print(f"\nb1 detected down {detected:.2f} s after its server stopped "
              f"(bound {FALL * INTERVAL + 1:.1f} s); {len(after)} connections after the bound")
        assert detected <= FALL * INTERVAL + 1
        assert len(after) >= 10 and None not in after and "b1" not in after, after
        lab.start_server("b1")
        t1 = time.monotonic()
        hl.wait("b1 up again", lambda: hl.health("web")["b1"] == "up", RISE * INTERVAL + 3)
        hl.wait("b1 serves again", lambda: any(b == "b1" for t, b in traffic.log if t > t1), 10)
    finally:
        traffic.stop()
        if "b1" not in lab._servers:
            lab.start_server("b1")


# --- kill -9 with a backend down -----------------------------------------------------------------------


def test_kill9_restart_keeps_a_down_backend_down_and_flaps_nothing(hl: HealthLab) -> None:
    lab, daemon = hl.lab, hl.daemon
    lab.stop_server("b1")
    try:
        hl.wait("b1 down", lambda: hl.health("web")["b1"] == "down", FALL * INTERVAL + 3)
        before = hl.backends("web")
        traffic = Traffic(lab, lab.url(lab.vip4))
        traffic.start()
        time.sleep(0.5)
        daemon.kill9()
        lab.stop_server("b3")                    # a change while no daemon runs
        mark = len(daemon.log_text())
        daemon.start()
        # Right at READY, before any new evidence: what was in force is in force.
        assert hl.health("web") == {"b1": "down", "b2": "up", "b3": "up"}
        # The probe tunnel is set up again first (a BCC compile: seconds, far more on a loaded machine).
        hl.wait("b3 down after the restart (evidence, not lost)", lambda: hl.health("web")["b3"] == "down", 60)
        time.sleep(RISE * INTERVAL + 0.5)
        traffic.stop()
        after = hl.backends("web")
        for name in ("b1", "b2"):
            assert after[name]["health"] == before[name]["health"]
            assert after[name]["since"] == before[name]["since"] and after[name]["transitions"] == 0, after[name]
        assert "b1" not in [b for _, b in traffic.log], "b1 got a new connection across the restart"
        log = daemon.log_text()[mark:]
        assert "192.0.2.101:80" not in log and "192.0.2.102:80" not in log, log
    finally:
        for name in ("b1", "b3"):
            if name not in lab._servers:
                lab.start_server(name)
    hl.wait("b1 and b3 back", lambda: hl.health("web") == {"b1": "up", "b2": "up", "b3": "up"}, 10)


def test_cli_sets_checks_and_export_apply_round_trips_them(hl: HealthLab) -> None:
    exported = hl.ctl("export")
    assert "health:" in exported and "query: health.l4lb.test" in exported
    path = hl.work / "state.yaml"
    path.write_text(exported)
    assert "no changes" in hl.ctl("apply", "-f", str(path)).lower()
    b1 = hl.lab.backends["b1"].ip4
    hl.ctl("service", "add", "chk", "198.51.100.12:80", "-b", b1, "--check", "http", "--check-opt", "path=/x",
           "--check-opt", "interval=0.5", "--check-opt", "via=direct")
    with hl.api() as c:
        h = c.get("/v1/services/chk").json()["health"]
    assert (h["type"], h["path"], h["interval"], h["via"]) == ("http", "/x", 0.5, "direct")
    assert "health check tcp via direct" in hl.ctl("service", "edit", "chk", "--check", "tcp", "--check-opt", "fall=2")
    with hl.api() as c:
        h = c.get("/v1/services/chk").json()["health"]
    assert (h["type"], h["path"], h["fall"], h["interval"]) == ("tcp", None, 2, 0.5)
    bad = subprocess.run([str(L4LBCTL), "--socket", str(hl.daemon.socket), "service", "edit", "chk",
                          "--check-opt", "timeout=5"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "timeout 5.0 s is longer than the interval 0.5 s" in bad.stderr
    hl.ctl("service", "edit", "chk", "--check", "none")
    hl.ctl("service", "delete", "chk")


def test_a_late_loop_takes_every_answer_before_any_timeout(hl: HealthLab, monkeypatch: pytest.MonkeyPatch) -> None:
    """18 probes answered while the loop was busy elsewhere, past their timeout,
    more than one epoll call hands out: every one counts as a success."""
    from l4lb.health import scheduler as sched
    from l4lb.health.probe import Route
    from l4lb.health.targets import ProbeSpec, Timing
    from l4lb.models import CheckType

    monkeypatch.setattr(sched, "MAX_EVENTS", 4)
    monkeypatch.setattr(sched.random, "uniform", lambda a, b: 0.0)
    specs = [ProbeSpec(kind=CheckType.tcp, via="direct", address=a, port=p)
             for b in hl.lab.backends.values() for a in (b.ip4, b.ip6) for p in (80, 8080, 443)]
    s = sched.Scheduler(lambda t: None)
    s.update({sp.key: sched.ProbeConfig(sp, Timing(10, 0.2, 1, 1), Route()) for sp in specs})

    def run() -> None:
        s._turn()              # starts all 18 (their answers arrive meanwhile)
        time.sleep(0.4)        # busy elsewhere, past every timeout
        s._turn()

    try:
        netns.call_in_netns(hl.lab.lb_ns, run)
        assert s.stats.results == {"ok": 18, "failed": 0}, [j.state.last_error for j in s.jobs.values()]
    finally:
        s.stop()


# --- the LB's own source address changes ----------------------------------------------------------------

NEW4, NEW6 = "192.0.2.60", "2001:db8:0:1::60"


def follows(hl: HealthLab, service: str, source: str | None, since: dict[str, int] | None = None) -> bool:
    """Every backend's probe of ``service`` is bound to ``source`` and, if ``since``
    (backend -> checks then) is given, has passed a check after that."""
    for name, b in hl.backends(service).items():
        if b.get("source") != source:
            return False
        if since is not None and not (b["checks"] >= since[name] + 1 and b["last_result"] == "ok"
                                      and b["not_run_reason"] is None):
            return False
    return True


def checks(hl: HealthLab, service: str) -> dict[str, int]:
    return {n: b["checks"] for n, b in hl.backends(service).items()}


def test_tunnel_probes_follow_the_lbs_source_address_when_it_changes(hl: HealthLab) -> None:
    """Renumbering: a new IPv4 address takes over the route to the backends and the
    old one is removed; an IPv6 address is deprecated beside a new one. The tunnel
    probes bind the new sources and keep passing (bound to a removed address they
    could not run; bound to the deprecated one they would keep it)."""
    lab = hl.lab
    old4, old6 = lab.lb_ip4, lab.lb_ip6
    assert follows(hl, "tun", old4) and follows(hl, "web6", old6)
    mark = len(hl.daemon.log_text())
    up3 = {"b1": "up", "b2": "up", "b3": "up"}
    try:
        netns.run(lab.lb_ns, "ip", "-batch", "-",
                  input=f"addr add {NEW4}/32 dev {lab.lb_if}\n"
                  f"route replace 192.0.2.0/24 dev {lab.lb_if} proto kernel scope link src {NEW4}\n"
                  f"addr del {old4}/24 dev {lab.lb_if}\n")
        netns.run(lab.lb_ns, "ip", "-6", "-batch", "-",
                  input=f"addr add {NEW6}/64 dev {lab.lb_if} nodad\n"
                  f"addr change {old6}/64 dev {lab.lb_if} nodad preferred_lft 0\n")
        hl.wait("tunnel probes bound to the new sources", lambda: follows(hl, "tun", NEW4)
                and follows(hl, "web", NEW4) and follows(hl, "web6", NEW6), 10)
        at = {s: checks(hl, s) for s in ("tun", "web", "web6")}
        hl.wait("tunnel checks pass from the new sources", lambda: all(
            follows(hl, s, NEW4 if s != "web6" else NEW6, at[s]) for s in at), 10)
        assert hl.health("tun") == hl.health("web") == hl.health("web6") == up3
        log = hl.daemon.log_text()[mark:]
        assert re.search(rf"source address {re.escape(old4)} -> {NEW4} towards 3 backend\(s\) \(192\.0\.2\.101, "
                         r"192\.0\.2\.102, 192\.0\.2\.103\): 12 tunnel probe\(s\) re-routed", log), log
        assert f"source address {old6} -> {NEW6} towards 3 backend(s)" in log, log
    finally:
        netns.run(lab.lb_ns, "ip", "-batch", "-", check=False,
                  input=f"route del 192.0.2.0/24 dev {lab.lb_if} src {NEW4}\n"
                  f"addr add {old4}/24 dev {lab.lb_if}\naddr del {NEW4}/32 dev {lab.lb_if}\n")
        netns.run(lab.lb_ns, "ip", "-6", "-batch", "-", check=False,
                  input=f"addr change {old6}/64 dev {lab.lb_if} nodad preferred_lft forever\n"
                  f"addr del {NEW6}/64 dev {lab.lb_if}\n")
    hl.wait("tunnel probes back on the old sources", lambda: follows(hl, "tun", old4) and follows(hl, "web6", old6), 10)
    at = {s: checks(hl, s) for s in ("tun", "web6")}
    hl.wait("and passing", lambda: follows(hl, "tun", old4, at["tun"]) and follows(hl, "web6", old6, at["web6"]), 10)
    assert hl.health("tun") == hl.health("web6") == hl.health("dir") == up3


def test_a_backend_without_a_route_from_the_lb_goes_down_and_comes_back_with_the_route(hl: HealthLab) -> None:
    """No route from the LB to a backend: client traffic to it cannot leave either,
    so its tunnel checks fail ("no route", as a direct connect does) and it goes
    down after ``fall``; the others are untouched; with the route back it is up after ``rise``."""
    lab = hl.lab
    b3 = lab.backends["b3"].ip4
    mark = len(hl.daemon.log_text())
    lab.run("lb", "ip", "route", "add", "unreachable", f"{b3}/32")
    try:
        hl.wait("b3's tunnel probe down: no route", lambda: hl.health("tun")["b3"] == "down",
                FALL * INTERVAL + 5)
        tun = hl.backends("tun")
        assert tun["b3"]["source"] is None and tun["b3"]["last_error"] == f"connect: no route from the LB to {b3}"
        assert tun["b3"]["not_run_reason"] is None, tun["b3"]
        assert tun["b1"]["source"] == tun["b2"]["source"] == lab.lb_ip4
        assert hl.health("tun")["b1"] == hl.health("tun")["b2"] == "up"
    finally:
        lab.run("lb", "ip", "route", "del", "unreachable", f"{b3}/32")
    at = checks(hl, "tun")
    hl.wait("b3's tunnel probe runs from its source again", lambda: follows(hl, "tun", lab.lb_ip4, at), 10)
    log = hl.daemon.log_text()[mark:]
    assert f"source address {lab.lb_ip4} -> no route towards 1 backend(s) ({b3}): 4 tunnel probe(s)" in log, log
    assert f"source address no route -> {lab.lb_ip4} towards 1 backend(s) ({b3}): 4 tunnel probe(s)" in log, log
    # Its direct check saw the missing route as failures: it comes back as well.
    hl.wait("b3 up everywhere", lambda: hl.health("dir")["b3"] == "up" and hl.health("tun")["b3"] == "up",
            RISE * INTERVAL + 5)
