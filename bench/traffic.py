#!/usr/bin/env python3
"""Real-frames benchmark (not a test): frames through a veth into the LB's XDP program.

In a private network namespace (PacketEnv: documentation addresses, torn down
after), build/trafficgen (bench/c/trafficgen.c, built by scripts/setup.sh) sends
TCP frames to a VIP from one end of a veth pair (edge0p) with an AF_PACKET
socket: sendmmsg in batches of 256, PACKET_QDISC_BYPASS, a fresh header and
fresh IPv4/TCP checksums in every frame. The program under test runs in native
XDP mode on the other end (edge0) and sends each frame back with XDP_TX (l4lb:
encapsulated to the backend; the floor: MAC addresses swapped). A counter
program on edge0p (bench/c/traffic_xdp.c) counts what comes back by kind and
drops it. The sender is pinned to one CPU; the veth's NAPI runs both XDP
programs on that same CPU, so 1e9 / rate is the whole path's ns per frame.

Rows (each a trial of --seconds, rows interleaved, --rounds rounds): the floor
(MAC swap + XDP_TX) for v4 and for v6 frames; l4lb with every frame the same
flow (non-SYN: flow-table hits); l4lb with a new flow every frame (a SYN from
the next client address/port: a flow-table miss, Maglev and an insert); l4lb
with the recorder armed (one filter on another client: nothing recorded).
Printed, min/median/max over rounds, two ways:
- by wall clock: returned frames in Mpps, and ns per frame above the floor of
  the same family in the same round (1e9/rate_row - 1e9/rate_floor): the figure
  that compares, because the floor's own path (sender, veth, NAPI) is most of
  the total;
- by CPU time of the path: the sender's thread time (it runs the veth's NAPI,
  so both XDP programs, in its softirqs) plus ksoftirqd's on that CPU, per
  returned frame, and above the floor. On a machine shared with other work the
  sender gets only part of its CPU and the wall-clock rates swing; the CPU time
  does not. (Softirq work the kernel happens to run in another task's context
  on that CPU is missed: at most a veth ring, 256 frames, each time the sender
  loses the CPU.) On a quiet machine both agree; 'CPU share' says how quiet.

Every trial checks what came back: the counts by kind, and every sampled frame
(each 1024th, 64 kept) decoded by scapy: outer header to the backend that
l4lb's Maglev in Python (l4lb/maglev.py, l4lb/flowhash.py) predicts for the
inner flow, from the LB's address, to that backend's MAC; the inner packet
byte for byte the one the sender sent (rebuilt from a scapy template by
l4lb/lab/flows.py, checksums included). Any mismatch fails the run (exit 1).

Run as root: `.venv/bin/python bench/traffic.py` (about 40 s per round with the
default 5 s trials); `--quick` (0.25 s trials, 2 rounds, 64k-entry flow table)
runs every step, for tests/test_bench.py: its figures are not measurements.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from scapy.all import IP, TCP, Ether, IPv6, Raw, raw

from l4lb import flowhash, maglev
from l4lb.datapath import netlink
from l4lb.datapath.engine import hash_seed
from l4lb.datapath.loader import compile_program
from l4lb.datapath.recorder import FilterEntry, RecorderMaps
from l4lb.datapath.source import compile_bpf
from l4lb.lab import netns
from l4lb.lab.bpffs import private_bpffs
from l4lb.lab.flows import ETH_HLEN, FLOW_SPACE, flow_frames, flow_of
from l4lb.lab.pktenv import (
    EDGE_IF, EDGE_PEER, EDGE_V4, EDGE_V6, PacketEnv, backend_mac, edge_backends_v4, edge_backends_v6,
)
from l4lb.models import Service
from l4lb.recfilter import parse_filter

ROOT = Path(__file__).resolve().parent.parent
TRAFFICGEN = ROOT / "build" / "trafficgen"
XDP_SOURCE = ROOT / "bench" / "c" / "traffic_xdp.c"     # the floor and the receiver
VIP4, VIP6 = "198.51.100.1", "2001:db8:100::1"
CLIENT = {4: "203.0.113.0", 6: "2001:db8:77::"}   # last byte: the flow number's (l4lb/lab/flows.py)
FRAME_LEN = {4: 64, 6: 84}                        # Ethernet + IP + TCP + 10 bytes
SAME_FLOW = 7                                     # the flow number of the same-flow rows
N_BACKENDS = 100
RX_IPIP, RX_IP6IP6, RX_OTHER = range(3)           # enum rx_kind of traffic_xdp.c
RECORDER_FILTER = f"192.0.2.77 0 {VIP4} 80 tcp"   # armed, never matches the bench's clients


@dataclass(frozen=True)
class Row:
    label: str
    prog: str       # "floor", "l4lb" or "recorder"
    family: int
    new_flows: bool

    @property
    def kind(self) -> int:
        if self.prog == "floor":
            return RX_OTHER
        return RX_IPIP if self.family == 4 else RX_IP6IP6


ROWS = (
    Row("floor v4: MAC swap + XDP_TX", "floor", 4, False),
    Row("floor v6: MAC swap + XDP_TX", "floor", 6, False),
    Row("l4lb v4, same flow (flow-table hit)", "l4lb", 4, False),
    Row("l4lb v6, same flow (flow-table hit)", "l4lb", 6, False),
    Row("l4lb v4, new flow every frame (SYN)", "l4lb", 4, True),
    Row("l4lb v6, new flow every frame (SYN)", "l4lb", 6, True),
    Row("l4lb v4, same flow, recorder armed, no match", "recorder", 4, False),
)


@dataclass(frozen=True)
class Trial:
    returned: int     # frames of the expected kind back at the receiver
    sent: int
    seconds: float    # the sender's wall-clock time
    cpu_seconds: float  # CPU time of the path: the sender's thread and ksoftirqd on its CPU
    checked: int      # sampled frames decoded and checked

    @property
    def mpps(self) -> float:
        return self.returned / self.seconds / 1e6

    @property
    def cpu_ns(self) -> float:
        """CPU ns per returned frame."""
        return self.cpu_seconds * 1e9 / self.returned


class BenchError(RuntimeError):
    """What came back is not what l4lb should have sent."""


class Rig:
    """The namespace, the programs and the swaps between them on edge0."""

    def __init__(self, env: PacketEnv, cpu: int) -> None:
        self.env, self.cpu = env, cpu
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
        RecorderMaps(self.recorder.bpf).write(entries)
        from bcc import BPF

        self.rx = compile_bpf("traffic_xdp.c", text=XDP_SOURCE.read_text())
        self.fds = {"floor": self.rx.load_func(b"floor_macswap", BPF.XDP).fd,
                    "l4lb": env.dp.prog_fd, "recorder": self.recorder.fd}
        rx_fd = self.rx.load_func(b"rx_count", BPF.XDP).fd
        self.modes = {EDGE_PEER: env.call(self._attach, EDGE_PEER, rx_fd, None)}
        self.current = env.dp.prog_fd  # PacketEnv attached the datapath to edge0
        self.modes[EDGE_IF] = env.call(self._attach, EDGE_IF, self.current, self.current)

    @staticmethod
    def _attach(ifname: str, fd: int, expected: int | None) -> str:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            state = netlink.xdp_state(ipr, netlink.ifindex(ipr, ifname))
            return netlink.attach(ipr, ifname, fd, "native", expected, state)

    def use(self, prog: str) -> None:
        fd = self.fds[prog]
        if fd != self.current:
            self.env.call(self._attach, EDGE_IF, fd, self.current)
            self.current = fd

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
               "-F", "S" if row.new_flows else "A", "-t", seconds, "-C", self.cpu, "-l", FRAME_LEN[fam]]
        out = dict(kv.split("=") for kv in netns.run(self.env.ns, *cmd, timeout=seconds + 60).stdout.split())
        if row.new_flows:
            self.next_flow[fam] = int(out["next"])
        return int(out["sent"]), float(out["seconds"]), float(out["cpu_seconds"]), first

    def trial(self, row: Row, seconds: float) -> Trial:
        self.use(row.prog)
        self.rx["rx_samples"].clear()
        before, soft0 = self.counts(), self.softirqd_ns()
        sent, took, cpu, first = self.send(row, seconds)
        time.sleep(0.05)  # the last batch's frames still in the veth rings
        after, soft1 = self.counts(), self.softirqd_ns()
        got = [a - b for a, b in zip(after, before)]
        returned = got[row.kind]
        stray = sum(got) - returned
        # A few stray frames are the LB namespace's own (IPv6 neighbour/router traffic on edge0).
        if stray > max(10, returned // 1000):
            raise BenchError(f"{row.label}: {stray} of {sum(got)} returned frames were not of the expected kind {got}")
        checked = self.check(row, self.samples(), first, self.next_flow[row.family])
        if returned and not checked:
            raise BenchError(f"{row.label}: no sampled frame to check")
        return Trial(returned, sent, took, cpu + (soft1 - soft0) / 1e9, checked)

    def softirqd_ns(self) -> int:
        """CPU time of ksoftirqd on the sender's CPU: the softirq work the kernel
        deferred there instead of running it in the sender's context."""
        return int(Path(f"/proc/{self.softirqd}/schedstat").read_text().split()[0])

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
            if row.prog != "floor":
                outer = inner
                if (outer.proto if row.family == 4 else outer.nh) != (4 if row.family == 4 else 41):
                    raise BenchError(f"{row.label}: not encapsulated: {frame.summary()}")
                inner = outer.payload
                want = self.backend(row.family, inner.src, inner[TCP].sport)
                src = EDGE_V4 if row.family == 4 else EDGE_V6
                if (ipaddress.ip_address(outer.dst), ipaddress.ip_address(outer.src), frame.dst) != \
                        (want, ipaddress.ip_address(src), self.macs[want]):
                    raise BenchError(f"{row.label}: {inner.src} port {inner[TCP].sport} went to {outer.dst} "
                                     f"({frame.dst}) from {outer.src}; Maglev in Python says {want} "
                                     f"({self.macs[want]}) from {src}")
            self.check_inner(row, raw(inner), first, end)
        if stray > 2:
            raise BenchError(f"{row.label}: {stray} of {len(samples)} sampled frames were not the sender's")
        return checked

    def check_inner(self, row: Row, ip: bytes, first: int, end: int) -> None:
        """The inner packet must be, byte for byte, the one the sender sent: its flow
        rebuilt from a scapy template by l4lb/lab/flows.py, checksums included."""
        tmpl = self.template(row)
        flow = flow_of(tmpl[:ETH_HLEN] + ip)
        in_trial = (flow - first) % FLOW_SPACE < (end - first) % FLOW_SPACE if row.new_flows else flow == first
        if not in_trial or bytes(flow_frames(tmpl, flow, 1)[0, ETH_HLEN:]) != ip:
            raise BenchError(f"{row.label}: a packet the sender did not send came back: "
                             f"{(IP(ip) if row.family == 4 else IPv6(ip)).summary()}")

    @cache
    def template(self, row: Row) -> bytes:
        """The frame trafficgen.c builds for flow 0 of `row`."""
        fam = row.family
        ip = IP(src=CLIENT[4], dst=VIP4, id=0, flags="DF", ttl=64) if fam == 4 else \
            IPv6(src=CLIENT[6], dst=VIP6, hlim=64)
        frame = Ether(dst=self.env.edge_mac, src=self.peer_mac) / ip / \
            TCP(sport=1, dport=80, seq=1, flags="S" if row.new_flows else "A", window=65535)
        return raw(frame / Raw(bytes(FRAME_LEN[fam] - len(frame))))

    def backend(self, family: int, client: str, sport: int) -> Any:
        s = self.services[family]
        h = flowhash.flow_hash(client, sport, s.port, 6, self.seed, hash_src_port=s.options.hash_src_port)
        ident = self.tables[family].backend_at(h % self.tables[family].m)
        assert ident is not None
        return ipaddress.ip_address(ident[0])

    def close(self) -> None:
        self.recorder.bpf.cleanup()
        self.rx.cleanup()


def softirqd_pid(cpu: int) -> int:
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == f"ksoftirqd/{cpu}":
                return int(comm.parent.name)
        except OSError:  # a process that just ended
            continue
    raise BenchError(f"no ksoftirqd/{cpu} thread")


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def report(trials: dict[Row, list[Trial]], args: argparse.Namespace, loads: list[tuple[float, ...]],
           modes: dict[str, str], cfg: Any) -> None:
    floors = {r.family: trials[r] for r in ROWS if r.prog == "floor"}
    w = max(len(r.label) for r in ROWS) + 2

    def table(title: str, head: str, cells: Any) -> None:
        print(f"\n{title}\n{'row':<{w}}{head}")
        for row in ROWS:
            print(f"{row.label:<{w}}{cells(row, trials[row], floors[row.family])}")

    def three(values: list[float], fmt: str, width: int = 7) -> str:
        return "".join(f"{x:>{width}{fmt}}" for x in spread(values))

    def over(ts: list[Trial], fs: list[Trial], ns: Any) -> str:
        return " " * 21 if ts is fs else three([ns(t) - ns(f) for t, f in zip(ts, fs)], ".0f")

    print(f"\nReal frames through a veth into the LB's XDP program: {args.rounds} rounds of {args.seconds:g} s "
          f"trials, rows interleaved{'  (--quick: not a measurement)' if args.quick else ''}")
    print(f"sender: build/trafficgen (AF_PACKET, sendmmsg x 256, PACKET_QDISC_BYPASS, fresh headers and checksums "
          f"per frame), pinned to CPU {args.cpu}, where the veth's NAPI also runs both XDP programs; frames "
          f"{FRAME_LEN[4]} B (v4) / {FRAME_LEN[6]} B (v6); XDP {modes[EDGE_IF]} on {EDGE_IF} (the LB), "
          f"{modes[EDGE_PEER]} on {EDGE_PEER} (the receiver)")
    print(f"l4lb: {N_BACKENDS}-backend services, M={cfg.maglev_m}, flow table {cfg.flow_table_size:,} entries; "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in loads[0])} at start, "
          f"{' '.join(f'{x:.1f}' for x in loads[1])} at end")
    table("By wall clock: frames back per second, and ns per frame above the floor (1e9/rate - 1e9/rate of the "
          "floor of the same family, same round)",
          f"{'Mpps min':>10}{'med':>7}{'max':>7}{'+ns min':>10}{'med':>7}{'max':>7}{'returned':>10}{'checked':>9}",
          lambda row, ts, fs: f"   {three([t.mpps for t in ts], '.3f')}   {over(ts, fs, lambda t: 1e3 / t.mpps)}"
                              f"{sum(t.returned for t in ts) / max(1, sum(t.sent for t in ts)):>10.1%}"
                              f"{sum(t.checked for t in ts):>9}")
    table("By CPU time of the path (the sender's thread + ksoftirqd on its CPU): ns per frame, and above the floor; "
          "'CPU share': that time / wall clock",
          f"{'ns min':>10}{'med':>7}{'max':>7}{'+ns min':>10}{'med':>7}{'max':>7}{'CPU share':>11}",
          lambda row, ts, fs: f"   {three([t.cpu_ns for t in ts], '.0f')}   {over(ts, fs, lambda t: t.cpu_ns)}"
                              f"{statistics.median(t.cpu_seconds / t.seconds for t in ts):>11.0%}")
    print("returned: frames back of the expected kind / frames sent; checked: sampled frames decoded by scapy, "
          "outer header matched against Maglev in Python (backend address and MAC, outer source), inner packet "
          "byte-identical to the one sent.\n"
          "The CPU-time table holds on a shared machine, where another process can take the CPU from the sender "
          "(CPU share < 100 %); on a quiet one both tables agree.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.25 s trials, 2 rounds, small flow table")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one trial (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of interleaved trials (default 3)")
    ap.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1, help="CPU to pin the sender to")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 0.25, 2
    if not TRAFFICGEN.exists():
        print(f"{TRAFFICGEN} is missing: scripts/setup.sh (make setup) builds it", file=sys.stderr)
        return 1
    flow_table = 1 << 16 if args.quick else 1 << 20  # 1 << 20: the datapath's default
    loads = [os.getloadavg()]
    with private_bpffs("l4lb-traffic-") as bpffs:
        with PacketEnv(bpffs, n_backends=N_BACKENDS, prefix="l4traffic", flow_table_size=flow_table) as env:
            rig = Rig(env, args.cpu)
            try:
                trials: dict[Row, list[Trial]] = {r: [] for r in ROWS}
                for _ in range(args.rounds):
                    for row in ROWS:
                        trials[row].append(rig.trial(row, args.seconds))
                modes, cfg = rig.modes, env.dp.cfg
            except BenchError as e:
                print(f"FAILED: {e}", file=sys.stderr)
                return 1
            finally:
                rig.close()
    loads.append(os.getloadavg())
    report(trials, args, loads, modes, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
