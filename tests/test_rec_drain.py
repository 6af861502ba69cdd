"""The drain's batch path: real program (BPF_PROG_TEST_RUN) -> per-CPU perf rings -> Drain ->
pcapng files, parsed block by block; and the writers' drain entry (write_sample) against their
checked one (write_packet), byte for byte."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from pathlib import Path

import pytest
from scapy.all import IP, TCP, Ether, Raw, raw

from l4lb.lab.pktenv import PacketEnv, edge_backends_v4
from l4lb.models import Service
from l4lb.recfilter import parse_filter
from l4lb.recorder.manager import RecorderManager
from l4lb.recorder.pcapfile import PcapngWriter, PcapWriter
from l4lb.recorder.perfring import online_cpus
from l4lb.recorder.recording import RecordingSpec

VIP = "198.51.100.1"
CLIENT = "203.0.113.7"
XDP_TX = 3


@pytest.fixture(scope="module")
def env(bpffs: Path):
    d = bpffs / "prf-drain"
    d.mkdir(exist_ok=True)
    with PacketEnv(d, n_backends=4, prefix="prf", maglev_m=251, max_backends=1024, flow_table_size=65536) as e:
        e.apply([Service(name="web", vip=VIP, port=80, backends=[{"address": b} for b in edge_backends_v4(4)])])
        yield e


def frame(i: int) -> bytes:
    return raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22") / IP(src=CLIENT, dst=VIP)
               / TCP(sport=31000 + i, dport=80, flags="A") / Raw(bytes([i]) * (40 + i)))


def epbs(path: Path) -> list[tuple[int, int, bytes, dict[int, list[bytes]]]]:
    """(ts_ns, orig_len, data, options) of every enhanced packet block."""
    data = path.read_bytes()
    out, off = [], 0
    while off < len(data):
        btype, blen = struct.unpack_from("<II", data, off)
        assert struct.unpack_from("<I", data, off + blen - 4)[0] == blen, "trailing length"
        if btype == 6:
            _, hi, lo, cap, orig = struct.unpack_from("<IIIII", data, off + 8)
            pkt = data[off + 28:off + 28 + cap]
            opts: dict[int, list[bytes]] = {}
            o = off + 28 + cap + (-cap & 3)
            while o < off + blen - 4:
                code, n = struct.unpack_from("<HH", data, o)
                if code == 0:
                    break
                opts.setdefault(code, []).append(data[o + 4:o + 4 + n])
                o += 4 + n + (-n & 3)
            out.append(((hi << 32) | lo, orig, pkt, opts))
        off += blen
    assert off == len(data)
    return out


def wait_for(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_batches_route_cut_and_order_samples_of_all_cpus(env, tmp_path: Path) -> None:
    cpus = online_cpus()
    assert len(cpus) >= 2, "needs two CPUs to exercise the merge"
    mgr = RecorderManager(tmp_path / "rec", env.dp, run=env.call)
    sent: list[tuple[bytes, bytes]] = []
    try:
        a = mgr.start(RecordingSpec(filters=(parse_filter(f"{CLIENT} 0 {VIP} 80 tcp"),), capture_length=64))
        b = mgr.start(RecordingSpec(filters=(parse_filter(f"any 0 {VIP} 80 tcp"),), capture_length=0))
        # The drain is held off while the packets alternate CPUs: it then finds both rings full
        # of interleaved samples and must merge them.
        with mgr.drain._ring_lock:
            try:
                for i in range(40):
                    env.call(os.sched_setaffinity, 0, {cpus[i % 2]})
                    verdict, out, _ = env.run(frame(i))
                    assert verdict == XDP_TX
                    sent.append((frame(i), out))
            finally:
                env.call(os.sched_setaffinity, 0, set(cpus))
        wait_for(lambda: a.packets == 80 and b.packets == 80)
        mgr.stop(a.id)
        mgr.stop(b.id)
        files = {rec.id: mgr.file_path(rec.id, 0)[0] for rec in (a, b)}
        rings = mgr.drain._rings
    finally:
        mgr.close()
    assert rings == [] and mgr.drain.ring_lost == 0, "close emptied and released the rings"
    expected = [p for pair in sent for p in pair]
    for rec, cap in ((a, 64), (b, 0)):
        got = epbs(files[rec.id])
        assert [g[2] for g in got] == [p[:cap] if cap else p for p in expected], "every packet, cut, in order"
        assert [g[1] for g in got] == [len(p) for p in expected], "truthful original lengths"
        stamps = [g[0] for g in got]
        assert stamps == sorted(stamps) and abs(stamps[0] / 1e9 - time.time()) < 300, "wall clock, ascending"
        assert [struct.unpack("<I", g[3][2][0])[0] for g in got] == [1, 2] * 40, "epb_flags: in, out"
        assert all(7 not in g[3] for g in got[::2]), "inbound: no verdict yet"
        assert all(g[3][7] == [bytes([2]) + struct.pack("<q", XDP_TX)] for g in got[1::2]), "outbound: XDP_TX"
        comments = [g[3][1][0].decode() for g in got]
        assert comments[0] == f"recording={rec.id} in service={VIP}:80/tcp"
        assert comments[1].startswith(f"recording={rec.id} out service={VIP}:80/tcp backend=")
        tshark = subprocess.run(["tshark", "-r", str(files[rec.id]), "-T", "fields", "-e", "tcp.srcport"],
                                capture_output=True, text=True, timeout=60)
        assert tshark.returncode == 0, tshark.stderr
        assert tshark.stdout.split() == [str(31000 + i) for i in range(40) for _ in (0, 1)]


SAMPLES = [
    # data, orig_len, direction, verdict, comment
    (b"", 0, 1, None, "recording=a in service=web"),
    (b"a" * 61, 61, 2, 3, "recording=a out service=web backend=192.0.2.10"),
    (b"b" * 62, 1500, 2, 4, None),
    (b"c" * 63, 64, None, None, "r\u00e9c"),
    (b"d" * 64, 64, 1, 0, ""),
    (b"e" * 61, 70, 2, 3, "recording=a out service=web backend=192.0.2.10"),
]
T0 = 1_700_000_000_123_456_789


@pytest.mark.parametrize("writer", [PcapngWriter, PcapWriter])
def test_drain_entry_writes_the_bytes_of_the_checked_entry(tmp_path: Path, writer) -> None:
    kw = {"start_ns": T0} if writer is PcapngWriter else {}
    checked, fast = writer(tmp_path / "checked", **kw), writer(tmp_path / "fast", **kw)
    for rnd in range(3):
        for i, (data, orig, direction, verdict, comment) in enumerate(SAMPLES):
            ts = T0 + rnd * 1_000_000_007 + i
            checked.write_packet(data, ts, orig_len=orig, direction=direction, verdict=verdict, comment=comment)
            fast.write_sample(data, ts, orig, direction, verdict, comment)
            if i == 2:                  # a drop count lands on the next record only
                checked.note_lost(rnd + 1)
                fast.note_lost(rnd + 1)
    assert fast.bytes_written == checked.bytes_written and fast.packets_written == checked.packets_written == 18
    checked.close(ts_ns=T0 + 5_000_000_000)
    fast.close(ts_ns=T0 + 5_000_000_000)
    assert (tmp_path / "fast").read_bytes() == (tmp_path / "checked").read_bytes()
    assert os.path.getsize(tmp_path / "fast") == fast.bytes_written
    with pytest.raises(ValueError, match="closed"):
        fast.write_sample(b"x", T0, 1, 1, None, "recording=a in service=web")
