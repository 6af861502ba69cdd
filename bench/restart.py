#!/usr/bin/env python3
"""Restart benchmark (not a test): how long a real l4lbd takes to be ready
again after ``kill -9``, with the pinned program and maps in place.

A real l4lbd (generic XDP on a veth in a private netns, M = 16381) is started
once (compiling the program), given a document, then killed with SIGKILL and
started again, several times. Measured per restart: from spawning the process
to READY=1 on its NOTIFY_SOCKET (what systemd waits for; the API answers by
then). Each restart must keep the attached program (same program id: adopted
from the pins, not compiled) and the services.

Three documents, one after the other in the same daemon: 3 services x 3
backends; N services x B backends (default 1,000 x 100) as bench/apply.py
builds them (IPv4, 100 addresses on 1,000 ports, on a connected route); and
N x B in which every backend is a distinct IPv6 address behind one gateway,
so next-hop resolution has 100,000 addresses to look at. Floors from the same run: the
interpreter importing the daemon's modules, and the first start (BCC compiles
the program). One more row: an upgrade whose program differs (a feature flag)
at the big document, which compiles against the pinned maps and replaces the
program atomically.

The project's modules are byte-compiled first, as ``pip install`` does on a
real box (this VM's sessions set PYTHONDONTWRITEBYTECODE, and an editable
install would otherwise compile ~100 modules from source at every start).
Per document, the median of each phase of the daemon's own start timeline
(l4lb/lifecycle/timeline.py, logged at READY) says where the time went.

Run as root: ``.venv/bin/python bench/restart.py`` (``--quick``: small
documents, one restart each, no target judged).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]

import click  # noqa: E402
import test_daemon_harness as harness  # noqa: E402
from apply import document as apply_document  # noqa: E402 (bench/apply.py: the same 1,000 x 100 document)

from l4lb.lab.bpffs import private_bpffs  # noqa: E402
from l4lb.lifecycle import timeline  # noqa: E402

harness.NS_PREFIX = "rsb"  # this bench's namespaces: rsb-<pid>-<tag>

M = 16381
TARGETS = {"small": 2.0, "big4": 5.0, "big6": 5.0}  # seconds to READY=1 after kill -9
GATEWAY = "2001:db8:ff::fe"


def document(n_services: int, n_backends: int) -> dict[str, Any]:
    """Services on 2001:db8:ff00::/64 VIPs; every backend its own address in 2001:db8:b::/48."""
    return {"services": [
        {"name": f"svc{i:04d}", "vip": f"2001:db8:ff00::{i + 1:x}", "port": 80,
         "backends": [{"address": f"2001:db8:b:{i:x}::{j + 1:x}"} for j in range(n_backends)]}
        for i in range(n_services)]}


class Bench:
    def __init__(self, bpffs: Path, tag: str, n_services: int, n_backends: int) -> None:
        self.lab = harness.DaemonLab(bpffs, tag)
        lab = self.lab
        lab.config["stats_interval"] = 5.0
        lab.config["datapath"].update(maglev_m=M, max_services=max(64, n_services + 24),
                                      max_backends=n_services * n_backends + 4096, flow_table_size=65536)
        lab.config["limits"] = {"max_services": max(32, n_services), "max_backends_per_service": max(64, n_backends)}
        lab.nsexec("ip", "addr", "add", "2001:db8:ff::1/64", "dev", "lbt0a", "nodad")
        lab.nsexec("ip", "addr", "add", "192.0.2.254/24", "dev", "lbt0a")  # apply's backends: on link
        lab.nsexec("ip", "neigh", "replace", GATEWAY, "lladdr", "02:00:00:00:00:fe", "dev", "lbt0a",
                   "nud", "permanent")
        lab.nsexec("ip", "route", "add", "2001:db8:b::/48", "via", GATEWAY, "dev", "lbt0a")
        self.notify = harness.NotifyListener(lab.dir / "notify")
        lab.env["NOTIFY_SOCKET"] = str(self.notify.path)

    def start(self) -> float:
        """Seconds from spawning l4lbd to READY=1."""
        self.notify.clear()
        t0 = time.monotonic()
        self.lab.start(wait=False)
        deadline = t0 + 600
        while not any("READY=1" in m.split("\n") for m in self.notify.texts()):
            assert self.lab.proc is not None
            if self.lab.proc.poll() is not None:
                raise RuntimeError(f"l4lbd exited with {self.lab.proc.returncode}:\n{self.lab.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"l4lbd not ready:\n{self.lab.log_tail()}")
            time.sleep(0.002)
        took = time.monotonic() - t0
        self.lab.wait_ready()
        return took

    def phases(self) -> dict[str, tuple[float, float]]:
        """The daemon's start timeline of its last start."""
        lines = [ln for ln in self.lab.log_text().splitlines() if timeline.PREFIX + ": " in ln]
        if not lines:
            raise RuntimeError("l4lbd logged no start timeline")
        return timeline.parse(lines[-1])

    def restarts(self, runs: int, phases: list[dict[str, tuple[float, float]]]) -> list[float]:
        lab = self.lab
        with lab.client(timeout=600) as c:
            before = c.get("/v1/services").json()
        prog = lab.xdp_prog_id("lbt0a")
        out = []
        for _ in range(runs):
            lab.kill9()
            out.append(self.start())
            phases.append(self.phases())
            if lab.xdp_prog_id("lbt0a") != prog:
                raise RuntimeError("the restart replaced the program (it should have adopted the pinned one)")
            with lab.client(timeout=600) as c:
                if c.get("/v1/services").json() != before:
                    raise RuntimeError("the services changed across the restart")
        if lab.log_text().count("pinned program adopted") < runs:
            raise RuntimeError("a restart compiled the program")
        return out

    def close(self) -> None:
        self.notify.close()
        self.lab.close()


def compile_bytecode() -> None:
    """What pip does at install time: .pyc files for the project's own modules."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "l4lb", "api", "recorder"],
                   check=True, cwd=_ROOT, stdout=subprocess.DEVNULL)


def import_floor(runs: int) -> list[float]:
    """The interpreter importing what l4lbd imports before it can do anything."""
    out = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import l4lb.daemon, l4lb.api.app, l4lb.datapath.engine, uvicorn"],
                       check=True, cwd=_ROOT)
        out.append(time.monotonic() - t0)
    return out


def row(label: str, xs: list[float], target: float | None = None, quick: bool = False) -> None:
    lo, med, hi = min(xs), statistics.median(xs), max(xs)
    judged = "" if target is None else ("(quick: not judged)" if quick else ("PASS" if hi <= target else "MISS"))
    goal = "" if target is None else f"<= {target:.0f} s"
    print(f"  {label:<58}  {len(xs):>4}  {lo:>7.2f} s  {med:>7.2f} s  {hi:>7.2f} s  {goal:>8}  {judged}")


@click.command()
@click.option("--services", "n_services", default=1000, show_default=True, help="services in the big document")
@click.option("--backends", "n_backends", default=100, show_default=True, help="backends per service (big)")
@click.option("--runs", default=5, show_default=True, help="restarts per document")
@click.option("--quick", is_flag=True, help="small documents, one restart each, no target judged")
def main(n_services: int, n_backends: int, runs: int, quick: bool) -> None:
    if quick:
        n_services, n_backends, runs = 20, 10, 1
    results: dict[str, list[float]] = {}
    phases: dict[str, list[dict[str, tuple[float, float]]]] = {}
    compile_bytecode()
    with private_bpffs() as bpffs:
        results["imports"] = import_floor(runs)
        # One daemon, its maps sized for the big document, for both: two compiles in all.
        bench = Bench(bpffs, "rst", n_services, n_backends)
        try:
            results["first"] = [bench.start()]
            for size, doc in (("small", document(3, 3)), ("big4", apply_document(n_services, n_backends)),
                              ("big6", document(n_services, n_backends))):
                with bench.lab.client(timeout=600) as c:
                    c.put("/v1/state", json=doc).raise_for_status()
                time.sleep(1.0)  # let the settle worker finish: a restart meets a settled box
                results[size] = bench.restarts(runs, phases.setdefault(size, []))
            bench.lab.kill9()
            bench.lab.config["datapath"]["nexthop"] = "fib"  # the program differs: compile, replace
            prog = bench.lab.xdp_prog_id("lbt0a")
            results["upgrade"] = [bench.start()]
            if bench.lab.xdp_prog_id("lbt0a") == prog:
                raise RuntimeError("the upgrade did not replace the program")
        except BaseException:
            print(bench.lab.log_tail(), file=sys.stderr)
            raise
        finally:
            if os.environ.get("RESTART_BENCH_LOG"):
                print(bench.lab.log_text(), file=sys.stderr)
            bench.close()
    load = os.getloadavg()[0]
    print(f"\nRestart to READY=1 after kill -9 (M={M}, generic XDP on a veth; load average {load:.1f} "
          f"on {os.cpu_count()} CPUs{'; --quick: figures are not measurements' if quick else ''})")
    print(f"  {'what':<58}  {'runs':>4}  {'min':>9}  {'median':>9}  {'max':>9}  {'target':>8}")
    row("3 services x 3 backends, program and maps adopted", results["small"], TARGETS["small"], quick)
    row(f"{n_services:,} x {n_backends}, bench/apply.py's (addresses shared over ports)", results["big4"],
        TARGETS["big4"], quick)
    row(f"{n_services:,} x {n_backends}, {n_services * n_backends:,} distinct IPv6 addresses", results["big6"],
        TARGETS["big6"], quick)
    print("  floors and comparisons (same run):")
    row("python importing the daemon's modules", results["imports"])
    row("first start, no services (BCC compiles the program)", results["first"])
    row(f"upgrade at {n_services:,} x {n_backends}: program differs, compiled", results["upgrade"])
    names = [*(p for p in phases["small"][0] if p != "total"), "total"]
    print("\n  where a restart's time goes: l4lbd's start timeline (since its exec), median seconds per phase,"
          " wall / CPU of the daemon")
    print(f"  {'document':<10}" + "".join(f"  {n:>16}" for n in names))
    for size in ("small", "big4", "big6"):
        cells = []
        for n in names:
            wall = statistics.median(p.get(n, (0.0, 0.0))[0] for p in phases[size])
            cpu = statistics.median(p.get(n, (0.0, 0.0))[1] for p in phases[size])
            cells.append(f"{wall:.2f} / {cpu:.2f}")
        print(f"  {size:<10}" + "".join(f"  {c:>16}" for c in cells))


if __name__ == "__main__":
    main()
