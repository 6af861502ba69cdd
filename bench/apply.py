#!/usr/bin/env python3
"""Apply benchmark (not a test): how fast desired state reaches the datapath.

A real l4lbd (real BPF datapath, generic XDP on a veth) runs in a private
netns and is reached over its unix socket. Measured, client side:

* PUT /v1/state of N services x B backends (default 1000 x 100, M = 16381);
  every service has its own backend set (192.0.2.x with a per-service DNAT
  port), so every Maglev table differs and nothing can be shared;
* single-backend drains (PATCH state=draining, then back to active): p50/p99/max
  from request to answer, with one service and at the N x B state. The API
  answers only once the change is durable and in the maps.

The daemon logs each revision's phases (plan, store, datapath and its parts);
the bench prints their medians. Floors measured in the same run: one Maglev
build, one table swap (new inner map + outer update, for which the kernel
waits an RCU grace period), one store commit of the N x B document, and a
GET /healthz round trip.

Run as root: ``.venv/bin/python bench/apply.py`` (``--help`` for sizes; ``--quick``: 20 services x
10 backends and 5 drain pairs, every step in seconds, for tests/test_bench.py: its figures are not
measurements and its targets are not judged).
"""

from __future__ import annotations

import ctypes as ct
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT), str(_ROOT / "tests")]

import click  # noqa: E402
import numpy as np  # noqa: E402
import test_daemon_harness as harness  # noqa: E402

from l4lb import maglev  # noqa: E402
from l4lb.datapath import libbpf  # noqa: E402
from l4lb.lab.bpffs import private_bpffs  # noqa: E402
from l4lb.models import BackendState, DesiredState  # noqa: E402
from l4lb.store import Store  # noqa: E402

harness.NS_PREFIX = "apb"  # this bench's namespaces: apb-<pid>-<tag>

M = 16381
SEED = b"l4lb-default"
PORTS = (80, 443, 8080, 8443)
TARGET_PUT_S = 5.0
TARGET_DRAIN_P99_MS = 20.0
QUICK = {"n_services": 20, "n_backends": 10, "n_drains": 5}
# Server-side phases as the daemon logs them (datapath's parts indented).
PHASES = ("plan", "store", "datapath", "reconcile", "maglev", "maps", "grace", "neighbours", "nexthops")
NESTED = ("reconcile", "maglev", "maps", "grace", "neighbours", "nexthops")


# --- the document ----------------------------------------------------------------------------


def vips() -> list[str]:
    return [f"198.51.100.{h}" for h in range(1, 251)] + [f"203.0.113.{h}" for h in range(1, 251)]


def backend_port(i: int, generation: int = 0) -> int:
    return 10000 + i + 20000 * generation


def service(i: int, n_backends: int, generation: int = 0) -> dict[str, Any]:
    pool = vips()
    return {
        "name": f"svc{i:04d}", "vip": pool[i % len(pool)], "port": PORTS[i // len(pool)],
        "options": {"l4_dnat": True},
        "backends": [{"address": f"192.0.2.{1 + j}", "port": backend_port(i, generation)} for j in range(n_backends)],
    }


def document(n_services: int, n_backends: int, generation: int = 0) -> dict[str, Any]:
    """``generation`` 1: the same services, every backend another one (a full replacement)."""
    if n_services > len(vips()) * len(PORTS) or n_backends > 250:
        raise click.UsageError(f"at most {len(vips()) * len(PORTS)} services and 250 backends per service")
    return {"services": [service(i, n_backends, generation) for i in range(n_services)]}


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of process ``pid`` now (all, anonymous, file-backed) and its peak, MB.
    File-backed includes the Maglev table buffers mapped from the kernel's maps."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


# --- measuring ---------------------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (the Maglev workers)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile
            pass
    return total


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


PHASE_RE = re.compile(r"(\w+)=([0-9.]+)s\b")


def phases(log: str, revision: int) -> dict[str, float]:
    """Server-side phase times of one revision, from the daemon's log line."""
    for line in log.splitlines():
        m = re.search(rf"revision {revision} applied in ([0-9.]+)s", line)
        if m:
            return {"total": float(m.group(1)), **{k: float(v) for k, v in PHASE_RE.findall(line)}}
    return {}


def drains(lab: harness.DaemonLab, n_services: int, n_backends: int, count: int) -> dict[str, Any]:
    """`count` drains of random backends, each followed by its undo; latencies of both."""
    rng = random.Random(7)
    lat: list[float] = []
    revs: list[int] = []
    with lab.client() as c:
        for _ in range(count):
            i, j = rng.randrange(n_services), rng.randrange(n_backends)
            url = f"/v1/services/svc{i:04d}/backends/192.0.2.{1 + j}:{backend_port(i)}"
            for state in ("draining", "active"):
                t0 = time.perf_counter()
                r = c.patch(url, json={"state": state})
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"PATCH {url} -> {r.status_code}: {r.text[:300]}")
                revs.append(int(r.headers["x-l4lb-revision"]))
    log = lab.log_text()
    per_rev = [phases(log, rv) for rv in revs]
    logged = [k for k in PHASES if any(k in p for p in per_rev)]
    return {"lat": lat, "phases": {k: statistics.median(p.get(k, 0.0) for p in per_rev) for k in logged}}


def table_swap_floor(ids: np.ndarray) -> dict[str, float]:
    """One table swap as the datapath does it, on a private outer map: create an
    mmapable inner array, fill it, update the outer slot (the kernel then waits
    for an RCU grace period); and the fill alone by a batch-update syscall."""
    keys = np.arange(M, dtype=np.uint32)
    template = libbpf.array_create("apb_tmpl", 4, M, libbpf.BPF_F_MMAPABLE)
    outer = libbpf.map_create(libbpf.BPF_MAP_TYPE_ARRAY_OF_MAPS, "apb_outer", 4, 4, 4, inner_map_fd=template)

    def swap(update_outer: bool, by_syscall: bool = False) -> None:
        fd = libbpf.array_create("apb_inner", 4, M, 0 if by_syscall else libbpf.BPF_F_MMAPABLE)
        try:
            if by_syscall:
                libbpf.update_batch(fd, keys, ids)
            else:
                libbpf.array_fill_mmapped(fd, ids)
            if update_outer:
                libbpf.map_update(outer, ct.c_uint32(0), ct.c_uint32(fd))
        finally:
            os.close(fd)

    try:
        return {"swap": statistics.median(timed(lambda: swap(True), 20)),
                "fill": statistics.median(timed(lambda: swap(False), 20)),
                "fill_syscall": statistics.median(timed(lambda: swap(False, True), 20))}
    finally:
        os.close(outer)
        os.close(template)


def store_floor(doc: dict[str, Any], n: int = 20) -> list[float]:
    """Commit (synchronous=FULL) of the whole document with one backend changed, as
    every drain does; in a directory on the same filesystem as the daemon's state."""
    state = DesiredState.model_validate(doc)
    with tempfile.TemporaryDirectory(prefix="apb-store-") as d, Store(Path(d) / "floor.sqlite3") as store:
        with store.write(0, state):
            pass
        out = []
        for i in range(n):
            svc = state.services[i % len(state.services)]
            b0 = svc.backends[0]
            flipped = b0.model_copy(update={"state": BackendState.draining if b0.state is BackendState.active
                                            else BackendState.active})
            new = svc.model_copy(update={"backends": [flipped, *svc.backends[1:]]})
            state = DesiredState.model_construct(services=[new if s is svc else s for s in state.services])
            t0 = time.perf_counter()
            with store.write(i + 1, state):
                pass
            out.append(time.perf_counter() - t0)
        return out


def floors(lab: harness.DaemonLab, doc: dict[str, Any], n_backends: int) -> dict[str, float]:
    weights = {(f"192.0.2.{1 + j}", backend_port(0)): 100 for j in range(n_backends)}
    maglev.build(weights, M, SEED)
    out = {"maglev_build": statistics.median(timed(lambda: maglev.build(weights, M, SEED), 20))}
    out.update(table_swap_floor(np.arange(1, M + 1, dtype="<u4")))
    commits = store_floor(doc)
    out.update(store_p50=pct(commits, 50), store_p99=pct(commits, 99))
    with lab.client() as c:
        c.get("/healthz")
        rtt = timed(lambda: c.get("/healthz").raise_for_status(), 200)
    out.update(healthz_p50=pct(rtt, 50), healthz_p99=pct(rtt, 99))
    return out


# --- the run -----------------------------------------------------------------------------------


def configure(lab: harness.DaemonLab, n_services: int, n_backends: int) -> None:
    lab.config["stats_interval"] = 5.0  # the shipped default: the sampler runs during the drains, as in production
    lab.config["datapath"].update(maglev_m=M, max_services=max(64, n_services + 24),
                                  max_backends=n_services * n_backends + 4096, flow_table_size=65536)
    lab.config["limits"] = {"max_services": max(32, n_services), "max_backends_per_service": max(64, n_backends)}
    # Backends get a connected route, so neighbour upkeep does what it does on a real box.
    lab.nsexec("ip", "addr", "add", "192.0.2.254/24", "dev", "lbt0a")


def row(label: str, value: str, target: str = "", verdict: str = "") -> None:
    print(f"  {label:<58} {value:>12}  {target:>10}  {verdict}")


def verdict(ok: bool, judge: bool) -> str:
    return ("PASS" if ok else "MISS") if judge else "not judged (--quick)"


def header() -> None:
    row("", "measured", "target", "verdict")


def print_phases(p: dict[str, float]) -> None:
    for k in PHASES:
        if k in p:
            row(f"    server: {'  ' if k in NESTED else ''}{k}", f"{p[k] * 1e3:.1f} ms")


def print_drains(title: str, d: dict[str, Any], judge: bool) -> None:
    lat = [x * 1e3 for x in d["lat"]]
    p99 = pct(lat, 99)
    print(f"\n{title} ({len(lat)} PATCHes: drain + undo)")
    header()
    row("p50", f"{pct(lat, 50):.1f} ms")
    row("p99", f"{p99:.1f} ms", f"<= {TARGET_DRAIN_P99_MS:.0f} ms", verdict(p99 <= TARGET_DRAIN_P99_MS, judge))
    row("max", f"{max(lat):.1f} ms")
    # A drain builds its service's new Maglev table; its undo points back at the
    # buffer that still holds the old one (no build).
    for what, half in (("drains", lat[0::2]), ("undos", lat[1::2])):
        row(f"  {what} alone: p50 / p99 / max", f"{pct(half, 50):.1f}/{pct(half, 99):.1f}/{max(half):.1f} ms")
    if d["phases"]:
        print("  median per request:")
        print_phases(d["phases"])


@click.command()
@click.option("--services", "n_services", default=1000, show_default=True, help="services in the big document")
@click.option("--backends", "n_backends", default=100, show_default=True, help="backends per service")
@click.option("--drains", "n_drains", default=100, show_default=True,
              help="drain+undo pairs per state (2 PATCHes each)")
@click.option("--quick", is_flag=True,
              help=f"smoke run: {QUICK['n_services']} x {QUICK['n_backends']}, {QUICK['n_drains']} drain pairs; "
                   "figures are not measurements, targets not judged")
def main(n_services: int, n_backends: int, n_drains: int, quick: bool) -> None:
    if quick:
        n_services, n_backends, n_drains = QUICK["n_services"], QUICK["n_backends"], QUICK["n_drains"]
    judge = not quick
    doc = document(n_services, n_backends)
    with private_bpffs() as bpffs:
        lab = harness.DaemonLab(bpffs, "apply")
        try:
            configure(lab, n_services, n_backends)
            t0 = time.monotonic()
            lab.start()
            print(f"l4lbd ready in {time.monotonic() - t0:.1f}s (netns {lab.ns}, M={M}, "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
            fl = floors(lab, doc, n_backends)
            with lab.client(timeout=600) as c:
                c.put("/v1/state", json={"services": [service(0, n_backends)]}).raise_for_status()
            one = drains(lab, 1, n_backends, n_drains)
            with lab.client(timeout=600) as c:
                t0 = time.perf_counter()
                r = c.put("/v1/state", json=doc)
                put_s = time.perf_counter() - t0
                r.raise_for_status()
                maps = c.get("/v1/status").json()["datapath"]["maps"]
            if maps["services"]["used"] != n_services or maps["backends"]["used"] != n_services * n_backends:
                raise RuntimeError(f"datapath does not hold the document: {maps}")
            put_phases = phases(lab.log_text(), int(r.headers["x-l4lb-revision"]))
            # The same document again (automation pushing the whole state): nothing changes.
            with lab.client(timeout=600) as c:
                c0, t0 = tree_cpu(lab.proc.pid), time.perf_counter()
                again = c.put("/v1/state", json=doc)
                again_s, again_cpu = time.perf_counter() - t0, tree_cpu(lab.proc.pid) - c0
                again.raise_for_status()
            if again.headers["x-l4lb-revision"] != r.headers["x-l4lb-revision"]:
                raise RuntimeError("an identical PUT made a new revision")
            assert lab.proc is not None
            settle = 0.0 if quick else lab.config["stats_interval"] + 1  # the sampler gives freed heap back
            time.sleep(settle)
            rss = {"after the PUT": rss_mb(lab.proc.pid)}
            big = drains(lab, n_services, n_backends, n_drains)
            with lab.client(timeout=600) as c:
                # Every backend replaced, near max_backends (old and new do not fit together).
                t0 = time.perf_counter()
                c.put("/v1/state", json=document(n_services, n_backends, 1)).raise_for_status()
                replace_s = time.perf_counter() - t0
            time.sleep(settle)
            rss["after a full replacement"] = rss_mb(lab.proc.pid)
            rounds = [line for line in lab.log_text().splitlines() if "maps nearly full" in line]
        except BaseException:
            print(lab.log_tail(), file=sys.stderr)
            raise
        finally:
            lab.close()

    print(f"\nFloors (same run){' --quick: not a measurement' if quick else ''}")
    header()
    row(f"maglev.build, {n_backends} backends, M={M} (median)", f"{fl['maglev_build'] * 1e3:.1f} ms")
    row("table swap: new inner map, mmap fill, outer update (median)", f"{fl['swap'] * 1e3:.2f} ms")
    row("  of which new inner map + mmap fill", f"{fl['fill'] * 1e3:.2f} ms")
    row("  (the fill by one batch-update syscall instead)", f"{fl['fill_syscall'] * 1e3:.2f} ms")
    row(f"store commit of the {n_services}x{n_backends} document, p50 / p99",
        f"{fl['store_p50'] * 1e3:.1f}/{fl['store_p99'] * 1e3:.1f} ms")
    row("GET /healthz round trip, p50 / p99", f"{fl['healthz_p50'] * 1e3:.1f}/{fl['healthz_p99'] * 1e3:.1f} ms")
    print(f"\nPUT /v1/state: {n_services} services x {n_backends} backends over 1 service "
          f"({n_services * n_backends} backends; {len(r.content) / 1e6:.1f} MB answer)")
    header()
    row("request total (client)", f"{put_s:.2f} s", f"<= {TARGET_PUT_S:.0f} s", verdict(put_s <= TARGET_PUT_S, judge))
    print_phases(put_phases)
    core = sum(put_phases.get(k, 0.0) for k in ("plan", "store", "datapath"))
    if core:
        row("    API: HTTP, body validation, answer (total - server)", f"{(put_s - core) * 1e3:.1f} ms")
    row("the same document again (no change): request total", f"{again_s:.2f} s")
    row("  CPU of l4lbd + its Maglev workers for it", f"{again_cpu:.2f} s")
    print_drains("Drain latency, 1 service", one, judge)
    print_drains(f"Drain latency, {n_services} x {n_backends}", big, judge)
    print(f"\nFull replacement: every backend of the {n_services} x {n_backends} document another one, "
          "near max_backends")
    header()
    row("request total (client)", f"{replace_s:.2f} s")
    row("rounds with services on part of their backends (none on none)", f"{len(rounds)}")
    print("\nDaemon memory, MB (RSS = anonymous + file-backed; file-backed holds the Maglev buffers mapped "
          "from the kernel's maps)")
    row("", "RSS", "anon + file", "peak")
    for when, m in rss.items():
        row(f"{when}", f"{m['VmRSS']:.0f} MB", f"{m['RssAnon']:.0f} + {m['RssFile']:.0f}", f"{m['VmHWM']:.0f} MB")


if __name__ == "__main__":
    main()
