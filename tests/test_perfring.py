"""The hand-written perf ring reader (l4lb.recorder.perfring) on a real BPF program.

A tiny XDP program (compiled once for the module) submits, on every BPF_PROG_TEST_RUN pass,
a 16-byte header (sequence number, capture length, packet length) followed by the first
``cap`` bytes of the packet to a BPF_PERF_OUTPUT map, ``cap`` being the packet's first two
bytes (little-endian). It counts the submissions the kernel refused (ring full). The tests
read its rings with PerfRings and compare every sample with what was sent."""

from __future__ import annotations

import ctypes as ct
import os
import platform
import select
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import _require_root
from l4lb.datapath import libbpf
from l4lb.datapath.source import compile_bpf
from l4lb.recorder import perfring
from l4lb.recorder.perfring import PAGE, PerfRingError, PerfRings, online_cpus, split

pytestmark = [pytest.mark.bpf]

EMIT_C = """
#include <uapi/linux/bpf.h>
struct meta { u64 seq; u32 cap; u32 len; };
BPF_PERF_OUTPUT(events);
BPF_ARRAY(counters, u64, 2);   /* 0: next sequence number, 1: refused submissions */

int emit(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    u32 zero = 0, one = 1;
    u64 *seq = counters.lookup(&zero);
    if (!seq || data + 2 > end)
        return XDP_ABORTED;
    struct meta m = {};
    u64 len = end - data;
    u64 cap = *(u16 *)data;
    if (cap > len)
        cap = len;
    m.seq = __sync_fetch_and_add(seq, 1);
    m.cap = cap;
    m.len = len;
    int rc = events.perf_submit_skb(ctx, cap, &m, sizeof(m));
    if (rc) {
        u64 *refused = counters.lookup(&one);
        if (refused)
            __sync_fetch_and_add(refused, 1);
    }
    return XDP_PASS;
}
"""
META = struct.Struct("<QII")


class Emitter:
    def __init__(self) -> None:
        from bcc import BPF

        self.bpf = compile_bpf("test_perfring:emit", text=EMIT_C)
        self.fd = self.bpf.load_func(b"emit", BPF.XDP).fd
        self.map_fd = self.bpf[b"events"].map_fd
        self.counters = self.bpf[b"counters"]

    def counter(self, i: int) -> int:
        return int(self.counters[ct.c_int(i)].value)

    def run(self, packet: bytes, repeat: int = 1) -> None:
        verdict, _, _ = libbpf.test_run(self.fd, packet, repeat=repeat)
        assert verdict == 2, "XDP_PASS: the program ran to the end"


@pytest.fixture(scope="module")
def emitter() -> Iterator[Emitter]:
    _require_root()
    e = Emitter()
    yield e
    e.bpf.cleanup()


@pytest.fixture(params=["libatomic", "plain"] if platform.machine() in perfring._TSO else ["libatomic"])
def ordering(request, monkeypatch) -> str:
    """The ways of ordering data_head/data_tail on this machine: libatomic's acquire/release,
    and (x86 only) the plain loads and stores used when libatomic is missing."""
    if request.param == "plain":
        monkeypatch.setattr(perfring, "_atomics", lambda: None)
    else:
        assert perfring._atomics() is not None, "libatomic is installed here"
    return request.param


@contextmanager
def on_cpu(cpu: int) -> Iterator[None]:
    """Run this thread (and so BPF_PROG_TEST_RUN) on one CPU: one ring gets every sample."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def packet(cap: int, length: int, salt: int = 0) -> bytes:
    body = bytes((i * 7 + salt) & 0xFF for i in range(length - 2))
    return struct.pack("<H", cap) + body


def check_chunk(chunk, sent: dict[int, bytes]) -> list[int]:
    """Every sample of a chunk against the packet that made it; their sequence numbers."""
    seqs = []
    for off in chunk.samples:
        seq, cap, length = META.unpack_from(chunk.buf, off)
        raw_size = struct.unpack_from("<I", chunk.buf, off - 4)[0]
        p = sent[seq]
        assert (cap, length) == (min(struct.unpack_from("<H", p)[0], len(p)), len(p)), seq
        assert raw_size >= META.size + cap and (raw_size + 4) % 8 == 0, "raw size covers header, data, padding"
        assert chunk.buf[off + META.size:off + META.size + cap] == p[:cap], f"sample {seq} intact"
        seqs.append(seq)
    return seqs


def test_every_sample_arrives_intact_in_order(emitter: Emitter, ordering: str) -> None:
    rings = PerfRings(emitter.map_fd, page_cnt=64)
    try:
        first = emitter.counter(0)
        sent: dict[int, bytes] = {}
        got: list[int] = []
        shapes = [(0, 14), (1, 60), (60, 60), (61, 200), (1499, 1500), (1500, 1500), (9000, 300), (64, 65)]
        for i, (cap, length) in enumerate(shapes * 4):
            p = packet(cap, length, salt=i)
            seq0 = emitter.counter(0)
            emitter.run(p, repeat=25)
            sent.update({seq0 + k: p for k in range(25)})
            for chunk in rings.read():
                seqs = check_chunk(chunk, sent)
                assert seqs == sorted(seqs), "a CPU's ring keeps the order of writing"
                got += seqs
        assert sorted(got) == list(range(first, emitter.counter(0))), "every sample once, none missing"
        assert rings.lost == 0 and rings.read() == []
    finally:
        rings.close()


def test_records_wrapping_the_ring_end_arrive_whole(emitter: Emitter, ordering: str) -> None:
    # One page of ring, records of 136 bytes (4096 is no multiple): records straddle the end.
    rings = PerfRings(emitter.map_fd, page_cnt=1)
    straddled = 0
    try:
        with on_cpu(0):
            ring = next(r for r in rings.rings if r.cpu == 0)
            sent: dict[int, bytes] = {}
            for i in range(120):
                p = packet(101 + i % 3, 150, salt=i)
                seq0 = emitter.counter(0)
                emitter.run(p, repeat=7)
                sent.update({seq0 + k: p for k in range(7)})
                tail = ring.tail
                (chunk,) = rings.read()
                assert check_chunk(chunk, sent) == list(range(seq0, seq0 + 7))
                for off in chunk.samples:
                    start = (tail + off - 12) % ring.data_size
                    size = struct.unpack_from("<H", chunk.buf, off - 12 + 6)[0]
                    straddled += start + size > ring.data_size
        assert ring.wraps > 0 and straddled > 0, (ring.wraps, straddled)
        assert rings.lost == 0
    finally:
        rings.close()


def test_lost_records_are_counted_on_their_cpu(emitter: Emitter) -> None:
    cpus = online_cpus()
    cpu = cpus[-1]
    rings = PerfRings(emitter.map_fd, page_cnt=1)
    try:
        with on_cpu(cpu):
            refused0, seq0 = emitter.counter(1), emitter.counter(0)
            emitter.run(packet(101, 150), repeat=200)       # 200 x 136 bytes into 4 KiB
            refused = emitter.counter(1) - refused0
            assert refused > 0
            received = sum(len(c.samples) for c in rings.read())
            # The kernel reports the refused samples with the next one it accepts.
            emitter.run(packet(101, 150), repeat=1)
            chunks = rings.read()
        received += sum(len(c.samples) for c in chunks)
        by_cpu = {r.cpu: r.lost for r in rings.rings}
        assert by_cpu[cpu] == refused and sum(by_cpu.values()) == refused, by_cpu
        assert [c.lost for c in chunks] == [refused]
        assert received + refused == emitter.counter(0) - seq0 == 201
    finally:
        rings.close()


def test_the_reader_wakes_at_the_watermark_not_per_sample(emitter: Emitter) -> None:
    rings = PerfRings(emitter.map_fd, page_cnt=4, watermark=2048)
    ep = select.epoll()
    try:
        for fd in rings.fds:
            ep.register(fd, select.EPOLLIN)
        cpu = online_cpus()[0]
        fd = next(r.fd for r in rings.rings if r.cpu == cpu)
        with on_cpu(cpu):
            emitter.run(packet(101, 150), repeat=10)       # 1360 bytes: below the watermark
            assert ep.poll(0.2) == []
            emitter.run(packet(101, 150), repeat=10)       # 2720 bytes: past it
            assert [f for f, _ in ep.poll(1.0)] == [fd]
        assert sum(len(c.samples) for c in rings.read()) == 20
    finally:
        ep.close()
        rings.close()


def test_closed_rings_take_no_more_samples(emitter: Emitter) -> None:
    rings = PerfRings(emitter.map_fd, page_cnt=1)
    fds = rings.fds
    rings.close()
    rings.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    refused0 = emitter.counter(1)
    emitter.run(packet(10, 60), repeat=5)
    assert emitter.counter(1) - refused0 == 5, "no ring behind the map: every submission refused"


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        PerfRings(-1, page_cnt=3)
    with pytest.raises(PerfRingError, match="corrupt"):
        split(struct.pack("<IHH", 9, 0, 0))
    offsets, lost = split(struct.pack("<IHHQQ", 2, 0, 24, 7, 5) + struct.pack("<IHHI", 9, 0, 16, 4) + b"abcd")
    assert (offsets, lost) == ([24 + 12], 5)
    assert online_cpus("0-3,5\n") == [0, 1, 2, 3, 5] and online_cpus("0") == [0]
    assert PAGE == os.sysconf("SC_PAGE_SIZE")
