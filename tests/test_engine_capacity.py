"""Replacing services and backends when the datapath's maps are nearly full.

The real compiled program (BPF_PROG_TEST_RUN) in a netns with tiny maps: 4
service ids and 7 backend slots. Each change below fits once it is done, but
the old and the new sets together do not, so the datapath must free slots of
what goes away before it can give them to what comes, without a packet ever
seeing a half-written table or a service pointing at a slot that holds
something else, and with rollbacks that put every id and generation back.
"""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import pytest
from scapy.all import IP, TCP, Ether
from test_daemon_harness import dump_pinned_maps
from test_datapath_packets import XDP_PASS, XDP_TX, expected_backend, frame, svc

from l4lb.datapath import DatapathError, DatapathFull, libbpf
from l4lb.datapath.tables import port_host, words_addr
from l4lb.lab import netns
from l4lb.lab.pktenv import PacketEnv, edge_backends_v4
from l4lb.models import Service

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

VIP = "198.51.100.1"
CLIENT = "203.0.113.77"
B = edge_backends_v4(12)
MAX_SERVICES, MAX_BACKENDS = 4, 8  # slot 0 means "no backend": 7 usable slots
# cache_epoch: a failed change still bumps it (the caches must drop what they may hold)
RUNTIME = ("svc_stats", "backend_stats", "reason_stats", "icmp_buckets", "flows", "frags", "cache_epoch")


@pytest.fixture(scope="module")
def env(bpffs: Path):
    with PacketEnv(bpffs, prefix="apb", n_backends=len(B), maglev_m=251, max_services=MAX_SERVICES,
                   max_backends=MAX_BACKENDS, flow_table_size=4096) as e:
        yield e


def send(env: PacketEnv, port: int, sport: int, syn: bool = True) -> tuple[int, str | None]:
    v, out, _ = env.run(frame(CLIENT, VIP, TCP(sport=sport, dport=port, flags="S" if syn else "A")))
    return v, (Ether(out)[IP].dst if v == XDP_TX else None)


def ident(s: Service, addr: str) -> tuple[str, int]:
    return (ipaddress.ip_address(addr).exploded, s.port)


def slot_of(env: PacketEnv, s: Service, addr: str) -> tuple[int, int]:
    """(backend id, generation) of a backend, as the pinned map holds it."""
    bid = env.dp.backend_id(s.key, ident(s, addr))
    assert bid is not None, f"{addr} has no slot"
    return bid, env.call(env.dp.tables.read_backends)[bid].gen


def config_maps(env: PacketEnv) -> dict[str, dict[bytes, bytes]]:
    assert env.dp.prog is not None
    return {k: v for k, v in dump_pinned_maps(env.dp.prog.pin_dir).items() if k not in RUNTIME}


def held_slots(env: PacketEnv) -> set[tuple[int, str, int]]:
    """(service id, address, port) of every used slot in the pinned backends map."""
    return {(v.svc_id, words_addr(v.addr, v.family).exploded, port_host(v.port))
            for v in env.call(env.dp.tables.read_backends).values()}


def assert_serves_exactly(env: PacketEnv, services: list[Service], sports: range = range(40000, 40060)) -> None:
    for s in services:
        for sport in sports:
            assert send(env, s.port, sport) == (XDP_TX, expected_backend(s, CLIENT, sport)), (s.name, sport)
    # ...and the map holds these backends and nothing else (no stale slot left behind).
    assert held_slots(env) == {(env.dp.service_id(s.key), *ident(s, b.address.compressed))
                               for s in services for b in s.backends}


def test_replacing_most_backends_when_the_slots_are_nearly_full(env):
    old = svc("web", VIP, 80, B[:6])                  # 6 of 7 slots
    new = svc("web", VIP, 80, [B[0], *B[6:11]])       # 6 again, but 11 together
    env.apply([old])
    kept = slot_of(env, old, B[0])
    sport = next(p for p in range(1000, 5000) if expected_backend(old, CLIENT, p) == B[0])
    assert send(env, 80, sport) == (XDP_TX, B[0])    # a flow established to the kept backend

    env.apply([new])

    assert slot_of(env, new, B[0]) == kept            # same slot, same generation...
    assert send(env, 80, sport, syn=False) == (XDP_TX, B[0])  # ...so its flow stays
    assert_serves_exactly(env, [new])


def test_replacing_most_services_when_the_ids_are_nearly_full(env):
    old = [svc(f"s{i}", VIP, 80 + i, [B[i]]) for i in range(MAX_SERVICES)]
    new = [old[0], *(svc(f"t{i}", VIP, 90 + i, [B[4 + i], B[8 + i]]) for i in range(MAX_SERVICES - 1))]
    env.apply(old)
    sid = env.dp.service_id(old[0].key)

    env.apply(new)

    assert env.dp.service_id(old[0].key) == sid
    assert_serves_exactly(env, new)
    for s in old[1:]:
        assert send(env, s.port, 1234)[0] == XDP_PASS  # gone services are gone


def test_a_failure_at_any_write_of_a_near_capacity_change_restores_the_maps_exactly(env):
    before = [svc("a", VIP, 80, B[:4]), svc("c", VIP, 81, B[4:6]), svc("e", VIP, 82, [B[6]])]  # 3 ids, 7 slots
    after = [svc("a", VIP, 80, [B[0], *B[7:10]]), svc("d", VIP, 83, [B[10]]), svc("f", VIP, 84, [B[11]])]
    env.apply(before)
    maps = config_maps(env)
    assert len(env.call(env.dp.tables.read_backends)) == 7
    failures = 0
    for k in range(200):
        env.dp.fail_after_writes = k
        try:
            env.apply(after)
        except DatapathError as e:
            assert "injected failure" in str(e)
            failures += 1
            assert config_maps(env) == maps, f"failure after {k} writes left the maps changed"
            assert_serves_exactly(env, before, range(40000, 40010))
            continue
        break
    env.dp.fail_after_writes = None
    assert failures >= 10, "the change should take many writes"  # every stage was hit
    assert_serves_exactly(env, after)


def test_packets_during_near_capacity_swaps_only_see_whole_backends(env):
    a = svc("flip", VIP, 80, B[:6])
    b = svc("flip", VIP, 80, [B[0], *B[6:11]])
    env.apply([a])
    sport = next(p for p in range(1000, 5000) if expected_backend(a, CLIENT, p) == B[0])
    assert send(env, 80, sport) == (XDP_TX, B[0])
    syns = [frame(CLIENT, VIP, TCP(sport=20000 + i, dport=80, flags="S")) for i in range(200)]
    est = frame(CLIENT, VIP, TCP(sport=sport, dport=80, flags="A"))
    stop = threading.Event()
    seen: list[tuple[str, int, str | None]] = []

    def packets() -> None:
        # A second thread in the netns: packets really run while the main worker applies.
        i = 0
        while not stop.is_set():
            for kind, pkt in (("syn", syns[i % len(syns)]), ("est", est)):
                v, out, _ = libbpf.test_run(env.dp.prog_fd, pkt, ingress_ifindex=env.edge_ifindex)
                seen.append((kind, v, Ether(out)[IP].dst if v == XDP_TX else None))
            i += 1

    with netns.NetnsWorker(env.ns) as w:
        fut = w.submit(packets)
        try:
            for i in range(30):
                env.apply([b if i % 2 == 0 else a])
        finally:
            stop.set()
            fut.result()
    assert len(seen) > 100
    allowed = set(B[:11])
    bad = [s for s in seen if s[1] != XDP_TX or s[2] not in allowed or (s[0] == "est" and s[2] != B[0])]
    assert not bad, bad[:5]


def test_many_tables_built_by_worker_processes_equal_one_by_one_builds():
    """A big apply builds its tables in worker processes (maglev.build_many); they
    must be the very tables build() gives, also after a batch was abandoned
    halfway (an apply that failed) and the next batch reuses the workers."""
    from l4lb import maglev

    jobs = [{(f"192.0.2.{1 + j}", 20000 + i): 1 + (i * j) % 7 for j in range(30)}
            for i in range(3 * maglev.PARALLEL_MIN)]
    seed = b"capacity-123"
    expected = [maglev.build(w, 1021, seed) for w in jobs]
    abandoned = maglev.build_many(jobs, 1021, seed)
    assert next(abandoned) == expected[0]
    abandoned.close()
    assert list(maglev.build_many(jobs, 1021, seed)) == expected
    assert maglev._workers is not None and all(p.poll() is None for p in maglev._workers.procs)


def test_a_full_replacement_near_capacity_never_leaves_a_service_on_no_backend(env):
    """Every backend of three services replaced at once, with one slot free: the
    services move over a few slots at a time, and one whose new backends have no
    slot yet keeps one of its old ones meanwhile. Packets sent all along only ever
    go to a backend (old or new), never dropped for want of one."""
    old = [svc(f"r{i}", VIP, 80 + i, B[2 * i:2 * i + 2]) for i in range(3)]     # 6 of 7 slots
    new = [svc(f"r{i}", VIP, 80 + i, B[6 + 2 * i:8 + 2 * i] if i < 2 else [B[10], B[11]]) for i in range(3)]
    syns = {s.port: [frame(CLIENT, VIP, TCP(sport=20000 + j, dport=s.port, flags="S")) for j in range(40)]
            for s in old}
    stop = threading.Event()
    seen: list[tuple[int, int, str | None]] = []

    def packets() -> None:
        i = 0
        while not stop.is_set():
            for port, pkts in syns.items():
                v, out, _ = libbpf.test_run(env.dp.prog_fd, pkts[i % 40], ingress_ifindex=env.edge_ifindex)
                seen.append((port, v, Ether(out)[IP].dst if v == XDP_TX else None))
            i += 1

    for _ in range(3):
        env.apply(old)
        with netns.NetnsWorker(env.ns) as w:
            fut = w.submit(packets)
            try:
                env.apply(new)
            finally:
                stop.set()
                fut.result()
        stop.clear()
        assert_serves_exactly(env, new)
    drops = [s for s in seen if s[1] != XDP_TX]
    assert len(seen) > 100 and not drops, drops[:5]
    allowed = {o.port: {b.address.compressed for b in [*o.backends, *n.backends]} for o, n in zip(old, new)}
    assert all(dst in allowed[port] for port, _, dst in seen)


def test_a_change_that_cannot_fit_without_a_service_on_no_backend_is_refused_and_changes_nothing(env):
    """All 7 slots in use; one service's only backend replaced: its new backend
    could only get a slot if the service ran on none meanwhile. Refused, maps
    and packets as before."""
    before = [svc("one", VIP, 80, [B[0]]), svc("six", VIP, 81, B[1:7])]
    env.apply(before)
    maps = config_maps(env)
    with pytest.raises(DatapathFull, match="does not fit the datapath's maps"):
        env.apply([svc("one", VIP, 80, [B[7]]), before[1]])
    assert config_maps(env) == maps
    assert_serves_exactly(env, before, range(40000, 40010))
