#!/usr/bin/env python3
"""Real-frames benchmark (not a test): frames through a veth into the LB's XDP program.

In a private network namespace (PacketEnv: documentation addresses, torn down
after), build/trafficgen (bench/c/trafficgen.c, built by scripts/setup.sh) sends
TCP frames to a VIP from one end of a veth pair (edge0p) with an AF_PACKET
socket: sendmmsg in batches of 256, PACKET_QDISC_BYPASS, a fresh header and
fresh IPv4/TCP checksums in every frame. The program under test runs in native
XDP mode on the other end (edge0, the LB) and sends each frame back with
XDP_TX. A counter program on edge0p (bench/c/traffic_xdp.c) counts what comes
back by kind and drops it.

Rows (each a trial of --seconds, rows interleaved, --rounds rounds), v4 and v6:
- floor MAC swap: swaps the Ethernet addresses, XDP_TX (bench/c/traffic_xdp.c);
- floor encap: a bare IPIP / IP6IP6 encapsulator (bpf_src/bench_floor.c's
  floor_ipip / floor_ip6ip6: bpf_xdp_adjust_head, a constant outer header,
  XDP_TX): what l4lb's frames cost the veth path beyond a MAC swap (a frame
  moved in its page, 20/40 bytes longer on the way back) without l4lb's logic;
- l4lb, every frame the same flow (non-SYN: flow-table hits; the flow is in
  the table before the first trial, checked);
- l4lb, a new flow every frame (a SYN from the next client address/port: a
  flow-table miss, Maglev and an insert);
- l4lb v4 with the recorder armed (one filter on another client: nothing
  recorded).
The LB runs as in production: next-hop cache filled for every backend
(checked), recorder idle (checked) but for the recorder row.

NAPI (--napi): 'softirq' (default, the veth's own way) runs every frame
through both XDP programs in the sender's softirq before the next is sent:
one-frame NAPI polls, the whole kernel path between two runs of the program
(which therefore meets colder caches than behind a NIC). 'threaded' gives
both veth ends threaded NAPI, the kthreads pinned to the sender's CPU (the
receiver's SCHED_FIFO, or the LB's XDP_TX would overflow its 256-frame ring),
and the sender yields when the veth ring is full: the LB's XDP then runs in
polls of many frames, as behind a NIC, and its kthread's CPU time is the LB
side alone. In threaded mode the batch sizes follow the LB's speed, so there
only tables 1 and 2 compare between rows.

Printed, min/median/max over rounds, each row also as ns per frame above the
MAC-swap floor and above the encap floor of its family, same round:
1. the program's own time: the kernel's run-time stats (BPF_ENABLE_STATS:
   run_time_ns / run_cnt of the program on edge0) from a short trial per row
   after each round's trials (--stats-seconds; the stats are on only then:
   they are kernel-wide and cost every BPF program two clock reads per run,
   in every row alike);
2. the LB side (threaded NAPI only): CPU time of edge0's NAPI kthread per
   frame: the skb turned into an XDP frame (a copy into a page-pool page),
   the program, XDP_TX to the peer;
3. the whole path by CPU time (the sender's thread, ksoftirqd and both NAPI
   kthreads on the sender's CPU, per returned frame): holds on a shared
   machine, where the wall clock does not;
4. the whole path by wall clock: returned frames in Mpps, ns per frame.
On a busy VM the whole path's cost swings by a third between trials a second
apart (its floor went from 2,400 to 3,900 ns in one run), so the figure of
tables 3 and 4 is the median of many short paired rounds; their min and max
show the noise, not l4lb.

Every trial checks what came back: the counts by kind, and every sampled frame
(each 1024th, 64 kept) decoded by scapy: l4lb's outer header to the backend
that Maglev in Python (l4lb/maglev.py, l4lb/flowhash.py) predicts for the
inner flow, from the LB's address, to that backend's MAC; every encapsulating
row's inner packet byte for byte the one the sender sent (rebuilt from a scapy
template by l4lb/lab/flows.py, checksums included). Any mismatch fails the
run (exit 1).

Run as root: `.venv/bin/python bench/traffic.py` (20 rounds of 0.5 s trials,
~12 s a round, ~4 min); `--quick` (0.1 s trials, 2 rounds, 64k-entry flow table)
runs every step, for tests/test_bench.py: its figures are not measurements.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from scapy.all import IP, TCP, Ether, IPv6, Raw, raw

from l4lb import flowhash, maglev
from l4lb.datapath import flowscan, libbpf, netlink
from l4lb.datapath.engine import hash_seed
from l4lb.datapath.jiffies import KernelClock
from l4lb.datapath.loader import compile_program
from l4lb.datapath.recorder import FilterEntry, RecorderMaps
from l4lb.lab import netns
from l4lb.lab.bpffs import private_bpffs
from l4lb.lab.flows import ETH_HLEN, FLOW_SPACE, FLOWS_PER_BYTE, flow_frames, flow_of
from l4lb.lab.pktenv import (
    EDGE_IF, EDGE_PEER, EDGE_V4, EDGE_V6, PacketEnv, backend_mac, edge_backends_v4, edge_backends_v6,
)
from l4lb.models import Service
from l4lb.recfilter import parse_filter

ROOT = Path(__file__).resolve().parent.parent
TRAFFICGEN = ROOT / "build" / "trafficgen"
XDP_SOURCE = ROOT / "bench" / "c" / "traffic_xdp.c"     # the MAC-swap floor and the receiver
VIP4, VIP6 = "198.51.100.1", "2001:db8:100::1"
CLIENT = {4: "203.0.113.0", 6: "2001:db8:77::"}   # last byte: the flow number's (l4lb/lab/flows.py)
FRAME_LEN = {4: 64, 6: 84}                        # Ethernet + IP + TCP + 10 bytes
SAME_FLOW = 7                                     # the flow number of the same-flow rows
N_BACKENDS = 100
RX_IPIP, RX_IP6IP6, RX_OTHER = range(3)           # enum rx_kind of traffic_xdp.c
RECORDER_FILTER = f"192.0.2.77 0 {VIP4} 80 tcp"   # armed, never matches the bench's clients
ENCAP_FLOOR = {4: b"floor_ipip", 6: b"floor_ip6ip6"}


@dataclass(frozen=True)
class Row:
    label: str
    prog: str       # "macswap", "encap" (the floors), "l4lb" or "recorder"
    family: int
    new_flows: bool

    @property
    def kind(self) -> int:
        if self.prog == "macswap":
            return RX_OTHER
        return RX_IPIP if self.family == 4 else RX_IP6IP6

    @property
    def is_floor(self) -> bool:
        return self.prog in ("macswap", "encap")


ROWS = (
    Row("floor v4: MAC swap + XDP_TX", "macswap", 4, False),
    Row("floor v6: MAC swap + XDP_TX", "macswap", 6, False),
    Row("floor v4: bare IPIP encap + XDP_TX", "encap", 4, False),
    Row("floor v6: bare IP6IP6 encap + XDP_TX", "encap", 6, False),
    Row("l4lb v4, same flow (flow-table hit)", "l4lb", 4, False),
    Row("l4lb v6, same flow (flow-table hit)", "l4lb", 6, False),
    Row("l4lb v4, new flow every frame (SYN)", "l4lb", 4, True),
    Row("l4lb v6, new flow every frame (SYN)", "l4lb", 6, True),
    Row("l4lb v4, same flow, recorder armed, no match", "recorder", 4, False),
)


@dataclass(frozen=True)
class Trial:
    returned: int        # frames of the expected kind back at the receiver
    sent: int
    seconds: float       # the sender's wall-clock time
    cpu_seconds: float   # CPU time of the path: sender, ksoftirqd, NAPI kthreads on its CPU
    sender_seconds: float  # of which the sender's thread
    lb_seconds: float | None  # of which edge0's NAPI kthread (threaded NAPI only)
    checked: int         # sampled frames decoded and checked
    prog_ns: float | None = None  # the program's run_time_ns / run_cnt (stats trials only)

    @property
    def mpps(self) -> float:
        return self.returned / self.seconds / 1e6

    @property
    def wall_ns(self) -> float:
        return self.seconds * 1e9 / self.returned

    @property
    def cpu_ns(self) -> float:
        return self.cpu_seconds * 1e9 / self.returned

    @property
    def lb_ns(self) -> float | None:
        return None if self.lb_seconds is None else self.lb_seconds * 1e9 / self.returned


class BenchError(RuntimeError):
    """What came back is not what l4lb should have sent, or the lab is not set up as in production."""


def thread_ns(pid: int) -> int:
    """CPU time of a thread (/proc/PID/schedstat: ns on the CPU; steal time excluded)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def kthreads(prefix: str) -> dict[int, str]:
    """Kernel threads whose name starts with `prefix`: pid -> name."""
    out = {}
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:  # a process that just ended
            continue
        if name.startswith(prefix):
            out[int(comm.parent.name)] = name
    return out


def softirqd_pid(cpu: int) -> int:
    pids = [p for p, name in kthreads("ksoftirqd/").items() if name == f"ksoftirqd/{cpu}"]
    if len(pids) != 1:
        raise BenchError(f"no ksoftirqd/{cpu} thread")
    return pids[0]


def threaded_napi(ns: str, ifnames: tuple[str, ...], cpu: int, urgent: tuple[str, ...]) -> dict[str, int]:
    """Switch the interfaces' NAPI to kernel threads (one per veth end: a veth has
    one queue here), pin the threads to `cpu`; returns ifname -> kthread pid.
    The threads are told apart by name (napi/IFNAME-ID, cut to 15 characters) among
    the ones that appeared just now. The `urgent` ones run SCHED_FIFO (priority 1):
    woken, they take the CPU at the waker's next scheduling point."""
    before = set(kthreads("napi/"))
    for ifname in ifnames:
        netns.run(ns, "sh", "-c", f"echo 1 > /sys/class/net/{ifname}/threaded")
    new = {p: name for p, name in kthreads("napi/").items() if p not in before}
    found = {}
    for ifname in ifnames:
        pids = [p for p, name in new.items() if name.startswith(f"napi/{ifname}-")]
        if len(pids) != 1:
            raise BenchError(f"threaded NAPI on {ifname}: expected one new kthread, found {pids or 'none'}")
        os.sched_setaffinity(pids[0], {cpu})
        if ifname in urgent:
            os.sched_setscheduler(pids[0], os.SCHED_FIFO, os.sched_param(1))
        found[ifname] = pids[0]
    return found


@contextmanager
def run_stats() -> Iterator[None]:
    """The kernel's per-program run-time stats on, for the block only."""
    fd = libbpf.enable_run_stats()
    try:
        yield
    finally:
        os.close(fd)


def prog_run_stats(fd: int) -> tuple[int, int]:
    info = libbpf.prog_info(fd)
    return info.run_time_ns, info.run_cnt


class Rig:
    """The namespace, the programs and the swaps between them on edge0."""

    def __init__(self, env: PacketEnv, cpu: int, napi: str) -> None:
        self.env, self.cpu, self.napi = env, cpu, napi
        seed = env.dp.cfg.maglev_seed
        self.services = {
            4: Service(name="t4", vip=VIP4, port=80, backends=[{"address": a} for a in edge_backends_v4(N_BACKENDS)]),
            6: Service(name="t6", vip=VIP6, port=80, backends=[{"address": a} for a in edge_backends_v6(N_BACKENDS)]),
        }
        env.apply(list(self.services.values()))
        m = env.dp.cfg.maglev_m
        self.tables = {f: maglev.build(s.maglev_weights(), m, seed) for f, s in self.services.items()}
        self.seed = hash_seed(seed)
        self.macs = {ipaddress.ip_address(a): backend_mac(i + 1)
                     for addrs in (edge_backends_v4(N_BACKENDS), edge_backends_v6(N_BACKENDS))
                     for i, a in enumerate(addrs)}
        self.peer_mac = netns.link_info(env.ns, EDGE_PEER)["address"]
        self.next_flow = {4: 0, 6: 0}
        self.softirqd = softirqd_pid(cpu)
        # The same program compiled again (its own recorder maps), armed with one filter that
        # the bench's frames never match; "l4lb" is the datapath's, its recorder idle.
        entries = [FilterEntry(parse_filter(RECORDER_FILTER), 0)]
        self.recorder = env.call(compile_program, env.dp.cfg)
        self.armed = RecorderMaps(self.recorder.bpf)
        self.armed.write(entries)
        from bcc import BPF

        # The encap floors and traffic_xdp.c's programs in one compile (each costs seconds).
        self.rx = env.compile_floors(undo=False, extra=XDP_SOURCE.read_text())
        self.fds = {("macswap", f): self.rx.load_func(b"floor_macswap", BPF.XDP).fd for f in (4, 6)}
        for f in (4, 6):
            self.fds[("encap", f)] = self.rx.load_func(ENCAP_FLOOR[f], BPF.XDP).fd
            self.fds[("l4lb", f)] = env.dp.prog_fd
            self.fds[("recorder", f)] = self.recorder.fd
        rx_fd = self.rx.load_func(b"rx_count", BPF.XDP).fd
        self.modes = {EDGE_PEER: env.call(self._attach, EDGE_PEER, rx_fd, None)}
        self.current = env.dp.prog_fd  # PacketEnv attached the datapath to edge0
        self.modes[EDGE_IF] = env.call(self._attach, EDGE_IF, self.current, self.current)
        # Threaded NAPI needs the NAPI instances, which a veth has while XDP is attached. The
        # receiver's thread preempts the LB's, or the LB's XDP_TX would overflow edge0p's
        # 256-frame ring while the LB's thread polls on (~1 % of the frames lost).
        self.napi_pids = threaded_napi(env.ns, (EDGE_IF, EDGE_PEER), cpu, (EDGE_PEER,)) \
            if napi == "threaded" else {}
        # Threaded: the sender yields when the veth's ring is full, so the NAPI thread runs.
        self.sender_args = ["-Y"] if napi == "threaded" else []

    @staticmethod
    def _attach(ifname: str, fd: int, expected: int | None) -> str:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            state = netlink.xdp_state(ipr, netlink.ifindex(ipr, ifname))
            return netlink.attach(ipr, ifname, fd, "native", expected, state)

    def use(self, row: Row) -> int:
        fd = self.fds[(row.prog, row.family)]
        if fd != self.current:
            self.env.call(self._attach, EDGE_IF, fd, self.current)
            self.current = fd
        return fd

    # --- the lab as in production -------------------------------------------------------------
    def check_lab(self) -> list[str]:
        """Next-hop cache entries for every backend, the datapath's recorder idle,
        the armed copy's filter in place. Returns the lines to print."""
        t = self.env.dp.tables
        be, nh = t.backends.values_array(), t.nexthops.values_array()
        used = be["family"] != 0
        live = used & (nh["gen"] == be["gen"]) & (nh["gen"] != 0)
        n_used, n_live = int(used.sum()), int(live.sum())
        if n_used != 2 * N_BACKENDS or n_live != n_used:
            raise BenchError(f"next-hop cache: {n_live} of {n_used} backend slots have an entry of their "
                             f"generation (want all {2 * N_BACKENDS}): frames would take bpf_fib_lookup")
        idle = RecorderMaps(self.env.dp.prog.bpf).entry_count()
        if idle != 0 or self.armed.entry_count() != 1:
            raise BenchError(f"recorder: {idle} filters on the datapath's program (want 0), "
                             f"{self.armed.entry_count()} on the armed copy (want 1)")
        return [f"next-hop cache: {n_live}/{n_used} backend slots resolved (no bpf_fib_lookup per frame); "
                f"recorder: idle on l4lb, 1 filter on the armed copy"]

    def prime_flows(self) -> str:
        """Send the same-flow rows' flow once and check that the flow table holds it,
        on the backend Maglev in Python predicts, before any trial."""
        t = self.env.dp.tables
        clock = KernelClock()
        before = flowscan.scan(t.flows, self.env.dp.flow_source()[1], clock)
        for fam in (4, 6):
            row = next(r for r in ROWS if r.prog == "l4lb" and r.family == fam and not r.new_flows)
            self.use(row)
            self.send(row, 0.02)
        after = flowscan.scan(t.flows, self.env.dp.flow_source()[1], clock)
        for fam in (4, 6):
            want = self.backend(fam, self.client(fam, SAME_FLOW), 1 + SAME_FLOW % FLOWS_PER_BYTE)
            have = sum(a for (_, (addr, _)), (a, _) in after.backends.items() if ipaddress.ip_address(addr) == want)
            had = sum(a for (_, (addr, _)), (a, _) in before.backends.items() if ipaddress.ip_address(addr) == want)
            if have != had + 1:
                raise BenchError(f"flow table: the v{fam} same-flow flow is not on {want} after priming "
                                 f"({had} -> {have} active entries there)")
        if after.used != before.used + 2:
            raise BenchError(f"flow table: priming two flows took it from {before.used} to {after.used} entries")
        return f"flow table: the two same-flow flows in place before the first trial ({after.used} entries)"

    # --- trials ------------------------------------------------------------------------------
    def counts(self) -> list[int]:
        per_cpu = self.rx["rx_counts"][0]
        return [sum(c.kind[k] for c in per_cpu) for k in range(3)]

    def samples(self) -> list[bytes]:
        out = []
        for slot in self.rx["rx_samples"].values():
            out += [bytes(s.data[:s.len]) for s in slot if s.len]
        return out

    def send(self, row: Row, seconds: float) -> tuple[int, float, float, int]:
        """Run the sender; (frames sent, seconds, its thread's CPU seconds, first flow number)."""
        fam = row.family
        first = self.next_flow[fam] if row.new_flows else SAME_FLOW
        cmd = [TRAFFICGEN, "-i", EDGE_PEER, "-s", self.peer_mac, "-d", self.env.edge_mac, "-c", CLIENT[fam],
               "-v", VIP4 if fam == 4 else VIP6, "-p", 80, "-n", 0 if row.new_flows else 1, "-f", first,
               "-F", "S" if row.new_flows else "A", "-t", seconds, "-C", self.cpu, "-l", FRAME_LEN[fam],
               *self.sender_args]
        out = dict(kv.split("=") for kv in netns.run(self.env.ns, *cmd, timeout=seconds + 60).stdout.split())
        if row.new_flows:
            self.next_flow[fam] = int(out["next"])
        return int(out["sent"]), float(out["seconds"]), float(out["cpu_seconds"]), first

    def path_ns(self) -> tuple[int, int | None]:
        """(CPU ns so far of ksoftirqd and the NAPI kthreads on the sender's CPU, of edge0's
        NAPI kthread alone or None)."""
        napi = {i: thread_ns(p) for i, p in self.napi_pids.items()}
        return thread_ns(self.softirqd) + sum(napi.values()), napi.get(EDGE_IF)

    def trial(self, row: Row, seconds: float, stats: bool = False) -> Trial:
        fd = self.use(row)
        self.rx["rx_samples"].clear()
        before, (path0, lb0) = self.counts(), self.path_ns()
        run0 = prog_run_stats(fd) if stats else (0, 0)
        sent, took, cpu, first = self.send(row, seconds)
        deadline = time.monotonic() + 1.0
        got = [a - b for a, b in zip(self.counts(), before)]
        while got[row.kind] < sent and time.monotonic() < deadline:  # frames still in the veth rings
            time.sleep(0.01)
            got = [a - b for a, b in zip(self.counts(), before)]
        run1 = prog_run_stats(fd) if stats else (0, 1)
        path1, lb1 = self.path_ns()
        returned = got[row.kind]
        stray = sum(got) - returned
        # A few stray frames are the LB namespace's own (IPv6 neighbour/router traffic on edge0).
        if stray > max(10, returned // 1000):
            raise BenchError(f"{row.label}: {stray} of {sum(got)} returned frames were not of the expected kind {got}")
        if returned < sent * 0.99:
            raise BenchError(f"{row.label}: {returned} of {sent} frames came back")
        checked = self.check(row, self.samples(), first, self.next_flow[row.family])
        if returned and not checked:
            raise BenchError(f"{row.label}: no sampled frame to check")
        runs = run1[1] - run0[1]
        if stats and runs < returned * 0.99:
            raise BenchError(f"{row.label}: the program ran {runs} times for {returned} frames (stats off?)")
        return Trial(returned, sent, took, cpu + (path1 - path0) / 1e9, cpu,
                     None if lb0 is None or lb1 is None else (lb1 - lb0) / 1e9, checked,
                     (run1[0] - run0[0]) / runs if stats else None)

    # --- what came back ----------------------------------------------------------------------
    def check(self, row: Row, samples: list[bytes], first: int, end: int) -> int:
        """Check the sampled frames that carry the sender's TCP; returns how many. The LB
        namespace's own chatter (IPv6 neighbour and router messages on edge0) can be
        sampled too: it is not the sender's, and a couple of such frames are let through."""
        checked = stray = 0
        for data in samples:
            frame = Ether(data)
            if TCP not in frame or frame[TCP].dport != 80:
                stray += 1
                continue
            checked += 1
            inner = frame[IP] if row.family == 4 else frame[IPv6]
            if row.prog != "macswap":
                outer = inner
                if (outer.proto if row.family == 4 else outer.nh) != (4 if row.family == 4 else 41):
                    raise BenchError(f"{row.label}: not encapsulated: {frame.summary()}")
                inner = outer.payload
                if row.prog != "encap":
                    self.check_outer(row, frame, outer, inner)
            self.check_inner(row, raw(inner), first, end)
        if stray > 2:
            raise BenchError(f"{row.label}: {stray} of {len(samples)} sampled frames were not the sender's")
        return checked

    def check_outer(self, row: Row, frame: Any, outer: Any, inner: Any) -> None:
        want = self.backend(row.family, inner.src, inner[TCP].sport)
        src = EDGE_V4 if row.family == 4 else EDGE_V6
        if (ipaddress.ip_address(outer.dst), ipaddress.ip_address(outer.src), frame.dst) != \
                (want, ipaddress.ip_address(src), self.macs[want]):
            raise BenchError(f"{row.label}: {inner.src} port {inner[TCP].sport} went to {outer.dst} "
                             f"({frame.dst}) from {outer.src}; Maglev in Python says {want} "
                             f"({self.macs[want]}) from {src}")

    def check_inner(self, row: Row, ip: bytes, first: int, end: int) -> None:
        """The inner packet must be, byte for byte, the one the sender sent: its flow
        rebuilt from a scapy template by l4lb/lab/flows.py, checksums included."""
        tmpl = self.template(row.family, row.new_flows)
        flow = flow_of(tmpl[:ETH_HLEN] + ip)
        in_trial = (flow - first) % FLOW_SPACE < (end - first) % FLOW_SPACE if row.new_flows else flow == first
        if not in_trial or bytes(flow_frames(tmpl, flow, 1)[0, ETH_HLEN:]) != ip:
            raise BenchError(f"{row.label}: a packet the sender did not send came back: "
                             f"{(IP(ip) if row.family == 4 else IPv6(ip)).summary()}")

    @cache
    def template(self, family: int, syn: bool) -> bytes:
        """The frame trafficgen.c builds for flow 0."""
        ip = IP(src=CLIENT[4], dst=VIP4, id=0, flags="DF", ttl=64) if family == 4 else \
            IPv6(src=CLIENT[6], dst=VIP6, hlim=64)
        frame = Ether(dst=self.env.edge_mac, src=self.peer_mac) / ip / \
            TCP(sport=1, dport=80, seq=1, flags="S" if syn else "A", window=65535)
        return raw(frame / Raw(bytes(FRAME_LEN[family] - len(frame))))

    @staticmethod
    def client(family: int, flow: int) -> str:
        base = ipaddress.ip_address(CLIENT[family])
        return str(base + (flow // FLOWS_PER_BYTE) % 256)

    def backend(self, family: int, client: str, sport: int) -> Any:
        s = self.services[family]
        h = flowhash.flow_hash(client, sport, s.port, 6, self.seed, hash_src_port=s.options.hash_src_port)
        ident = self.tables[family].backend_at(h % self.tables[family].m)
        assert ident is not None
        return ipaddress.ip_address(ident[0])

    def close(self) -> None:
        self.recorder.bpf.cleanup()
        self.rx.cleanup()


# --- the report ---------------------------------------------------------------------------------
def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def report(rows: tuple[Row, ...], trials: dict[Row, list[Trial]], stats: dict[Row, list[Trial]],
           args: argparse.Namespace, loads: list[tuple[float, ...]], lab: list[str], modes: dict[str, str],
           cfg: Any) -> None:
    floor = {(r.prog, r.family): r for r in rows if r.is_floor}
    w = max(len(r.label) for r in rows) + 2

    def three(values: list[float], fmt: str = ".0f", width: int = 7) -> str:
        return "".join(f"{x:>{width}{fmt}}" for x in spread(values))

    def above(row: Row, base: str, ts: dict[Row, list[Trial]], ns: Callable[[Trial], float]) -> str:
        """ns above the `base` floor of the row's family, trial by trial of the same round."""
        f = floor[(base, row.family)]
        if f == row or (base == "encap" and row.prog == "macswap"):
            return " " * 21
        return three([ns(t) - ns(b) for t, b in zip(ts[row], ts[f])])

    def table(title: str, ts: dict[Row, list[Trial]], ns: Callable[[Trial], float], extra_head: str = "",
              extra: Callable[[Row], str] = lambda row: "") -> None:
        print(f"\n{title}")
        print(f"{'row':<{w}}{'ns min':>10}{'med':>7}{'max':>7}{'+MACswap min':>15}{'med':>7}{'max':>7}"
              f"{'+encap min':>13}{'med':>7}{'max':>7}{extra_head}")
        for row in rows:
            print(f"{row.label:<{w}}   {three([ns(t) for t in ts[row]])}   {above(row, 'macswap', ts, ns)}      "
                  f"{above(row, 'encap', ts, ns)}{extra(row)}")

    quick = "  (--quick: not a measurement)" if args.quick else ""
    napi = (f"threaded NAPI on both veth ends, kthreads pinned to CPU {args.cpu} with the sender (which yields "
            f"when the veth ring is full)" if args.napi == "threaded" else
            f"NAPI in softirq (veth default): each frame through both XDP programs in the sender's softirq on "
            f"CPU {args.cpu}")
    print(f"\nReal frames through a veth into the LB's XDP program: {args.rounds} rounds of {args.seconds:g} s "
          f"trials, rows interleaved, then a {args.stats_seconds:g} s trial per row with run-time stats on{quick}")
    print(f"sender: build/trafficgen (AF_PACKET, sendmmsg x 256, PACKET_QDISC_BYPASS, fresh headers and checksums "
          f"per frame) pinned to CPU {args.cpu}; {napi}; frames {FRAME_LEN[4]} B (v4) / {FRAME_LEN[6]} B (v6); "
          f"XDP {modes[EDGE_IF]} on {EDGE_IF} (the LB), {modes[EDGE_PEER]} on {EDGE_PEER} (the receiver)")
    print(f"l4lb: {N_BACKENDS}-backend services, M={cfg.maglev_m}, flow table {cfg.flow_table_size:,} entries; "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in loads[0])} at start, "
          f"{' '.join(f'{x:.1f}' for x in loads[1])} at end")
    for line in lab:
        print(line)
    print("Every figure: ns per frame, min/median/max over rounds; +MACswap / +encap: above the MAC-swap / "
          "bare-encapsulator floor of the same family in the same round")
    table("1. The program's own time on real frames (kernel run-time stats: run_time_ns / run_cnt of the "
          "program on edge0; includes the stats' two clock reads per run, as every row does)",
          stats, lambda t: t.prog_ns or 0.0)
    if args.napi == "threaded":
        table(f"2. The LB side: CPU time of {EDGE_IF}'s NAPI kthread per frame (skb to XDP frame copy, the "
              f"program, XDP_TX to the peer)", trials, lambda t: t.lb_ns or 0.0)
    table("3. The whole path by CPU time (sender + ksoftirqd + NAPI kthreads on its CPU, per returned frame); "
          "'CPU share': that time / wall clock", trials, lambda t: t.cpu_ns, f"{'CPU share':>11}",
          lambda row: f"{statistics.median(t.cpu_seconds / t.seconds for t in trials[row]):>11.0%}")
    table("4. The whole path by wall clock (ns per returned frame)", trials, lambda t: t.wall_ns,
          f"{'Mpps med':>10}{'returned':>10}{'checked':>9}",
          lambda row: f"{statistics.median(t.mpps for t in trials[row]):>10.3f}"
                      f"{sum(t.returned for t in trials[row]) / max(1, sum(t.sent for t in trials[row])):>10.1%}"
                      f"{sum(t.checked for t in trials[row] + stats[row]):>9}")
    print("returned: frames back of the expected kind / frames sent; checked: sampled frames decoded by scapy, "
          "l4lb's outer header matched against Maglev in Python (backend address and MAC, outer source), every "
          "encapsulated inner packet byte-identical to the one sent.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.1 s trials, 2 rounds, small flow table")
    ap.add_argument("--seconds", type=float, default=0.5, help="length of one trial (default 0.5)")
    ap.add_argument("--stats-seconds", type=float, default=0.25,
                    help="length of a trial with run-time stats on, one per row and round (default 0.25)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of interleaved trials (default 20)")
    ap.add_argument("--cpu", type=int, default=0, help="CPU of the sender and the NAPI threads (default 0)")
    ap.add_argument("--napi", choices=("softirq", "threaded"), default="softirq",
                    help="where the veth's NAPI runs (default softirq, the veth's default)")
    ap.add_argument("--flow-table", type=int, default=1 << 20,
                    help="flow-table entries (default 1,048,576, the datapath's default; --quick: 65,536)")
    ap.add_argument("--hits-only", action="store_true",
                    help="only the floors and the same-flow rows (more rounds in the same time)")
    args = ap.parse_args()
    rows = tuple(r for r in ROWS if not args.hits_only or r.is_floor or r.prog == "l4lb" and not r.new_flows)
    if args.quick:
        args.seconds, args.stats_seconds, args.rounds = 0.1, 0.05, 2
    if not TRAFFICGEN.exists():
        print(f"{TRAFFICGEN} is missing: scripts/setup.sh (make setup) builds it", file=sys.stderr)
        return 1
    flow_table = 1 << 16 if args.quick else args.flow_table
    loads = [os.getloadavg()]
    with private_bpffs("l4fr-traffic-") as bpffs:
        with PacketEnv(bpffs, n_backends=N_BACKENDS, prefix="l4fr", flow_table_size=flow_table) as env:
            rig = Rig(env, args.cpu, args.napi)
            try:
                lab = rig.check_lab() + [rig.prime_flows()]
                trials: dict[Row, list[Trial]] = {r: [] for r in rows}
                stats: dict[Row, list[Trial]] = {r: [] for r in rows}
                for n in range(args.rounds):
                    # Every other round in reverse, so that no row always runs right after another.
                    order = rows if n % 2 == 0 else rows[::-1]
                    for row in order:
                        trials[row].append(rig.trial(row, args.seconds))
                    with run_stats():
                        for row in order:
                            stats[row].append(rig.trial(row, args.stats_seconds, stats=True))
                modes, cfg = rig.modes, env.dp.cfg
            except BenchError as e:
                print(f"FAILED: {e}", file=sys.stderr)
                return 1
            finally:
                rig.close()
    loads.append(os.getloadavg())
    report(rows, trials, stats, args, loads, lab, modes, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
