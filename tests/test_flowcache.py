"""The flow cache (bpf_src/lib/flowcache.h) in the real compiled program, via
BPF_PROG_TEST_RUN. Most tests use a table of FLOW_WAYS entries, i.e. ONE
bucket, so every flow competes for the same 8 ways; the bucket is read with
BCC's ctypes for the map (flows.Leaf). A second program with 128 buckets
shows how flows spread and that the table is shared by all CPUs."""

from __future__ import annotations

import ctypes as ct
import functools
import ipaddress
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scapy.all import IP, TCP, Ether, raw

from l4lb import flowhash, maglev
from l4lb.config import ConfigError, parse
from l4lb.datapath.config import DatapathError
from l4lb.datapath.engine import hash_seed
from l4lb.datapath import flowscan, libbpf
from l4lb.datapath.jiffies import KernelClock
from l4lb.datapath.loader import FLOW_WAYS, flow_cflags
from l4lb.lab import testrun
from l4lb.lab.flows import flow_frames
from l4lb.lab.pktenv import PacketEnv, edge_backends_v4
from l4lb.models import Service

XDP_TX = 3
M = 251
SEED = b"l4lb-default"
VIP = "198.51.100.1"
CLIENT = "203.0.113.77"
B = edge_backends_v4(12)
TAG_EST = 2             # FLOW_TAG_EST in maps.h
BUCKET_BYTES = 448      # 64-byte header + 8 ways of 48 bytes
# Long enough for the kernel's jiffies (HZ >= 100) to move between two packets.
TICK = 0.025


def _env(bpffs: Path, sub: str, size: int) -> PacketEnv:
    d = bpffs / sub   # our own pins: no other module's maps of the same layout
    d.mkdir(exist_ok=True)
    return PacketEnv(d, n_backends=len(B), prefix="fc", maglev_m=M, max_backends=1024, flow_table_size=size)


@pytest.fixture(scope="module")
def one(bpffs: Path):
    """A table of exactly one bucket."""
    with _env(bpffs, "flowcache-one", FLOW_WAYS) as e:
        yield e


@pytest.fixture(scope="module")
def many(bpffs: Path):
    with _env(bpffs, "flowcache-many", 1024) as e:
        yield e


def svc(backends: list, **options) -> Service:
    return Service(name="fc", vip=VIP, port=80, options=options,
                   backends=[b if isinstance(b, dict) else {"address": b} for b in backends])


@functools.lru_cache(maxsize=16)
def _table(weights: tuple) -> maglev.MaglevTable:
    return maglev.build(dict(weights), M, SEED)


def pick(s: Service, sport: int, client: str = CLIENT) -> str:
    """The backend Maglev gives this flow (Python model of the datapath)."""
    table = _table(tuple(s.maglev_weights().items()))  # moving() asks thousands of times
    h = flowhash.flow_hash(client, sport, s.port, 6, hash_seed(SEED), hash_src_port=s.options.hash_src_port)
    ident = table.backend_at(h % M)
    assert ident is not None
    return str(ipaddress.ip_address(ident[0]))


def send(env: PacketEnv, sport: int, flags: str, client: str = CLIENT) -> str:
    """Run one TCP packet through the program; the backend it was sent to."""
    pkt = raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22") / IP(src=client, dst=VIP)
              / TCP(sport=sport, dport=80, flags=flags))
    v, out, _ = env.run(pkt)
    assert v == XDP_TX, f"sport {sport} {flags}: verdict {v}"
    return Ether(out)[IP].dst


@dataclass(frozen=True)
class Way:
    sport: int
    established: bool
    used: int
    backend_id: int
    gen: int


def bucket(env: PacketEnv, i: int = 0):
    return env.dp.tables.flows[ct.c_uint32(i)]


def ways(env: PacketEnv, i: int = 0) -> list[Way]:
    b = bucket(env, i)
    return [Way(socket.ntohs(b.way[w].key.sport), bool(b.tag[w] & TAG_EST), b.used[w], b.way[w].backend_id,
                b.way[w].gen) for w in range(FLOW_WAYS) if b.tag[w]]


def by_sport(env: PacketEnv) -> dict[int, Way]:
    ws = ways(env)
    assert len({w.sport for w in ws}) == len(ws), f"a flow holds two ways: {ws}"
    return {w.sport: w for w in ws}


def fresh(env: PacketEnv, s: Service) -> None:
    """Apply `s` and empty the bucket (tests share the program; the datapath
    itself never needs this)."""
    env.apply([s])
    env.dp.tables.flows[ct.c_uint32(0)] = env.dp.tables.flows.Leaf()


def backend_addr(env: PacketEnv, s: Service, addr: str) -> int:
    bid = env.dp.backend_id(s.key, (ipaddress.ip_address(addr).exploded, 80))
    assert bid is not None, addr
    return bid


def moving(a: Service, b: Service, n: int, start: int = 20000) -> list[int]:
    """n client ports whose Maglev backend differs between a and b."""
    out = [p for p in range(start, start + 5000) if pick(a, p) != pick(b, p)][:n]
    assert len(out) == n
    return out


# --- one bucket ---------------------------------------------------------------------------

@pytest.mark.bpf
@pytest.mark.netns
def test_bucket_layout_is_what_the_c_struct_says(one):
    assert ct.sizeof(one.dp.tables.flows.Leaf) == BUCKET_BYTES
    info = one.call(lambda: one.dp.tables.flows.max_entries)
    assert info == 1, "a table of FLOW_WAYS entries is one bucket"


@pytest.mark.bpf
@pytest.mark.netns
def test_established_flows_keep_their_backend_across_a_maglev_change(one):
    a, b = svc(B[:3]), svc(B[:8])
    fresh(one, a)
    ports = moving(a, b, FLOW_WAYS)
    before = {}
    for p in ports:
        before[p] = send(one, p, "S")
        assert before[p] == pick(a, p)
        assert send(one, p, "A") == before[p]
    assert {w.sport for w in ways(one)} == set(ports) and all(w.established for w in ways(one))
    one.apply([b])
    for p in ports:
        assert send(one, p, "A") == before[p], "established flow left its backend"
    # A new connection on the same ports goes by the new table.
    assert send(one, ports[0], "S") == pick(b, ports[0]) != before[ports[0]]


@pytest.mark.bpf
@pytest.mark.netns
def test_a_syn_evicts_the_oldest_embryonic_way_never_an_established_one(one):
    a, b = svc(B[:3]), svc(B[:8])
    fresh(one, a)
    est = moving(a, b, 1, start=30000)[0]
    est_backend = send(one, est, "S")
    send(one, est, "A")                 # established, and now the oldest way
    embryonic = list(range(31001, 31008))
    for p in embryonic:
        time.sleep(TICK)
        send(one, p, "S")
    w = by_sport(one)
    assert len(w) == FLOW_WAYS and w[est].established and not any(w[p].established for p in embryonic)
    ages = [w[est].used] + [w[p].used for p in embryonic]
    assert ages == sorted(ages) and len(set(ages)) == len(ages), f"clock did not move between packets: {ages}"

    time.sleep(TICK)
    send(one, 31100, "S")
    assert set(by_sport(one)) == {est, *embryonic[1:], 31100}, "the oldest embryonic way goes first"
    # A SYN flood: the established flow keeps its way throughout.
    for p in range(31200, 31240):
        send(one, p, "S")
        w = by_sport(one)
        assert len(w) == FLOW_WAYS and est in w and w[est].established
    one.apply([b])
    assert send(one, est, "A") == est_backend != pick(b, est)


@pytest.mark.bpf
@pytest.mark.netns
def test_with_only_established_ways_the_least_recently_used_goes(one):
    fresh(one, svc(B[:4]))
    flows = list(range(32000, 32000 + FLOW_WAYS))
    for p in flows:
        time.sleep(TICK)
        send(one, p, "S")
        send(one, p, "A")
    time.sleep(TICK)
    send(one, flows[0], "A")            # a hit refreshes: flows[1] is now the least recently used
    w = by_sport(one)
    assert all(x.established for x in w.values()) and w[flows[0]].used > w[flows[1]].used
    assert min(w.values(), key=lambda x: x.used).sport == flows[1]
    send(one, 32100, "S")
    w = by_sport(one)
    assert set(w) == {flows[0], *flows[2:], 32100}
    assert not w[32100].established


@pytest.mark.bpf
@pytest.mark.netns
def test_a_syn_of_a_known_flow_repicks_by_maglev_and_overwrites_its_way(one):
    a, b = svc(B[:3]), svc(B[:8])
    fresh(one, a)
    p = moving(a, b, 1, start=33000)[0]
    old = send(one, p, "S")
    send(one, p, "A")
    one.apply([b])
    assert send(one, p, "A") == old
    new = send(one, p, "S")             # the client reuses the port: a new connection
    assert new == pick(b, p) != old
    w = by_sport(one)
    assert len(w) == 1, "the same key must not take a second way"
    assert w[p].backend_id == backend_addr(one, b, new) and not w[p].established
    assert send(one, p, "A") == new and by_sport(one)[p].established


@pytest.mark.bpf
@pytest.mark.netns
def test_a_maintenance_backend_loses_its_established_flows(one):
    a = svc(B[:4])
    fresh(one, a)
    flows = {p: send(one, p, "S") for p in range(34000, 34000 + FLOW_WAYS)}
    for p in flows:
        send(one, p, "A")
    victim = flows[34000]
    down = svc([{"address": x, "state": "maintenance" if x == victim else "active"} for x in B[:4]])
    drained = svc([{"address": x, "state": "draining" if x == victim else "active"} for x in B[:4]])
    one.apply([drained])
    assert send(one, 34000, "A") == victim, "draining keeps established flows"
    one.apply([down])
    for p, be in flows.items():
        got = send(one, p, "A")
        assert got == (pick(down, p) if be == victim else be)
    assert send(one, 34000, "A") != victim
    assert by_sport(one)[34000].backend_id != backend_addr(one, a, victim), "the way was re-pointed"


@pytest.mark.bpf
@pytest.mark.netns
def test_an_entry_for_a_reused_backend_slot_is_not_honoured(one):
    """Entries carry the slot's gen: when the slot goes to another backend,
    its old flows go by Maglev instead of to the slot's new owner."""
    a = svc(B[:2])
    fresh(one, a)
    ports = [p for p in range(35000, 36000) if pick(a, p) == B[0]][:FLOW_WAYS]
    for p in ports:
        assert send(one, p, "S") == B[0]
        send(one, p, "A")
    slot = backend_addr(one, a, B[0])
    gen = by_sport(one)[ports[0]].gen
    # B[0] leaves; then two new backends come: the freed slot goes to one of them.
    one.apply([svc([B[1]])])
    b = svc([B[1], B[9], B[10]])
    one.apply([b])
    owner = next((x for x in (B[9], B[10]) if backend_addr(one, b, x) == slot), None)
    assert owner is not None, "precondition: the freed slot was reused"
    assert one.dp.tables.backends[ct.c_uint32(slot)].gen != gen
    others = [p for p in ports if pick(b, p) != owner]
    assert others, "precondition: some flow's Maglev backend is not the slot's new owner"
    for p in ports:
        assert send(one, p, "A") == pick(b, p)


@pytest.mark.bpf
@pytest.mark.netns
def test_a_busy_bucket_is_read_unlocked_and_not_written(one):
    """A bucket whose lock stays taken (its holder interrupted, say): lookups
    still find their flows, inserts are skipped, nothing spins forever."""
    a, b = svc(B[:3]), svc(B[:8])
    fresh(one, a)
    p = moving(a, b, 1, start=36000)[0]
    old = send(one, p, "S")
    send(one, p, "A")
    one.apply([b])
    t = one.dp.tables.flows
    leaf = t[ct.c_uint32(0)]
    leaf.lock |= 1                       # odd: held by someone
    t[ct.c_uint32(0)] = leaf
    try:
        time.sleep(TICK)
        assert send(one, p, "A") == old  # found without the lock
        assert send(one, 36999, "S") == pick(b, 36999)
        after = bucket(one)
        assert bytes(after) == bytes(leaf), "a busy bucket must not be written"
    finally:
        leaf.lock += 1                   # released
        t[ct.c_uint32(0)] = leaf
    send(one, 36999, "S")
    assert 36999 in by_sport(one)


# --- many buckets ---------------------------------------------------------------------------

@pytest.mark.bpf
@pytest.mark.netns
def test_client_ip_affinity_flows_spread_over_buckets(many):
    """The bucket is a hash of the FULL key: with client-IP affinity the Maglev
    hash has no client port, so it would put all of a client's connections
    in one bucket (and evict all but 8)."""
    s = svc(B[:4], hash_src_port=False)
    many.apply([s])
    ports = list(range(40000, 40064))
    got = {send(many, p, "S") for p in ports}
    assert got == {pick(s, ports[0])}, "affinity: one backend for the client"
    n = many.dp.tables.flows.max_entries
    used = {}
    for i in range(n):
        for w in ways(many, i):
            used.setdefault(w.sport, []).append(i)
    assert all(len(used.get(p, [])) == 1 for p in ports), "every flow is remembered, once"
    assert len({used[p][0] for p in ports}) >= 32, "64 flows of one client should land in many of 128 buckets"


@pytest.mark.bpf
@pytest.mark.netns
def test_the_table_is_shared_by_all_cpus(many):
    """veth runs XDP on the sender's CPU, so one flow's packets meet different
    CPUs: a SYN seen on one CPU must be known on the other."""
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "needs two CPUs"
    a, b = svc(B[:3]), svc(B[:8])
    many.apply([a])
    ports = moving(a, b, 4, start=41000)

    def on(cpu: int, sport: int, flags: str) -> str:
        def run() -> tuple[int, bytes, int]:
            mask = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cpu})
            try:
                pkt = raw(Ether() / IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags=flags))
                return libbpf.test_run(many.dp.prog_fd, pkt, ingress_ifindex=many.edge_ifindex)
            finally:
                os.sched_setaffinity(0, mask)
        v, out, _ = many.call(run)
        assert v == XDP_TX
        return Ether(out)[IP].dst

    first = {p: on(cpus[0], p, "S") for p in ports}
    many.apply([b])
    for p in ports:
        assert on(cpus[1], p, "A") == first[p]


@pytest.mark.bpf
@pytest.mark.netns
def test_a_syn_flood_with_two_maglev_changes_moves_no_established_flow(many):
    """Issue 16: 20 established flows, then a flood of SYNs of distinct flows
    (40 per way of the 1,024-entry table) in three bursts with a Maglev change
    between them. Every established flow keeps its backend, although Maglev
    alone would move some of them. The flood runs through the test-run batch
    loop (l4lb/lab/testrun.py), a few hundred ms, not a real-time flood."""
    a, b, c = svc(B[:3]), svc(B[:6]), svc(B[:9])
    many.apply([a])
    ports = list(range(42000, 42020))
    before = {p: send(many, p, "S") for p in ports}
    for p in ports:
        assert send(many, p, "A") == before[p]
    moved_by_maglev = [p for p in ports if pick(c, p) != before[p]]
    assert moved_by_maglev, "precondition: the two changes move some of these flows in Maglev"

    template = raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22") / IP(src="198.51.100.0", dst=VIP)
                   / TCP(sport=1, dport=80, flags="S"))
    burst = 40 * many.dp.tables.flows.max_entries * FLOW_WAYS // 3
    for i, change in enumerate((b, c, None)):
        frames = flow_frames(template, i * burst, burst)
        r = many.call(testrun.run_frames, many.dp.prog_fd, frames, ingress_ifindex=many.edge_ifindex, calls=burst)
        assert r.verdicts == {"tx": burst}
        for p in ports:                  # the established flows keep talking during the flood
            assert send(many, p, "A") == before[p], f"flow {p} moved during burst {i}"
        if change is not None:
            many.apply([change])
    assert {p: send(many, p, "A") for p in ports} == before, "0 of 20 established flows may move"
    assert send(many, moved_by_maglev[0], "S") == pick(c, moved_by_maglev[0]), "new connections follow Maglev"
# --- the table read back (l4lb/datapath/flowscan.py) ---------------------------------------

@pytest.mark.bpf
@pytest.mark.netns
def test_flowscan_counts_fill_and_active_inactive_flows_per_backend(many):
    """What `l4lbctl status` / `stats` and /metrics report, read from flows the
    real program inserted: fill, per backend active (used within the window)
    or inactive, and entries of a removed backend as stale (counted for nobody)."""
    s = svc(B[:6])
    many.apply([s])
    flows = many.dp.tables.flows
    n = flows.max_entries
    libbpf.update_batch(flows.map_fd, np.arange(n, dtype=np.uint32), bytes(n * ct.sizeof(flows.Leaf)))
    ports = list(range(41000, 41040))
    want = Counter(send(many, p, "S") for p in ports)
    clock = KernelClock()
    ident = {b: (ipaddress.ip_address(b).exploded, 80) for b in B[:6]}

    def counts(res: flowscan.FlowScan) -> dict[str, tuple[int, int]]:
        out = {b: res.backends[(s.key, ident[b])] for b in B[:6]}
        assert set(res.backends) == {(s.key, ident[b]) for b in B[:6]}
        return out

    res = flowscan.scan(*many.dp.flow_source(), clock, chunk=16)  # 128 buckets: 8 batch reads
    assert (res.capacity, res.used, res.stale) == (n * FLOW_WAYS, len(ports), 0)
    assert counts(res) == {b: (want[b], 0) for b in B[:6]}

    # Age the flows of one backend past the window, as 11 s without a packet would.
    old = max(want, key=lambda b: want[b])
    old_id = backend_addr(many, s, old)
    stamp = (clock.now() - clock.ticks(flowscan.ACTIVE_WINDOW + 1)) & 0xFFFFFFFF
    for i in range(n):
        bk = flows[ct.c_uint32(i)]
        hit = [w for w in range(FLOW_WAYS) if bk.tag[w] and bk.way[w].backend_id == old_id]
        for w in hit:
            bk.used[w] = stamp
        if hit:
            flows[ct.c_uint32(i)] = bk
    res = flowscan.scan(*many.dp.flow_source(), clock)
    assert counts(res)[old] == (0, want[old])
    assert res.active == len(ports) - want[old] and res.used == len(ports)

    # Its removal leaves its entries in the table, counted for nobody.
    many.apply([svc([b for b in B[:6] if b != old])])
    res = flowscan.scan(*many.dp.flow_source(), clock)
    assert (res.used, res.stale) == (len(ports), want[old])
    assert (s.key, ident[old]) not in res.backends and res.active == len(ports) - want[old]


@pytest.mark.bpf
def test_kernel_clock_reads_jiffies_and_hz():
    clock = KernelClock()
    a = clock.now()
    assert clock.hz in (100, 250, 300, 1000)
    assert 0 < (clock.now() - a) & 0xFFFFFFFF < 10 * clock.hz, "jiffies did not move over the HZ calibration"
    clock.close()


# --- configuration (no root) --------------------------------------------------------------

@pytest.mark.parametrize("size", [1000, 4095, 100000, 3 << 20])
def test_config_refuses_a_flow_table_size_that_is_not_a_power_of_two(size):
    with pytest.raises(ConfigError) as e:
        parse(f"[datapath]\ninterfaces = ['eth0']\nflow_table_size = {size}\n")
    assert "datapath.flow_table_size" in str(e.value)
    if size >= 1024:
        assert "power of two" in str(e.value)


def test_config_takes_powers_of_two():
    for size in (1024, 65536, 1 << 20, 1 << 26):
        assert parse(f"[datapath]\ninterfaces = ['eth0']\nflow_table_size = {size}\n").datapath.flow_table_size == size


def test_loader_geometry():
    assert flow_cflags(1 << 20) == ["-DFLOW_TABLE_SIZE=1048576", f"-DFLOW_WAYS={FLOW_WAYS}",
                                     f"-DFLOW_BUCKETS={(1 << 20) // FLOW_WAYS}"]
    for bad in (0, 4, 1000, 12288):
        with pytest.raises(DatapathError, match="power of two"):
            flow_cflags(bad)
