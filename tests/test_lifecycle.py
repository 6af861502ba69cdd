"""The daemon's lifecycle through the real l4lbd (real datapath, private netns):

* one instance: a second l4lbd with the same config, another state directory on
  the same bpffs, another bpffs on the same interface, or the same state
  directory, exits non-zero naming the first one's pid, while packets flow
  through the first one's program; its maps, its program and its answers are
  unchanged afterwards;
* the store against the pinned maps: a missing, zero-length, another store's
  or an older store is refused with the ways out, changing nothing; those ways
  out work: --adopt-datapath rebuilds the state from the maps (names, ports,
  options, states, weights recovered from the table in force) and rewrites no
  map, --trust-store converges to the older store, --reset empties the maps;
* a restart of an unchanged state adopts the pinned program and writes no map.

One lab and one compile for the module: every later start adopts the pinned
program (so the module also shows that this works), and the tests run in order.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_daemon_harness import DaemonLab, dump_pinned_maps, to_toml

from l4lb.lab.l4lbd import PY
from l4lb.store import Store

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

RUNTIME = ("svc_stats", "backend_stats", "reason_stats", "icmp_buckets", "flows", "frags", "cache_epoch")
VIP = "198.51.100.10"
STATE = {"services": [
    {"name": "web", "vip": VIP, "port": 80, "options": {"l4_dnat": True}, "backends": [
        {"address": "192.0.2.1", "weight": 200}, {"address": "192.0.2.2", "weight": 100},
        {"address": "192.0.2.3", "port": 8080, "weight": 100},
        {"address": "192.0.2.4", "state": "draining"}, {"address": "192.0.2.5", "state": "maintenance"}]},
    {"name": "dns", "vip": "2001:db8::53", "port": 53, "protocol": "udp", "options": {"hash_src_port": False},
     "backends": [{"address": "2001:db8::1"}, {"address": "2001:db8::2"}, {"address": "2001:db8::3"}]},
]}


def config_maps(lab: DaemonLab) -> dict[str, dict[bytes, bytes]]:
    return {k: v for k, v in lab.dump_maps().items() if k not in RUNTIME}


def packets(lab: DaemonLab) -> int:
    """Packets the first service has seen (per-CPU counters summed), read from its pinned map."""
    raw = lab.dump_maps()["svc_stats"]
    return sum(int.from_bytes(v[i:i + 8], "little") for v in raw.values() for i in range(0, len(v), 16))


class Traffic(threading.Thread):
    """TCP SYNs to the VIP sent into the LB's veth peer, so the first daemon's
    program handles packets while the second instance tries to start."""

    def __init__(self, lab: DaemonLab) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self) -> None:
        code = ("from scapy.all import Ether, IP, TCP, sendp\n"
                f"p = Ether(dst='02:00:00:00:00:01') / IP(src='203.0.113.7', dst='{VIP}') / TCP(dport=80)\n"
                "sendp(p, iface='lbt0b', loop=1, inter=0.005, verbose=False)\n")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.lab.ns, PY, "-c", code])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def lab(bpffs: Path):
    the_lab = DaemonLab(bpffs, "life")
    try:
        the_lab.start()
        with the_lab.client() as c:
            c.put("/v1/state", json=STATE).raise_for_status()
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def traffic(lab: DaemonLab):
    t = Traffic(lab)
    t.start()
    deadline = time.monotonic() + 20
    first = packets(lab)
    while packets(lab) == first:
        assert time.monotonic() < deadline, "no packet reached the program"
        time.sleep(0.1)
    yield t
    t.stop()


def snapshot(lab: DaemonLab) -> tuple[Any, ...]:
    with lab.client() as c:
        return config_maps(lab), lab.xdp_prog_id("lbt0a"), c.get("/v1/state").json(), c.get("/v1/state").headers["etag"]


def second(lab: DaemonLab, name: str, change: dict[str, Any], ns: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run another l4lbd with the first one's config changed by ``change`` (dotted keys) to its end."""
    import copy

    doc = copy.deepcopy(lab.config)
    for dotted, value in change.items():
        *path, key = dotted.split(".")
        node = doc
        for p in path:
            node = node[p]
        node[key] = value
    path = lab.dir / f"{name}.toml"
    path.write_text(to_toml(doc))
    return subprocess.run(["ip", "netns", "exec", ns or lab.ns, PY, "-m", "l4lb.daemon", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)


SECOND = {
    "identical": {},
    "other-state-dir": {"state_dir": "{dir}/state2", "api.socket": "{dir}/run2/l4lbd.sock"},
    "other-bpffs-same-nic": {"state_dir": "{dir}/state3", "api.socket": "{dir}/run3/l4lbd.sock",
                             "datapath.bpffs": "{bpffs}-other"},
    "same-state-dir": {"api.socket": "{dir}/run4/l4lbd.sock", "datapath.bpffs": "{bpffs}-other",
                       "datapath.interfaces": ["lbt1a"]},
}


@pytest.mark.parametrize("name", SECOND)
def test_a_second_instance_exits_naming_the_first_and_changes_nothing(lab: DaemonLab, traffic: Traffic,
                                                                      name: str) -> None:
    assert lab.proc is not None and lab.proc.poll() is None
    other_bpffs = Path(f"{lab.bpffs}-other")
    other_bpffs.mkdir(exist_ok=True)
    if name == "same-state-dir":
        lab.nsexec("ip", "link", "add", "lbt1a", "type", "veth", "peer", "name", "lbt1b", check=False)
    before, seen = snapshot(lab), packets(lab)
    change = {k: (v.format(dir=lab.dir, bpffs=lab.bpffs) if isinstance(v, str) else v)
              for k, v in SECOND[name].items()}
    cp = second(lab, name, change)
    assert cp.returncode != 0, cp.stderr
    why = cp.stderr
    if name == "other-bpffs-same-nic":
        assert "runs another l4lbd's program" in why and "refusing to replace it" in why.lower(), why
        assert not any(other_bpffs.iterdir()), "the refused instance left pins behind"
    else:
        assert f"another l4lbd (pid {lab.proc.pid}) holds the lock" in why, why
    assert "nothing was changed" in why.lower(), why
    # The first daemon: same maps, same program, same answers, still forwarding, still writable.
    assert snapshot(lab) == before
    deadline = time.monotonic() + 10
    while packets(lab) == seen:
        assert time.monotonic() < deadline, "the first daemon's program stopped seeing packets"
        time.sleep(0.1)
    with lab.client() as c:
        r = c.patch("/v1/services/web/backends/192.0.2.2", json={"weight": 100})
        assert r.status_code == 200, r.text
    shutil.rmtree(other_bpffs, ignore_errors=True)


# --- the store against the pinned maps -------------------------------------------------------------------------------


def stopped(lab: DaemonLab) -> tuple[Any, ...]:
    """Stop the daemon (TERM: XDP and maps stay) and return (maps, program id)."""
    if lab.proc is not None and lab.proc.poll() is None:
        assert lab.stop() == 0
    return config_maps(lab), lab.xdp_prog_id("lbt0a")


def started_then_stopped(lab: DaemonLab) -> tuple[int, Any, Any]:
    """Start the daemon, note its revision, stop it: (revision, maps, program id)."""
    lab.start()
    with lab.client() as c:
        revision = int(c.get("/v1/state").headers["x-l4lb-revision"])
    return (revision, *stopped(lab))


def refused(lab: DaemonLab, *words: str) -> str:
    """Start l4lbd as it is configured: it must exit non-zero with ``words`` in its reason."""
    cp = lab.run_cli()
    assert cp.returncode != 0, cp.stderr[-2000:]
    why = next(line for line in cp.stderr.splitlines() if "cannot start" in line)
    for w in ("--adopt-datapath", "--reset", "Nothing was changed", *words):
        assert w in why, why
    return why


def db(lab: DaemonLab) -> Path:
    return lab.dir / "state" / "state.sqlite3"


def move_store(lab: DaemonLab, to: Path) -> None:
    to.mkdir(exist_ok=True)
    for f in db(lab).parent.glob("state.sqlite3*"):
        f.rename(to / f.name)


def test_a_missing_or_empty_store_is_refused_and_changes_nothing(lab: DaemonLab) -> None:
    maps, prog = stopped(lab)
    saved = lab.dir / "saved"
    move_store(lab, saved)
    try:
        refused(lab, "is missing", "hold 2 services")
        assert not db(lab).exists(), "the refused start created a store"
        db(lab).touch()
        refused(lab, "is missing")  # zero length: what SQLite would turn into a new, empty store
        assert db(lab).stat().st_size == 0
        assert (config_maps(lab), lab.xdp_prog_id("lbt0a")) == (maps, prog)
    finally:
        for f in db(lab).parent.glob("state.sqlite3*"):
            f.unlink()
        move_store_back(lab, saved)


def move_store_back(lab: DaemonLab, saved: Path) -> None:
    for f in saved.glob("state.sqlite3*"):
        f.rename(db(lab).parent / f.name)


def test_another_stores_and_an_older_store_are_refused_and_trust_store_takes_the_older(lab: DaemonLab) -> None:
    revision, maps, prog = started_then_stopped(lab)
    saved = lab.dir / "saved"
    shutil.copytree(db(lab).parent, saved, dirs_exist_ok=True)  # this store, at `revision`
    try:
        # Another box's store: a store of its own with one service.
        for f in db(lab).parent.glob("state.sqlite3*"):
            f.unlink()
        other = STATE["services"][1]
        with Store(db(lab)) as s:
            from l4lb.models import DesiredState

            with s.write(0, DesiredState.model_validate({"services": [other]}), at_least=revision + 5):
                pass
        refused(lab, "is not the one the maps were converged from", "--trust-store")
        assert (config_maps(lab), lab.xdp_prog_id("lbt0a")) == (maps, prog)
        # An older copy of this very store: the maps have moved on since.
        for f in db(lab).parent.glob("state.sqlite3*"):
            f.unlink()
        for f in saved.glob("state.sqlite3*"):
            shutil.copy(f, db(lab).parent / f.name)
        lab.start()
        with lab.client() as c:
            c.delete("/v1/services/dns").raise_for_status()
        newer = stopped(lab)
        for f in db(lab).parent.glob("state.sqlite3*"):
            f.unlink()
        for f in saved.glob("state.sqlite3*"):
            shutil.copy(f, db(lab).parent / f.name)
        refused(lab, f"is at revision {revision}, behind the maps", "--trust-store")
        assert stopped(lab) == newer
        # Told so, it converges the maps to the older store.
        lab.start(args=("--trust-store",))
        with lab.client() as c:
            assert [s["name"] for s in c.get("/v1/services").json()["services"]] == ["dns", "web"]
        assert len(stopped(lab)[0]["services"]) == 2
    finally:
        shutil.rmtree(saved, ignore_errors=True)


def test_adopt_datapath_rebuilds_the_state_from_the_maps_and_rewrites_nothing(lab: DaemonLab) -> None:
    old_revision, maps, prog = started_then_stopped(lab)
    saved = lab.dir / "saved-adopt"
    move_store(lab, saved)
    try:
        lab.start(args=("--adopt-datapath",))
        assert (config_maps(lab), lab.xdp_prog_id("lbt0a")) == (maps, prog), "adopting rewrote the datapath"
        with lab.client() as c:
            state = c.get("/v1/state")
        assert int(state.headers["x-l4lb-revision"]) >= 1
        got = {s["name"]: s for s in state.json()["services"]}
        assert set(got) == {"tcp-198.51.100.10-80", "udp-2001.db8..53-53"}
        web = got["tcp-198.51.100.10-80"]
        assert web["options"]["l4_dnat"] is True and web["options"]["hash_src_port"] is True
        backends = {b["address"]: (b["port"], b["weight"], b["state"]) for b in web["backends"]}
        # Weights come back as ratios reproducing the table (200:100:100 -> 2:1:1, smallest 100).
        assert backends == {"192.0.2.1": (None, 200, "active"), "192.0.2.2": (None, 100, "active"),
                            "192.0.2.3": (8080, 100, "active"), "192.0.2.4": (None, 100, "draining"),
                            "192.0.2.5": (None, 100, "maintenance")}, backends
        dns = got["udp-2001.db8..53-53"]
        assert dns["options"]["hash_src_port"] is False and len(dns["backends"]) == 3
        assert "adopted 2 services from the maps (2 tables reproduced exactly)" in lab.log_text()
        assert old_revision > 0
    finally:
        stopped(lab)
        shutil.rmtree(saved, ignore_errors=True)


def service_entries(lab: DaemonLab) -> dict[bytes, bytes]:
    """The services map as it is, the buffer each entry points at included: a table
    built again would be written into a spare buffer and the entry moved to it."""
    from test_daemon_harness import _dump_fd, _libbpf

    lib = _libbpf()
    fd = lib.bpf_obj_get(str(lab.pin_dirs()[0] / "services").encode())
    try:
        return _dump_fd(lib, fd)
    finally:
        os.close(fd)


def test_a_restart_of_an_unchanged_state_adopts_the_program_and_writes_no_map(lab: DaemonLab) -> None:
    maps, prog = stopped(lab)  # as the adopting daemon left them
    entries = service_entries(lab)
    before = lab.log_text().count("pinned program adopted, not compiled")
    lab.start()
    assert (config_maps(lab), lab.xdp_prog_id("lbt0a"), service_entries(lab)) == (maps, prog, entries)
    assert lab.log_text().count("pinned program adopted, not compiled") == before + 1
    assert "2 of 2 services taken as they are (no table built)" in lab.log_text()
    lab.kill9()
    lab.start()  # kill -9: the same
    assert (config_maps(lab), lab.xdp_prog_id("lbt0a"), service_entries(lab)) == (maps, prog, entries)


def test_reset_starts_empty_on_purpose(lab: DaemonLab) -> None:
    stopped(lab)
    lab.start(args=("--reset",))
    with lab.client() as c:
        assert c.get("/v1/services").json()["services"] == []
    assert config_maps(lab)["services"] == {}
    assert "reset on purpose: the maps held 2 services" in lab.log_text()
    lab.send(signal.SIGTERM)


def test_unroutable_backends_are_logged_once_per_change_not_per_refresh(lab: DaemonLab) -> None:
    """100 backends without a route, next hops refreshed every 0.2 s: one summary
    line, and one more when the condition goes away (issue 11, item 7)."""
    if lab.proc is not None and lab.proc.poll() is None:
        assert lab.stop() == 0
    lab.config["stats_interval"] = 0.2
    lab.start()
    mark = len(lab.log_text())
    many = {"services": [{"name": f"far{i}", "vip": f"198.51.100.{20 + i}", "port": 80,
                          "backends": [{"address": f"203.0.113.{1 + 50 * i + j}"} for j in range(50)]}
                         for i in range(2)]}
    with lab.client() as c:
        c.put("/v1/state", json=many).raise_for_status()
    time.sleep(2.5)  # a dozen refreshes
    lab.nsexec("ip", "addr", "add", "192.0.2.254/24", "dev", "lbt0a")
    lab.nsexec("ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.1")
    time.sleep(1.5)
    lines = [line for line in lab.log_text()[mark:].splitlines() if "route" in line and "upkeep" in line]
    assert len(lines) == 2, lines
    assert "100 backends have no route" in lines[0] and "203.0.113.1, 203.0.113.10, 203.0.113.100, +97 more" \
        in lines[0], lines
    assert "every backend has a route again" in lines[1]
    lab.config["stats_interval"] = 1.0
    assert lab.stop() == 0


def test_maps_of_another_layout_are_not_adopted_and_a_start_fills_this_layout(lab: DaemonLab) -> None:
    """An upgrade across a map layout change (issue 16 changed maps.h): an older
    version's pins live under another ``maps-<layout digest>`` directory, which
    this version never opens as its own. --adopt-datapath refuses, naming the
    version; a start with the store converges maps of this layout, replaces
    the old program atomically and drops the old pins (established flows then
    go by Maglev: the old flow table cannot be read)."""
    if lab.proc is not None and lab.proc.poll() is None:
        assert lab.stop() == 0
    lab.start()
    with lab.client() as c:
        c.put("/v1/state", json=STATE).raise_for_status()
    maps, prog = stopped(lab)
    [cur] = lab.pin_dirs()
    older = cur.with_name("maps-0123456789ab")   # as an older version's layout digest names it
    cur.rename(older)
    saved = lab.dir / "saved-layout"
    try:
        move_store(lab, saved)
        cp = lab.run_cli("--adopt-datapath")
        assert cp.returncode != 0, cp.stderr[-2000:]
        why = next(line for line in cp.stderr.splitlines() if "cannot start" in line)
        assert "by an l4lb version with another map layout" in why and str(older) in why, why
        assert lab.pin_dirs() == [older] and lab.xdp_prog_id("lbt0a") == prog, "a refused start changed something"
        move_store_back(lab, saved)
        lab.start()
        with lab.client() as c:
            assert {s["name"] for s in c.get("/v1/services").json()["services"]} == {s["name"] for s in
                                                                                     STATE["services"]}
        assert lab.pin_dirs() == [cur], "the older layout's pins go once this version's program is attached"
        now = dump_pinned_maps(cur)["services"]   # ids may differ: fresh maps allocate anew
        assert {k: v[4:8] for k, v in now.items()} == {k: v[4:8] for k, v in maps["services"].items()}, \
            "this layout's maps hold the store's services with their flags"
        assert lab.xdp_prog_id("lbt0a") not in (None, prog), "the program of this version replaced the old one"
        assert lab.stop() == 0
    finally:
        shutil.rmtree(older, ignore_errors=True)
