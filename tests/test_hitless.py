"""Hitless restart: with curl traffic flowing through the VIP of a real l4lbd
in the netns lab, `kill -9` the daemon and start it again, twice: the same
version (the pinned program is adopted, not compiled, and stays attached:
same program id), then an upgrade whose program differs (compiled, and
replaced atomically). No request fails, the XDP program is never missing
from the NIC, and the services are the same afterwards."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from l4lb.lab.l4lbd import L4lbd, default_config, xdp_prog_id
from l4lb.lab.topology import Lab

pytestmark = [pytest.mark.netns, pytest.mark.bpf]


class Traffic(threading.Thread):
    """curl through the VIP from every client, one new connection after another."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.ok = 0
        self.failed: list[str] = []
        self.backends: set[str] = set()
        self.stop_flag = threading.Event()

    def run(self) -> None:
        urls = [self.lab.url(self.lab.vip4), self.lab.url(self.lab.vip6)]
        while not self.stop_flag.is_set():
            for client in self.lab.clients:
                for url in urls:
                    r = self.lab.curl(client, url)
                    if r.ok and r.backend:
                        self.ok += 1
                        self.backends.add(r.backend)
                    else:
                        self.failed.append(f"{client} {url}: {r.stderr.strip() or r.fields}")


class XdpWatch(threading.Thread):
    """Polls the LB NIC's XDP program id: records every id seen, and any gap."""

    def __init__(self, ns: str, iface: str) -> None:
        super().__init__(daemon=True)
        self.ns, self.iface = ns, iface
        self.ids: list[int | None] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            pid = xdp_prog_id(self.ns, self.iface)
            if not self.ids or self.ids[-1] != pid:
                self.ids.append(pid)
            time.sleep(0.02)


def test_kill9_and_restart_loses_no_request(bpffs: Path, lab_decap) -> None:
    with Lab(clients=2, backends=3, prefix="l4hl", decap=lab_decap) as lab:
        work = Path(tempfile.mkdtemp(prefix="l4lbd-hitless-"))
        pins = bpffs / f"hitless-{lab.tag}"
        pins.mkdir()
        cfg = default_config(work, pins, [lab.lb_if])
        cfg["datapath"]["xdp_mode"] = "native"
        daemon = L4lbd(lab.lb_ns, work, cfg)
        try:
            daemon.start()
            with daemon.client() as c:
                for name, vip, fam in (("web4", lab.vip4, 0), ("web6", lab.vip6, 1)):
                    body = {"vip": vip, "port": 80,
                            "backends": [{"address": a[fam]} for a in lab.backend_addrs.values()]}
                    r = c.put(f"/v1/services/{name}", json=body)
                    assert r.status_code == 201, r.text
                before = c.get("/v1/services").json()
            first_id = xdp_prog_id(lab.lb_ns, lab.lb_if)
            assert first_id is not None

            traffic, watch = Traffic(lab), XdpWatch(lab.lb_ns, lab.lb_if)
            traffic.start()
            watch.start()
            time.sleep(1.5)
            served_before_kill = traffic.ok
            daemon.kill9()
            time.sleep(1.0)                      # traffic with no daemon at all
            served_while_down = traffic.ok
            daemon.start()                       # same version: adopts the pinned program and maps
            time.sleep(1.5)
            served_after_restart = traffic.ok
            daemon.kill9()
            cfg["datapath"]["nexthop"] = "fib"   # an upgrade whose program differs (same map layout)
            daemon.start()                       # compiles, reuses the pinned maps, replaces the program
            time.sleep(1.5)
            traffic.stop_flag.set()
            traffic.join(60)
            watch.stop_flag.set()
            watch.join(10)

            assert traffic.failed == [], f"{len(traffic.failed)} failed requests, e.g. {traffic.failed[:3]}"
            assert served_before_kill > 0 and served_while_down > served_before_kill
            assert served_after_restart > served_while_down, "no request was served after the restart"
            assert traffic.ok > served_after_restart, "no request was served after the upgrade"
            assert traffic.backends == set(lab.backends), "every backend serves"
            # Never without a program: the first one across the restart, then (atomically) the new one.
            assert None not in watch.ids, f"the NIC was without XDP: {watch.ids}"
            assert watch.ids[0] == first_id and len(watch.ids) == 2 and watch.ids[1] != first_id, watch.ids
            with daemon.client() as c:
                assert c.get("/v1/services").json() == before
            log = daemon.log_text()
            assert log.count("pinned program adopted, not compiled") == 1 and "(compiled;" in log
            assert f"replaced XDP program id {first_id} atomically" in log
        finally:
            daemon.kill()
            shutil.rmtree(work, ignore_errors=True)
