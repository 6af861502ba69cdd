#!/usr/bin/env python3
"""Datapath benchmark (not a test): ns/packet of the real XDP program.

Method A: one BPF_PROG_TEST_RUN with repeat=N on a bench-only build that
undoes its own encapsulation after XDP_TX, so every pass forwards (NOTES.md:
the repeat trap). Its new-connection rows use a build that also steps the
client port (and, when the port wraps, the client address's last byte) before
each pass (-DBENCH_NEXT_FLOW, bpf_src/lib/bench.h), so every pass is a SYN of a
flow the table has not seen; their floor does the same step.
Method B: N calls with repeat=1 on the production build, issued from a C loop
(build/testrun_batch.so), mean of the kernel-reported durations (the kernel
times only the program's run: see l4lb/lab/testrun.py). Its new-connection rows
give every call a frame of a different flow (l4lb/lab/flows.py).
Every row runs R times, rows interleaved (run 1 of every row, then run 2, ...),
on one pinned CPU; min/median/max over the runs. v4 rows are compared with the
bare IPIP floor, v6 and 4in6 (IPv4 in IPv6) rows with the bare IP6IP6 floor
(the same outer header), measured in the same run,
as are the other floors (XDP_TX, one FIB lookup, flow-table writes) and the
build that asks the FIB for every packet instead of the next-hop cache.
Then the verifier's view of each build (xlated / verified instructions) and
Maglev table builds.
Run as root: `make bench` or `.venv/bin/python bench/datapath.py` (~3 min);
`--quick` (2,000 repeats/calls, 64k-entry flow table) runs every step in
seconds, for tests/test_bench.py: its figures are not measurements. It compiles
four programs instead of seven (each BCC compile costs ~12 s of CPU): the
nexthop = fib builds and their rows are left out (the same steps as every other
row; tests/test_nexthop.py compiles and runs the fib build), and one floor
build (BENCH_UNDO) serves both methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import maglev_build  # noqa: E402
from scapy.all import IP, TCP, Ether, IPv6, Raw, raw  # noqa: E402

from l4lb.datapath import Datapath  # noqa: E402
from l4lb.datapath.libbpf import test_run  # noqa: E402
from l4lb.lab import testrun, verifier  # noqa: E402
from l4lb.lab.bpffs import private_bpffs  # noqa: E402
from l4lb.lab.flows import flow_frames, flow_of  # noqa: E402
from l4lb.lab.pktenv import PacketEnv, edge_backends_v4, edge_backends_v6  # noqa: E402
from l4lb.models import Service  # noqa: E402

VIP4, VIP6 = "198.51.100.1", "2001:db8:100::1"
RANGES_PORT, FOUR6_PORT = 81, 82
REPEAT_A, CALLS_B, RUNS = 200_000, 1_000_000, 3
QUICK_RUNS = 2_000          # --quick: repeat and calls
QUICK_FLOW_TABLE = 1 << 16
PY_LOOP_CALLS = 100_000     # calls of the Python-loop comparison
FLOORS = ("floor_tx", "floor_ipip", "floor_ip6ip6", "floor_ipip_next", "floor_ip6ip6_next", "floor_fib",
          "floor_flow", "floor_flow_new", "floor_lru", "floor_lru_new")


def packets() -> dict[str, bytes]:
    pad = Raw(b"x" * 18)
    e = Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22")
    return {
        "v4 SYN": raw(e / IP(src="203.0.113.7", dst=VIP4) / TCP(sport=33333, dport=80, flags="S") / pad),
        "v4 non-SYN": raw(e / IP(src="203.0.113.7", dst=VIP4) / TCP(sport=33334, dport=80, flags="A") / pad),
        "v6 SYN": raw(e / IPv6(src="2001:db8:77::7", dst=VIP6) / TCP(sport=33333, dport=80, flags="S") / pad),
        "v6 non-SYN": raw(e / IPv6(src="2001:db8:77::7", dst=VIP6) / TCP(sport=33334, dport=80, flags="A") / pad),
        # The new-connection template: its client address's last byte and port
        # become the flow number's (l4lb/lab/flows.py).
        "v4 new": raw(e / IP(src="198.51.100.0", dst=VIP4) / TCP(sport=1, dport=80, flags="S") / pad),
        "v6 new": raw(e / IPv6(src="2001:db8:78::", dst=VIP6) / TCP(sport=1, dport=80, flags="S") / pad),
        # Issue 15's features, each on a service of its own (services(), same VIP).
        "v4 ranges non-SYN": raw(e / IP(src="203.0.113.7", dst=VIP4) / TCP(sport=33335, dport=RANGES_PORT, flags="A")
                                 / pad),
        "v4 ranges new": raw(e / IP(src="198.51.100.0", dst=VIP4) / TCP(sport=1, dport=RANGES_PORT, flags="S") / pad),
        "4in6 non-SYN": raw(e / IP(src="203.0.113.7", dst=VIP4) / TCP(sport=33336, dport=FOUR6_PORT, flags="A") / pad),
        "4in6 new": raw(e / IP(src="198.51.100.0", dst=VIP4) / TCP(sport=1, dport=FOUR6_PORT, flags="S") / pad),
    }


def services() -> list[Service]:
    """Two 100-backend services, and those of issue 15's rows: 16 source ranges (the
    clients' among them), and an IPv4 VIP with 100 IPv6 backends (4in6)."""
    v4 = [{"address": a} for a in edge_backends_v4(100)]
    v6 = [{"address": a} for a in edge_backends_v6(100)]
    ranges = [f"192.0.2.{16 * i}/28" for i in range(14)] + ["203.0.113.0/24", "198.51.100.0/24"]
    return [Service(name="bench4", vip=VIP4, port=80, backends=v4),
            Service(name="bench6", vip=VIP6, port=80, backends=v6),
            Service(name="ranges4", vip=VIP4, port=RANGES_PORT, backends=v4, source_ranges=ranges),
            Service(name="four6", vip=VIP4, port=FOUR6_PORT, backends=v6)]


@dataclass(frozen=True)
class Row:
    label: str
    a: str                 # program of method A (key of Bench.fds)
    b: str                 # program of method B
    packet: str            # key of packets()
    new_flows: bool = False
    floor_a: str = ""      # label of the floor row it is compared with ("" for floors)
    floor_b: str = ""


def rows(fib: bool = True) -> list[Row]:
    """Every row; without `fib`, not those of the nexthop = fib builds (--quick)."""
    out = []
    for fam, encap in (("v4", "floor bare IPIP"), ("v6", "floor bare IP6IP6")):
        step = f"{encap.replace('bare ', '')} + next-flow step"
        out += [
            Row(f"l4lb {fam} SYN, same flow rewritten", "undo", "prod", f"{fam} SYN", False, encap, encap),
            Row(f"l4lb {fam} non-SYN, flow-table hit", "undo", "prod", f"{fam} non-SYN", False, encap, encap),
            Row(f"l4lb {fam} new connection (SYN, new client)", "undo_next", "prod", f"{fam} new", True, step, encap),
        ]
    ipip, ip6ip6 = "floor bare IPIP", "floor bare IP6IP6"
    out += [
        Row("l4lb v4 source ranges, flow-table hit", "undo", "prod", "v4 ranges non-SYN", False, ipip, ipip),
        Row("l4lb v4 source ranges, new connection", "undo_next", "prod", "v4 ranges new", True,
            "floor IPIP + next-flow step", ipip),
        Row("l4lb 4in6, flow-table hit", "undo", "prod", "4in6 non-SYN", False, ip6ip6, ip6ip6),
        Row("l4lb 4in6, new connection", "undo_next", "prod", "4in6 new", True, "floor IP6IP6 + next-flow step",
            ip6ip6),
    ]
    for fam, encap in (("v4", "floor bare IPIP"), ("v6", "floor bare IP6IP6")) if fib else ():
        for pkt, what in (("SYN", "SYN, same flow rewritten"), ("non-SYN", "non-SYN, flow-table hit")):
            out.append(Row(f"  fib build {fam} {what}", "fib_undo", "fib_prod", f"{fam} {pkt}", False, encap, encap))
    for name, label, pkt in (
        ("floor_tx", "floor XDP_TX", "v4 SYN"),
        ("floor_ipip", "floor bare IPIP", "v4 SYN"),
        ("floor_ip6ip6", "floor bare IP6IP6", "v6 SYN"),
        ("floor_ipip_next", "floor IPIP + next-flow step", "v4 new"),
        ("floor_ip6ip6_next", "floor IP6IP6 + next-flow step", "v6 new"),
        ("floor_fib", "floor one bpf_fib_lookup", "v4 SYN"),
        ("floor_flow", "floor flow-cache write, same key", "v4 SYN"),
        ("floor_flow_new", "floor flow-cache write, new key", "v4 SYN"),
        ("floor_lru", "floor LRU-hash write, same key", "v4 SYN"),
        ("floor_lru_new", "floor LRU-hash insert, new key", "v4 SYN"),
    ):
        out.append(Row(label, f"A {name}", f"B {name}", pkt))
    return out


class Bench:
    """The programs, the packets and the flow numbers handed out so far."""

    def __init__(self, env: PacketEnv, repeat: int, calls: int, quick: bool = False) -> None:
        self.env, self.repeat, self.calls, self.quick = env, repeat, calls, quick
        self.pk = packets()
        self.next_flow = {name: 0 for name in self.pk if name.endswith(" new")}
        self.fds: dict[str, int] = {}
        self.builds: dict[str, Datapath] = {}

    def load(self) -> None:
        from bcc import BPF

        env = self.env
        cfg = env.dp.cfg
        undo_cfg = dataclasses.replace(cfg, extra_cflags=("-DBENCH_UNDO",))
        # Every build shares the pinned maps (same layout).
        builds = [("undo", undo_cfg),
                  ("undo_next", dataclasses.replace(undo_cfg, extra_cflags=("-DBENCH_UNDO", "-DBENCH_NEXT_FLOW")))]
        if not self.quick:  # --quick leaves out the fib builds (rows(fib=False))
            builds += [("fib_undo", dataclasses.replace(undo_cfg, nexthop_cache=False)),
                       ("fib_prod", dataclasses.replace(cfg, nexthop_cache=False))]
        for name, c in builds:
            self.builds[name] = Datapath(c)
            env.call(self.builds[name].load)
        self.builds = {"prod": env.dp, **self.builds}
        self.fds = {name: dp.prog_fd for name, dp in self.builds.items()}
        self.floor_bpf = []
        # B's floors are the plain build; --quick runs B on A's BENCH_UNDO floors (one compile
        # less: the undo also answers XDP_TX after one pass, and quick figures are no measurement).
        for method, undo in (("A", True),) if self.quick else (("A", True), ("B", False)):
            b = env.compile_floors(undo=undo)
            self.floor_bpf.append(b)
            self.fds.update({f"{method} {n}": b.load_func(n.encode(), BPF.XDP).fd for n in FLOORS})
        if self.quick:
            self.fds.update({f"B {n}": self.fds[f"A {n}"] for n in FLOORS})

    def close(self) -> None:
        for name, dp in self.builds.items():
            if name != "prod":
                self.env.call(dp.close)
        for b in self.floor_bpf:
            b.cleanup()

    def take_flows(self, packet: str, n: int) -> int:
        first = self.next_flow[packet]
        self.next_flow[packet] += n
        return first

    def method_a(self, row: Row) -> float:
        pkt = self.pk[row.packet]
        steps = row.packet.endswith(" new")  # a next-flow build: l4lb's or its floor
        if steps:
            first = self.take_flows(row.packet, self.repeat + 1)
            pkt = bytes(flow_frames(pkt, first, 1)[0])
        verdict, out, ns = self.env.call(test_run, self.fds[row.a], pkt, ingress_ifindex=self.env.edge_ifindex,
                                         repeat=self.repeat)
        if verdict != 3:
            raise SystemExit(f"{row.label}: method A answered XDP verdict {verdict}, not XDP_TX")
        if steps and flow_of(out[len(out) - len(pkt):]) != first + self.repeat:
            # The next-flow build steps before each pass: after `repeat` passes
            # the buffer holds flow first + repeat. Anything else: not new flows.
            raise SystemExit(f"{row.label}: the packet after {self.repeat} passes is flow "
                             f"{flow_of(out[len(out) - len(pkt):])}, not {first + self.repeat}")
        return float(ns)

    def method_b(self, row: Row) -> float:
        pkt = self.pk[row.packet]
        if row.new_flows:
            frames = flow_frames(pkt, self.take_flows(row.packet, self.calls), self.calls)
        else:
            frames = np.frombuffer(pkt, dtype=np.uint8).reshape(1, -1)
        r = self.env.call(testrun.run_frames, self.fds[row.b], frames, ingress_ifindex=self.env.edge_ifindex,
                          calls=self.calls)
        if r.verdicts != {"tx": self.calls}:
            raise SystemExit(f"{row.label}: method B verdicts {r.verdicts}, expected XDP_TX for all {self.calls}")
        return r.mean_ns

    def call_costs(self, calls: int) -> tuple[float, float, float]:
        """(kernel-timed run, C-loop wall, Python-loop wall) ns per call, v4 non-SYN."""
        pkt = self.pk["v4 non-SYN"]
        frames = np.frombuffer(pkt, dtype=np.uint8).reshape(1, -1)
        c = self.env.call(testrun.run_frames, self.fds["prod"], frames, ingress_ifindex=self.env.edge_ifindex,
                          calls=calls)
        py = self.env.call(testrun.python_loop, self.fds["prod"], pkt, ingress_ifindex=self.env.edge_ifindex,
                           calls=calls)
        return c.mean_ns, c.wall_ns, py


def spread(v: list[float]) -> tuple[float, float, float]:
    return min(v), statistics.median(v), max(v)


def print_table(table: list[Row], a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    med_a = {r.label: statistics.median(a[r.label]) for r in table}
    med_b = {r.label: statistics.median(b[r.label]) for r in table}
    w = max(len(r.label) for r in table) + 2
    print(f"{'program / packet':<{w}}{'A min':>7}{'A med':>7}{'A max':>7}{'B min':>8}{'B med':>7}{'B max':>7}"
          f"{'A-floor':>9}{'B-floor':>9}{'A/floor':>9}")
    for r in table:
        cells = "".join(f"{x:>7.0f}" for x in spread(a[r.label])) + " " + \
                "".join(f"{x:>7.0f}" for x in spread(b[r.label]))
        if r.floor_a:
            fa, fb = med_a[r.floor_a], med_b[r.floor_b]
            cells += f"{med_a[r.label] - fa:>9.0f}{med_b[r.label] - fb:>9.0f}{med_a[r.label] / fa:>8.1f}x"
        print(f"{r.label:<{w}}{cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: every step, few iterations, small state")
    ap.add_argument("--runs", type=int, default=RUNS, help=f"runs per row (default {RUNS})")
    ap.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1, help="CPU to pin the test runs to")
    args = ap.parse_args()
    quick = args.quick
    repeat, calls = (QUICK_RUNS, QUICK_RUNS) if quick else (REPEAT_A, CALLS_B)
    env_cfg = {"flow_table_size": QUICK_FLOW_TABLE} if quick else {}
    load0 = os.getloadavg()

    with private_bpffs("l4lb-bench-") as bpffs:
        with PacketEnv(bpffs, n_backends=100, prefix="l4bench", **env_cfg) as env:
            env.apply(services())
            env.call(os.sched_setaffinity, 0, {args.cpu})   # the worker thread runs every test run
            bench = Bench(env, repeat, calls, quick)
            try:
                bench.load()
                for name in ("v4 non-SYN", "v6 non-SYN", "v4 ranges non-SYN", "4in6 non-SYN"):  # the hit rows' flows
                    env.run(bench.pk[name])
                table = rows(fib=not quick)
                a: dict[str, list[float]] = {r.label: [] for r in table}
                b: dict[str, list[float]] = {r.label: [] for r in table}
                for _ in range(args.runs):
                    for r in table:
                        a[r.label].append(bench.method_a(r))
                        b[r.label].append(bench.method_b(r))
                run_ns, c_wall, py_wall = bench.call_costs(QUICK_RUNS if quick else PY_LOOP_CALLS)
                builds = {name: env.call(verifier.complexity, dp.prog.bpf, "l4lb_xdp", dp.prog_fd)
                          for name, dp in bench.builds.items()}
            finally:
                bench.close()
            cfg = env.dp.cfg
    load1 = os.getloadavg()

    print(f"\nDatapath: ns/packet of the real XDP program, 100-backend services, M={cfg.maglev_m}, flow table "
          f"{cfg.flow_table_size:,} entries{'  (--quick: not a measurement)' if quick else ''}")
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, test runs pinned to CPU {args.cpu}; load average "
          f"{' '.join(f'{x:.1f}' for x in load0)} at start, {' '.join(f'{x:.1f}' for x in load1)} at end")
    print(f"A: one test run, repeat {repeat:,}, BENCH_UNDO build (mean ns per pass); new-connection rows: the "
          f"BENCH_NEXT_FLOW build, client port +1 (address last byte +1 on wrap) before each pass: {repeat:,} SYNs "
          f"of distinct flows per run")
    print(f"B: {calls:,} test runs of repeat 1, production build, mean of kernel-reported durations; new-connection "
          f"rows: {calls:,} distinct flows per run (client address last byte and port), SYN")
    print(f"{args.runs} runs per row, rows interleaved; min/median/max over runs. Floors: v4 rows against bare IPIP, "
          f"v6 against bare IP6IP6; new-connection rows by A against that floor + the same next-flow step")
    if quick:
        print("--quick: no nexthop = fib builds or rows; method B ran the floors' BENCH_UNDO build")
    print_table(table, a, b)
    print(f"\nMethod B's cost per call outside the kernel's timer (v4 non-SYN): the program's run {run_ns:.0f} ns "
          f"(kernel-timed), the C loop's wall time {c_wall:.0f} ns per call (syscall, frame copy-in, xdp_buff set-up), "
          f"a Python ctypes loop {py_wall:.0f} ns per call. The figures above are the kernel-timed runs only.")
    print("\nVerifier complexity per build (l4lb_xdp): instructions after verification (xlated) and "
          "instructions the verifier processed (its log's 'processed N insns')")
    names = {"prod": "production (nexthop cache)", "undo": "BENCH_UNDO (method A)",
             "undo_next": "BENCH_UNDO + BENCH_NEXT_FLOW (method A, new conn.)",
             "fib_undo": "nexthop = fib, BENCH_UNDO", "fib_prod": "nexthop = fib, production"}
    w = max(map(len, names.values())) + 2
    print(f"{'build':<{w}}{'xlated insns':>14}{'verified insns':>16}")
    for name, c in builds.items():
        verified = "n/a" if c.verified is None else f"{c.verified:,}"
        print(f"{names[name]:<{w}}{c.xlated:>14,}{verified:>16}")
    print(f"\nMaglev table build: {maglev_build.title()}")
    maglev_build.report(quick)


if __name__ == "__main__":
    main()
