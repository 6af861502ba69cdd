"""The drain's batch path: real program (BPF_PROG_TEST_RUN) -> per-CPU perf rings -> Drain ->
pcapng files, parsed block by block; and the writers' drain entry (write_sample) against their
checked one (write_packet), byte for byte."""

from __future__ import annotations

import os
import struct
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP, Ether, Raw, raw

from l4lb.lab.pktenv import PacketEnv, edge_backends_v4
from l4lb.models import Service
from l4lb.recfilter import parse_filter
from l4lb.recorder import pcapfile
from l4lb.recorder.budget import DiskBudget, DiskLimits
from l4lb.recorder.limits import RotationPolicy, StopConditions
from l4lb.recorder.manager import RecorderManager
from l4lb.recorder.pcapfile import PcapngWriter, PcapWriter, RecordKind, Sample
from l4lb.recorder.perfring import online_cpus
from l4lb.recorder.recording import Recording, RecordingSpec

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


# --------------------------------------------------------------------------- batch path = per-sample path

NICS = {5: ("eth5", "uplink"), 9: ("eth9", "downlink")}
KINDS = [RecordKind("recording=p in service=web", 1, None, 5),
         RecordKind("recording=p out service=web backend=192.0.2.10", 2, 3, 5),
         RecordKind("recording=p out service=web backend=192.0.2.11", 2, 4, 9),
         RecordKind(None, 1, None, 9)]


def _run_recording(tmp: Path, fmt: str, stop: StopConditions, rot: RotationPolicy, cap: int | None,
            batches: list[list[Sample]], lost_after: dict[int, int]) -> tuple[dict, dict[str, bytes]]:
    """One recording fed these batches (losses noted between them); its report and files."""
    budget = None
    if cap is not None:
        budget = DiskBudget(tmp, DiskLimits(max_total_bytes=1 << 40, max_recording_bytes=cap, min_free_bytes=0),
                            statvfs=lambda _p: SimpleNamespace(f_bavail=1 << 40, f_frsize=1))
    spec = RecordingSpec(filters=(parse_filter(f"any 0 {VIP} 80 tcp"),), fmt=fmt, stop=stop, rotation=rot)
    rec = Recording("p", spec, tmp, 0, budget=budget, interfaces=NICS.get)
    rec.open(0)
    after = []              # the recording after each batch: a limit must end it at the same sample
    for k, b in enumerate(batches):
        rec.write_many(b, T0)
        if k in lost_after:
            rec.note_lost(lost_after[k])
        after.append((rec.state, rec.stop_reason, rec.packets, rec.bytes, len(rec.files)))
    rec.stop()
    d = rec.to_dict()
    files = {f["name"]: Path(f["path"]).read_bytes() for f in d["files"]}
    return {"after": after, **{k: d[k] for k in ("state", "stop_reason", "packets", "bytes", "lost")}}, files


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.sampled_from([0, 1, 3, 60, 64, 99, 200]), st.integers(0, 3), st.integers(-50, 3_000)),
             min_size=1, max_size=90),
    st.lists(st.integers(1, 12), min_size=1, max_size=8),
    st.dictionaries(st.integers(0, 8), st.integers(1, 5), max_size=3),
    st.sampled_from(["pcapng", "pcap"]),
    st.one_of(st.none(), st.integers(1, 30)), st.one_of(st.none(), st.integers(1, 8_000)),
    st.one_of(st.none(), st.integers(1, 100_000)),
    st.one_of(st.none(), st.integers(1, 3_000)), st.one_of(st.none(), st.integers(1, 30_000)),
    st.one_of(st.none(), st.integers(1, 4)), st.one_of(st.none(), st.integers(500, 20_000)),
)
@example([(60, 0, 10)] * 4, [1], {}, "pcapng", 2, None, None, None, None, None, None)   # max_packets ends a batch
@example([(60, 0, 10)] * 9, [4], {}, "pcap", None, None, None, 176, None, None, None)  # 24 + 2 x 76 = 176: full
def test_batch_path_writes_exactly_what_the_per_sample_path_writes(
        tmp_path: Path, packets, cuts, lost_after, fmt, max_packets, max_bytes, max_dur, file_size, rotate_ns,
        max_files, cap) -> None:
    """Recording.write_many encodes runs of plain writes in one loop (Limiter.plain +
    write_batch); with that turned off every sample goes through Limiter.offer and
    write_sample. Both must leave the same files, byte for byte, and the same counts, across
    stop limits, rotation by size and time, rings of files, NICs new to a file, drop counts
    and the disk cap."""
    if max_files is not None and file_size is None and rotate_ns is None:
        max_files = None
    stop = StopConditions(max_packets, max_bytes, max_dur)
    rot = RotationPolicy(file_size=file_size, rotate_ns=rotate_ns, max_files=max_files)
    samples, mono = [], 0
    for i, (n, kind, dt) in enumerate(packets):
        mono += dt
        samples.append((bytes([i & 0xFF]) * n, mono, n + i % 3, KINDS[kind]))
    batches, at = [], 0
    for c in cuts * 20:
        if at >= len(samples):
            break
        batches.append(samples[at:at + c])
        at += c
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pcapfile.time, "time_ns", lambda: T0)     # SHB/ISB times: the same in both files
        for path in ("batch", "per-sample"):
            d = tmp_path / f"{path}-{uuid.uuid4().hex}"
            d.mkdir()
            if path == "per-sample":
                mp.setattr(Recording, "_plain_run", staticmethod(lambda lim, s, i: 0))
            out[path] = _run_recording(d, fmt, stop, rot, cap, batches, lost_after)
    assert out["batch"] == out["per-sample"]


def test_plain_batches_take_the_batch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without limits, write_sample only writes the file's first record (it opens the rotation
    window) and the first of a NIC new to the file (its IDB); the rest go through write_batch."""
    calls = []
    real = PcapngWriter.write_sample
    monkeypatch.setattr(PcapngWriter, "write_sample", lambda self, *a: calls.append(a[6]) or real(self, *a))
    spec = RecordingSpec(filters=(parse_filter(f"any 0 {VIP} 80 tcp"),))
    rec = Recording("plain", spec, tmp_path, 0, interfaces=NICS.get)
    rec.open(0)
    for k in range(3):
        rec.write_many([(b"z" * (60 + i % 7), k * 1000 + i, 70, KINDS[i % 4]) for i in range(200)], T0)
    assert rec.packets == 600
    assert calls == [5, 9], "ifindex of the records written one by one"
    rec.stop()
