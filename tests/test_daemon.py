"""The l4lbd process with the real datapath in a private netns: start-up and
sd_notify, no partial apply under an injected failure, durability across
kill -9, convergence on start, SIGTERM (XDP stays), SIGHUP reload, --detach.

One lab for the module; tests restart the daemon where that is the point
(each start compiles the BPF program, so they are few).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from test_daemon_harness import PY, DaemonLab, NotifyListener, to_toml

from l4lb.daemon import FAULT_ENV
from l4lb.models import DesiredState
from l4lb.store import Store

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

COUNTERS = ("svc_stats", "backend_stats", "reason_stats", "icmp_buckets", "flows", "frags", "cache_epoch")
WEB = {"vip": "198.51.100.10", "port": 80, "backends": [{"address": "192.0.2.1"}, {"address": "192.0.2.2"}]}


def config_maps(lab: DaemonLab) -> dict[str, dict[bytes, bytes]]:
    return {k: v for k, v in lab.dump_maps().items() if k not in COUNTERS}


@pytest.fixture(scope="module")
def lab(bpffs: Path):
    the_lab = DaemonLab(bpffs, "dmn")
    the_lab.fault = the_lab.dir / "fault"  # type: ignore[attr-defined]
    the_lab.notify = NotifyListener(the_lab.dir / "notify")  # type: ignore[attr-defined]
    the_lab.env.update({FAULT_ENV: str(the_lab.fault), "NOTIFY_SOCKET": str(the_lab.notify.path),
                        "WATCHDOG_USEC": "400000"})
    try:
        yield the_lab
    finally:
        the_lab.notify.close()
        the_lab.close()


def running(lab: DaemonLab) -> DaemonLab:
    if lab.proc is None or lab.proc.poll() is not None:
        lab.start()
    return lab


def wait_for(predicate, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --- start-up ------------------------------------------------------------------------------------------------


def test_ready_only_once_attached_and_listening_then_watchdog_and_status(lab: DaemonLab) -> None:
    notify: NotifyListener = lab.notify  # type: ignore[attr-defined]
    assert lab.xdp_prog_id("lbt0a") is None
    lab.start(wait=False)
    msgs = notify.wait("READY=1", timeout=90)
    ready = next(m for m in msgs if "READY=1" in m.split("\n"))  # (WATCHDOG=1 may follow at once)
    # At READY: XDP is on the interface and the API answers (no retry needed).
    assert lab.xdp_prog_id("lbt0a") is not None
    with lab.client(timeout=5) as c:
        assert c.get("/readyz").status_code == 200
    status = next(m for m in ready.split("\n") if m.startswith("STATUS="))
    assert "0 services, 0 backends, interfaces lbt0a(generic)" in status and "unix:" in status

    notify.clear()
    time.sleep(1.3)
    assert notify.texts().count("WATCHDOG=1") >= 4  # every 0.2 s for WATCHDOG_USEC=0.4 s

    with lab.client() as c:
        assert c.put("/v1/services/web", json=WEB).status_code == 201
    wait_for(lambda: any("STATUS=" in m and "1 services, 2 backends" in m for m in notify.texts()),
             what="STATUS update")


def test_check_config_in_the_namespace(lab: DaemonLab) -> None:
    cp = lab.run_cli("--check-config")
    assert cp.returncode == 0 and "is valid: interfaces lbt0a (generic)" in cp.stdout, cp.stderr


# --- no partial apply ---------------------------------------------------------------------------------------------


def _fail_with_fault(lab: DaemonLab, c: httpx.Client, writes: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    fault: Path = lab.fault  # type: ignore[attr-defined]
    fault.touch()
    try:
        return [c.request(method, path, **kw) for method, path, kw in writes]
    finally:
        fault.unlink()


def _assert_apply_failed(responses: list[httpx.Response], revision: str) -> None:
    for r in responses:
        assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json", r.text
        body = r.json()
        assert body["type"] == "urn:l4lb:problem:apply-failed"
        assert "injected failure" in body["detail"] and f"still hold revision {revision}" in body["detail"]


TWO = {"services": [{"name": "web", **WEB}, {"name": "dns", "vip": "2001:db8::53", "port": 53, "protocol": "udp",
                                             "backends": [{"address": "2001:db8::1"}]}]}


def test_injected_failure_after_apply_leaves_store_and_maps_unchanged(lab: DaemonLab) -> None:
    """The failure strikes after datapath.apply(new) succeeded: the control core must roll
    the store back and put the old service set back into the maps, byte for byte."""
    running(lab)
    with lab.client() as c:
        c.put("/v1/state", json=TWO)
        state, maps = c.get("/v1/state"), config_maps(lab)
        grown = {"services": [*TWO["services"], {"name": "api", "vip": "203.0.113.9", "port": 443,
                                                  "backends": [{"address": "192.0.2.9"}]}]}
        responses = _fail_with_fault(lab, c, [
            ("put", "/v1/state", {"json": grown}),
            ("put", "/v1/services/api", {"json": grown["services"][2]}),
            ("patch", "/v1/services/web/backends/192.0.2.1", {"json": {"state": "maintenance"}}),
            ("patch", "/v1/services/web/backends/192.0.2.2", {"json": {"weight": 1}}),
            ("put", "/v1/services/web/backends/192.0.2.3", {"json": {"weight": 5}}),
        ])
        _assert_apply_failed(responses, state.headers["x-l4lb-revision"])
        after = c.get("/v1/state")
        assert after.headers["etag"] == state.headers["etag"] and after.json() == state.json()
        assert config_maps(lab) == maps  # the datapath was put back exactly
        assert c.get("/readyz").status_code == 200
        assert 'l4lb_apply_total{result="failed"} 5.0' in c.get("/metrics").text

        ok = c.put("/v1/state", json=grown)  # the same change goes through without the fault
        assert ok.status_code == 200 and config_maps(lab) != maps


def test_injected_failure_undoing_a_removal_keeps_the_maps_byte_identical(lab: DaemonLab) -> None:
    """Undoing a removal brings back the same backend slots and generations, so flows
    pinned to those backends stay valid across the failed write."""
    running(lab)
    with lab.client() as c:
        c.put("/v1/state", json=TWO)
        state, maps = c.get("/v1/state"), config_maps(lab)
        responses = _fail_with_fault(lab, c, [("delete", "/v1/services/dns", {}),
                                              ("delete", "/v1/services/web/backends/192.0.2.2", {})])
        _assert_apply_failed(responses, state.headers["x-l4lb-revision"])
        assert c.get("/v1/state").json() == state.json()
        assert config_maps(lab) == maps


# --- durability and convergence -------------------------------------------------------------------------------------


def test_kill9_right_after_2xx_keeps_the_change(lab: DaemonLab) -> None:
    running(lab)
    with lab.client() as c:
        r = c.put("/v1/services/durable", json={"vip": "203.0.113.50", "port": 8443,
                                                  "backends": [{"address": "192.0.2.50"}]})
    lab.kill9()  # no shutdown path at all
    assert r.status_code == 201
    prog = lab.xdp_prog_id("lbt0a")
    assert prog is not None  # traffic keeps flowing while the daemon is dead
    maps_before = config_maps(lab)

    lab.start()
    with lab.client() as c:
        got = c.get("/v1/services/durable")
        assert got.status_code == 200 and got.json()["backends"][0]["address"] == "192.0.2.50"
        assert got.headers["x-l4lb-revision"] == r.headers["x-l4lb-revision"]
        assert c.get("/v1/status").json()["datapath"]["maps"]["services"]["used"] == len(c.get("/v1/services").json()["services"])
    assert config_maps(lab) == maps_before  # restart converged to the same maps: nothing moved
    assert lab.xdp_prog_id("lbt0a") is not None


def test_start_converges_the_maps_to_the_committed_state(lab: DaemonLab) -> None:
    """What the store says wins over what the pinned maps hold (e.g. a crash between
    datapath.apply and COMMIT): change the store behind a stopped daemon, start it."""
    running(lab)
    with lab.client() as c:
        revision = int(c.get("/v1/state").headers["x-l4lb-revision"])
    assert lab.stop() == 0
    maps_before = config_maps(lab)
    doc = DesiredState.model_validate({"services": [{"name": "only", "vip": "198.51.100.77", "port": 25,
                                                     "backends": [{"address": "192.0.2.77"}]}]})
    with Store(lab.dir / "state" / "state.sqlite3") as store, store.write(revision, doc):
        pass
    lab.start()
    with lab.client() as c:
        assert [s["name"] for s in c.get("/v1/services").json()["services"]] == ["only"]
    maps = config_maps(lab)
    assert maps != maps_before and len(maps["services"]) == 1


# --- signals ---------------------------------------------------------------------------------------------------------


def test_sigterm_stops_serving_and_leaves_xdp_and_maps(lab: DaemonLab) -> None:
    running(lab)
    prog = lab.xdp_prog_id("lbt0a")
    maps = config_maps(lab)
    assert lab.stop(signal.SIGTERM) == 0
    assert "XDP stays attached" in lab.log_text()
    assert not lab.socket.exists()
    with pytest.raises(httpx.TransportError), lab.client(timeout=2) as c:
        c.get("/healthz")
    assert lab.xdp_prog_id("lbt0a") == prog  # same program, still attached
    assert config_maps(lab) == maps  # pinned maps untouched


def _reload(lab: DaemonLab, mark: str) -> None:
    """SIGHUP and wait until the log shows the outcome after `mark`."""
    before = len(lab.log_text())
    lab.send(signal.SIGHUP)
    wait_for(lambda: mark in lab.log_text()[before:], what=f"log line {mark!r}")


def test_sighup_reload(lab: DaemonLab) -> None:
    running(lab)
    notify: NotifyListener = lab.notify  # type: ignore[attr-defined]
    with lab.client() as c:
        c.put("/v1/state", json={"services": [{"name": "web", **WEB}]})
        limits = c.get("/v1/status").json()["limits"]

        # A bad file is refused: the old config stays in force.
        lab.write_config(to_toml(lab.config) + "\n[limits2]\nx = 1\n")
        _reload(lab, "reload refused")
        assert "limits2: unknown key" in lab.log_text()
        assert c.get("/v1/status").json()["limits"] == limits

        # Limits the current state does not fit are refused too.
        lab.config["limits"]["max_backends_per_service"] = 1
        lab.write_config()
        _reload(lab, "reload refused")
        assert "the current desired state exceeds the new limits" in lab.log_text()
        assert c.get("/v1/status").json()["limits"] == limits

        # A good one: limits, a second interface, a TCP listener with a token.
        lab.add_veth("lbt1")
        token = lab.dir / "token"
        token.write_text("t0ken-for-the-tests-0123456789\n")
        token.chmod(0o600)
        lab.config["limits"]["max_backends_per_service"] = 5
        lab.config["datapath"]["interfaces"] = ["lbt0a", "lbt1a"]
        lab.config["datapath"]["maglev_m"] = 509  # needs a restart: reported, not applied
        lab.config["api"]["tcp"] = {"listen": "127.0.0.1:9180", "token_file": str(token)}
        lab.write_config()
        notify.clear()
        _reload(lab, "configuration reloaded")
        status = c.get("/v1/status").json()
        assert status["limits"]["max_backends_per_service"] == 5
        assert status["interfaces"] == {"lbt0a": "generic", "lbt1a": "generic"}
        assert lab.xdp_prog_id("lbt1a") is not None
        assert "take effect only at the next start: datapath.maglev_m" in lab.log_text()
        assert status["pending_restart"] == ["datapath.maglev_m"]
        shown = subprocess.run([str(Path(PY).parent / "l4lbctl"), "--socket", str(lab.socket), "status"],
                               capture_output=True, text=True, timeout=60)
        assert "Restart needed:  for datapath.maglev_m" in shown.stdout, shown.stdout + shown.stderr
        msgs = notify.wait("READY=1", timeout=5)
        # (a WATCHDOG=1 or STATUS= sent just before the HUP may come first)
        reloading = [i for i, m in enumerate(msgs) if m.startswith("RELOADING=1\nMONOTONIC_USEC=")]
        assert reloading and "READY=1" in msgs[reloading[0] + 1:], msgs
        assert c.put("/v1/services/big", json={"vip": "203.0.113.1", "port": 1, "backends": [
            {"address": f"192.0.2.{i}"} for i in range(1, 7)]}).status_code == 422  # new limit in force

        # The TCP listener (inside the netns) wants the bearer token, except for probes.
        script = (
            "import httpx, json\n"
            "u = 'http://127.0.0.1:9180'\n"
            f"t = {{'Authorization': 'Bearer ' + open('{token}').read().strip()}}\n"
            "print(json.dumps([httpx.get(u + '/v1/services').status_code,\n"
            "                  httpx.get(u + '/v1/services', headers={'Authorization': 'Bearer wrong-token-xxxxxxxx'}).status_code,\n"
            "                  httpx.get(u + '/v1/services', headers=t).status_code,\n"
            "                  httpx.get(u + '/healthz').status_code,\n"
            "                  httpx.get(u + '/metrics').headers.get('www-authenticate')]))\n"
        )
        assert json.loads(lab.nsexec(PY, "-c", script).stdout) == [401, 401, 200, 200, 'Bearer realm="l4lbd"']

        # Dropping the listener again.
        del lab.config["api"]["tcp"]
        lab.write_config()
        _reload(lab, "configuration reloaded")
        assert "API no longer listening on tcp:127.0.0.1:9180" in lab.log_text()
        refused = lab.nsexec(PY, "-c", "import httpx; httpx.get('http://127.0.0.1:9180/healthz')", check=False)
        assert refused.returncode != 0 and "ConnectError" in refused.stderr
        assert c.get("/healthz").status_code == 200  # the unix socket stays

        # M back to the running value: nothing is pending any more (the list used to only grow).
        lab.config["datapath"]["maglev_m"] = 251
        lab.config["limits"]["max_backends_per_service"] = 64
        lab.write_config()
        notify.clear()
        _reload(lab, "configuration reloaded")
        assert c.get("/v1/status").json()["pending_restart"] == []
        wait_for(lambda: any(m.startswith("STATUS=") for m in notify.texts()), what="STATUS= after the reload")
        statuses = [m for m in notify.texts() if m.startswith("STATUS=")]
        assert "restart needed" not in statuses[-1], statuses


def test_sighup_dropping_an_interface_detaches_it(lab: DaemonLab) -> None:
    running(lab)
    if "lbt1a" not in lab.config["datapath"]["interfaces"]:
        if lab.nsexec("ip", "link", "show", "lbt1a", check=False).returncode != 0:
            lab.add_veth("lbt1")
        lab.config["datapath"]["interfaces"] = ["lbt0a", "lbt1a"]
        lab.write_config()
        _reload(lab, "configuration reloaded")
    assert lab.xdp_prog_id("lbt1a") is not None
    lab.config["datapath"]["interfaces"] = ["lbt0a"]
    lab.write_config()
    _reload(lab, "configuration reloaded")
    with lab.client() as c:
        assert c.get("/v1/status").json()["interfaces"] == {"lbt0a": "generic"}
    assert lab.xdp_prog_id("lbt1a") is None


# --- refusing to start, and --detach ----------------------------------------------------------------------------------


def _run_daemon(lab: DaemonLab, config_text: str) -> subprocess.CompletedProcess[str]:
    path = lab.dir / "other.toml"
    path.write_text(config_text)
    return subprocess.run(["ip", "netns", "exec", lab.ns, PY, "-m", "l4lb.daemon", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=lab.dir)


@pytest.mark.parametrize(("change", "code", "message"), [
    (lambda c: c["datapath"].update(interfaces=["lbt0a", "nosuch0"]), 1,
     "datapath.interfaces: there is no interface named 'nosuch0'"),
    (lambda c: c["datapath"].update(xdp_mode="turbo"), 2, "datapath.xdp_mode"),
    (lambda c: c["api"].update(tcp={"listen": "0.0.0.0:9180"}), 2, "api.tcp: a TCP listener needs token_file"),
])
def test_bad_start_changes_nothing(lab: DaemonLab, change, code: int, message: str) -> None:
    running(lab)
    assert lab.stop() == 0
    prog, maps, pins = lab.xdp_prog_id("lbt0a"), config_maps(lab), sorted(p.name for p in lab.bpffs.rglob("*"))
    cfg = json.loads(json.dumps(lab.config))
    change(cfg)
    cp = _run_daemon(lab, to_toml(cfg))
    assert cp.returncode == code and message in cp.stderr, cp.stderr
    assert lab.xdp_prog_id("lbt0a") == prog and config_maps(lab) == maps
    assert sorted(p.name for p in lab.bpffs.rglob("*")) == pins and not lab.socket.exists()


def test_detach_removes_xdp_and_keeps_maps(lab: DaemonLab) -> None:
    running(lab)
    assert lab.stop() == 0
    maps = config_maps(lab)
    assert lab.xdp_prog_id("lbt0a") is not None
    cp = lab.run_cli("--detach")
    assert cp.returncode == 0 and "XDP removed from lbt0a" in cp.stdout, cp.stderr
    assert lab.xdp_prog_id("lbt0a") is None
    assert config_maps(lab) == maps  # maps stay pinned: a later start keeps the flows' backends
    lab.start()
    assert lab.xdp_prog_id("lbt0a") is not None
    assert config_maps(lab) == maps


def test_new_backends_get_neighbour_and_next_hop_after_the_answer(lab: DaemonLab) -> None:
    """The daemon answers once the service is in the maps and fills the next-hop
    cache of new backends right after (Datapath.settle), without another request."""
    running(lab)
    lab.nsexec("ip", "addr", "replace", "192.0.2.254/24", "dev", "lbt0a")
    lab.nsexec("ip", "neigh", "replace", "192.0.2.77", "lladdr", "02:00:00:00:00:77", "dev", "lbt0a",
               "nud", "permanent")
    mac = bytes.fromhex("020000000077")

    def cached() -> bool:
        # struct nh_info: ifindex, gen, mtu (u32 each), smac[6], dmac[6]
        return any(v[18:24] == mac and int.from_bytes(v[4:8], "little") for v in lab.dump_maps()["nexthops"].values())

    def neighbour(addr: str) -> str:
        return lab.nsexec("ip", "neigh", "show", addr, "dev", "lbt0a").stdout.strip()

    assert not cached() and neighbour("192.0.2.78") == ""
    with lab.client() as c:
        r = c.put("/v1/services/nh", json={"vip": "198.51.100.11", "port": 80,
                                          "backends": [{"address": "192.0.2.77"}, {"address": "192.0.2.78"}]})
        assert r.status_code == 201, r.text
        try:
            wait_for(cached, what="the next-hop entry of the backend with a known neighbour")
            # The other one has no neighbour yet: the daemon makes the kernel resolve it.
            wait_for(lambda: neighbour("192.0.2.78") != "", what="a neighbour entry for the new backend")
        finally:
            assert c.delete("/v1/services/nh").status_code == 204
