#!/usr/bin/env python3
"""Flow-table scan benchmark (not a test): what reading the flow table back for
`status`, `stats` and /metrics costs (l4lb/datapath/flowscan.py).

A real program (compiled by the Datapath, loaded in a private netns, one
service with 64 backends) has its flow table filled to 100 %: every way of
every bucket holds a flow of one of the backends, ages spread over 0-20 s, so
half are active; a tenth are of a generation no longer in force (stale). Then,
per table size, min/median/max over several runs of:

* ``batch read (floor)``: the chunked batch lookup alone, no counting;
* ``scan``: flowscan.scan(), the read plus numpy counting and labelling;
* ``FlowWatch.get, cached``: a call within the cache's second (what a second
  scrape or `status` right after pays).

Run as root: ``.venv/bin/python bench/flowscan.py`` (``--quick``: a 65,536-entry
table, 3 runs, for tests/test_bench.py: its figures are not measurements).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

from l4lb.datapath import flowscan, libbpf  # noqa: E402
from l4lb.datapath.jiffies import KernelClock  # noqa: E402
from l4lb.lab.bpffs import private_bpffs  # noqa: E402
from l4lb.lab.pktenv import PacketEnv, edge_backends_v4  # noqa: E402
from l4lb.models import Service  # noqa: E402

SIZES = (1 << 16, 1 << 20)
N_BACKENDS = 64


def fill(env: PacketEnv, clock: KernelClock, rng: np.random.Generator) -> None:
    """Every way of every bucket: a flow of one of the backends, aged 0-20 s; 10 % stale."""
    flows = env.dp.tables.flows
    _, slots = env.dp.flow_source()[1]
    bids = np.array([b for b, _ in slots], dtype=np.uint32)
    gens = np.array([s.gen for _, s in slots], dtype=np.uint32)
    dtype = np.dtype(flows.Leaf)
    ways = dtype["tag"].shape[0]
    now, hz = clock.now(), clock.hz
    chunk = 8192
    for start in range(0, flows.max_entries, chunk):
        n = min(chunk, flows.max_entries - start)
        rows = np.zeros(n, dtype=dtype)
        pick = rng.integers(0, len(bids), size=(n, ways))
        rows["tag"] = (rng.integers(0, 1 << 16, size=(n, ways)) | 3).astype(np.uint16)
        rows["used"] = (now - rng.integers(0, 20 * hz, size=(n, ways))) & 0xFFFFFFFF
        rows["way"]["backend_id"] = bids[pick]
        rows["way"]["gen"] = gens[pick] + (rng.random((n, ways)) < 0.1)   # 10 %: another generation
        libbpf.update_batch(flows.map_fd, np.arange(start, start + n, dtype=np.uint32), rows, "fill flows")


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(size: int, runs: int, bpffs: Path) -> list[tuple[str, list[float], str]]:
    d = bpffs / f"fs{size}"
    d.mkdir()
    with PacketEnv(d, n_backends=N_BACKENDS, prefix="l4m-fs", maglev_m=251, max_backends=1024,
                   flow_table_size=size) as env:
        backends = [{"address": a} for a in edge_backends_v4(N_BACKENDS)]
        env.apply([Service(name="bench", vip="198.51.100.1", port=80, backends=backends)])
        clock = KernelClock()
        fill(env, clock, np.random.default_rng(1))
        flows = env.dp.tables.flows
        value_size = np.dtype(flows.Leaf).itemsize

        def floor() -> None:
            for _ in libbpf.array_lookup_chunks(flows.map_fd, flows.max_entries, value_size, flowscan.CHUNK_BUCKETS):
                pass

        res = flowscan.scan(*env.dp.flow_source(), clock)
        note = f"{res.used:,} used, {res.active:,} active, {res.stale:,} stale"
        floor_ms: list[float] = []
        scan_ms: list[float] = []
        for _ in range(runs):   # interleaved: both see the same load on a busy machine
            floor_ms += timed(floor, 1)
            scan_ms += timed(lambda: flowscan.scan(*env.dp.flow_source(), clock), 1)
        watch = flowscan.FlowWatch(env.dp.flow_source, clock=clock)
        watch.get()
        rows = [("batch read (floor)", floor_ms, ""), ("scan", scan_ms, note),
                ("FlowWatch.get, cached", timed(watch.get, runs), "")]
        clock.close()
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one 65,536-entry table, 3 runs (a smoke run)")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    sizes, runs = ((1 << 16,), 3) if args.quick else (SIZES, args.runs)
    if args.quick:
        print("quick run: figures are not measurements")
    print(f"flow-table scan, table full, {N_BACKENDS} backends, {runs} runs (ms)")
    print(f"{'entries':>10}  {'what':<22}  {'min':>8}  {'median':>8}  {'max':>8}  note")
    with private_bpffs() as bpffs:
        for size in sizes:
            for label, t, note in measure(size, runs, bpffs):
                print(f"{size:>10,}  {label:<22}  {min(t):>8.3f}  {statistics.median(t):>8.3f}  {max(t):>8.3f}  {note}")


if __name__ == "__main__":
    main()
