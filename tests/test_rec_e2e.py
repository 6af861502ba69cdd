"""Recorder end to end: the real XDP program -> perf ring -> drain -> capture files, read back
by tshark (Debian's, 4.x).

* In the netns lab: a curl through the VIP is recorded; the file shows the client's packet on
  the way in and the IPIP packet on the way out, inner headers equal, ns timestamps,
  direction flags, XDP verdicts, comments, truthful caplen/origlen of a partial capture.
* On BPF_PROG_TEST_RUN packets (PacketEnv): stop conditions and rotation produce exactly the
  promised files; classic pcap; losses per recording; shutdown closes files cleanly and a new
  manager lists them again.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest
from scapy.all import IP, TCP, Ether, Raw, raw

from l4lb.lab.lbdatapath import lab_datapath
from l4lb.lab.pktenv import PacketEnv, edge_backends_v4
from l4lb.lab.topology import Lab
from l4lb.models import Service
from l4lb.recfilter import parse_filter
from l4lb.recorder.limits import RotationPolicy, StopConditions
from l4lb.recorder.manager import RecorderManager
from l4lb.recorder.recording import RecordingSpec

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

VIP = "198.51.100.1"
CLIENT = "203.0.113.7"


def tshark(path: Path, *fields: str, filt: str | None = None) -> list[list[str]]:
    cmd = ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=|", "-E", "occurrence=a"]
    if filt:
        cmd += ["-Y", filt]
    for f in fields:
        cmd += ["-e", f]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return [line.split("|") for line in cp.stdout.splitlines() if line]


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- the netns lab: curl through the VIP ---------------------------------------------------------

@pytest.fixture(scope="module")
def lab(bpffs: Path, lab_decap):
    with Lab(clients=1, backends=2, decap=lab_decap, prefix="rec") as lab:
        with lab_datapath(lab, bpffs, "rec-e2e", maglev_m=251, max_backends=1024, flow_table_size=65536):
            yield lab


def test_curl_through_the_vip_is_recorded_in_and_out(lab, tmp_path: Path):
    bes = [{"address": h.ip4} for h in lab.backends.values()]
    lab.worker.call(lab.dp.apply, [Service(name="web", vip=lab.vip4, port=80, backends=bes)])
    client = next(iter(lab.clients.values()))
    mgr = RecorderManager(tmp_path / "rec", lab.dp, run=lab.worker.call)
    try:
        rec = mgr.start(RecordingSpec(filters=(parse_filter(f"{client.ip4} 0 {lab.vip4} 80 tcp"),),
                                      capture_length=80, name="curl"))
        res = lab.curl(client, lab.url(lab.vip4))
        assert res.ok, res
        # The client's packets: SYN, ACK, request, ..., FIN: each in and out.
        wait_for(lambda: rec.packets >= 6, what="samples of the curl")
        quiesce(rec)
        mgr.stop(rec.id)
        path, fmt = mgr.file_path(rec.id, 0)
        assert fmt == "pcapng"
    finally:
        mgr.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    rows = tshark(path, "frame.packet_flags_direction", "frame.verdict.ebpf_xdp", "ip.src", "ip.dst",
                  "ip.proto", "tcp.srcport", "tcp.dstport", "tcp.seq_raw", "frame.len", "frame.cap_len",
                  "frame.time_epoch", "frame.comment")
    assert len(rows) == rec.packets and len(rows) % 2 == 0
    ins = [r for r in rows if r[0] == "0x00000001"]
    outs = [r for r in rows if r[0] == "0x00000002"]
    assert len(ins) == len(outs) == len(rows) // 2, rows
    backends = {h.ip4 for h in lab.backends.values()}
    for i, o in zip(ins, outs):
        # inbound: the client's packet as it arrived
        assert i[2:5] == [client.ip4, lab.vip4, "6"] and i[6] == "80" and i[1] == ""
        # outbound: IPIP (outer LB -> backend, proto 4) around the same inner packet
        o_src, o_dst = o[2].split(","), o[3].split(",")
        assert o_src[1] == client.ip4 and o_dst[1] == lab.vip4 and o_dst[0] in backends
        assert o[4].split(",")[0] == "4" and o[1] == "3", "IPIP, XDP_TX"
        assert (o[5], o[6], o[7]) == (i[5], i[6], i[7]), "same inner TCP header"
        assert int(o[8]) == int(i[8]) + 20
        assert int(i[9]) == min(80, int(i[8])) and int(o[9]) == min(80, int(o[8])), "caplen <= origlen, cut at 80"
        assert f"recording={rec.id}" in i[11] and "service=" in i[11]
        assert "backend=" in o[11] and "out" in o[11]
        t_in, t_out = i[10], o[10]
        assert len(t_in.split(".")[1]) == 9 and t_in <= t_out, "ns timestamps, out after in"
    assert any(int(r[8]) > 80 for r in rows), "a partial capture was exercised"
    assert abs(float(ins[0][10]) - time.time()) < 300, "wall-clock timestamps"


# --- limits, rotation, formats, losses, shutdown on test-run packets --------------------------

@pytest.fixture(scope="module")
def env(bpffs: Path):
    d = bpffs / "rec-e2e-pkt"
    d.mkdir(exist_ok=True)
    with PacketEnv(d, n_backends=4, prefix="rec", maglev_m=251, max_backends=1024, flow_table_size=65536) as e:
        e.apply([Service(name="w", vip=VIP, port=80, backends=[{"address": b} for b in edge_backends_v4(4)])])
        yield e


@pytest.fixture
def mgr(env, tmp_path: Path):
    m = RecorderManager(tmp_path / "rec", env.dp, run=env.call)
    yield m
    m.close()


def pkt(i: int, size: int = 100, src: str = CLIENT) -> bytes:
    return raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22") / IP(src=src, dst=VIP)
               / TCP(sport=30000 + i, dport=80, flags="A") / Raw(b"p" * (size - 54)))


def spec(**kw) -> RecordingSpec:
    kw.setdefault("filters", (parse_filter(f"{CLIENT} 0 {VIP} 80 tcp"),))
    return RecordingSpec(**kw)


def send(env, n: int, start: int = 0, size: int = 100) -> None:
    for i in range(n):
        env.run(pkt(start + i, size))


def quiesce(rec, quiet: float = 0.5) -> None:
    """Wait until no new sample arrived for `quiet` seconds."""
    last, since = -1, time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.05)
        if rec.packets != last:
            last, since = rec.packets, time.monotonic()


def test_stop_after_packets_exactly_that_many(env, mgr):
    rec = mgr.start(spec(stop=StopConditions(max_packets=7)))
    send(env, 10)                                   # 20 samples (in + out)
    wait_for(lambda: rec.state == "stopped", what="packet limit")
    wait_for(lambda: rec.slot not in mgr._active, what="the manager retiring it")
    d = rec.to_dict()
    assert (d["packets"], d["stop_reason"], len(d["files"])) == (7, "max_packets", 1)
    path, _ = mgr.file_path(rec.id, 0)
    assert len(tshark(path, "frame.number")) == 7
    assert mgr.datapath.maps is not None and mgr.datapath.maps.entry_count() == 0, "filters left the datapath"


def test_stop_after_bytes_never_exceeds(env, mgr):
    rec = mgr.start(spec(capture_length=64, stop=StopConditions(max_bytes=64 * 5 + 10)))
    send(env, 5)
    wait_for(lambda: rec.state == "stopped", what="byte limit")
    assert (rec.packets, rec.bytes, rec.stop_reason) == (5, 320, "max_bytes")
    rows = tshark(mgr.file_path(rec.id, 0)[0], "frame.cap_len", "frame.len")
    assert rows == [["64", "100"], ["64", "120"]] * 2 + [["64", "100"]]


def test_stop_after_duration(env, mgr):
    rec = mgr.start(spec(stop=StopConditions(max_duration_ns=300_000_000)))
    send(env, 2)
    wait_for(lambda: rec.state == "stopped", what="duration limit")
    assert rec.stop_reason == "max_duration" and rec.packets == 4
    send(env, 2)
    time.sleep(0.3)
    assert rec.packets == 4
    assert len(tshark(mgr.file_path(rec.id, 0)[0], "frame.number")) == 4


def test_rotation_by_size_is_a_ring_of_count_files(env, mgr):
    # each record: 100/120-byte packets -> EPB of ~ 200 bytes; rotate past 1000 bytes
    rec = mgr.start(spec(rotation=RotationPolicy(file_size=1000, max_files=3)))
    send(env, 30)
    wait_for(lambda: rec.packets == 60, what="60 samples")
    mgr.stop(rec.id)
    files = rec.to_dict()["files"]
    assert [f["index"] for f in files] == [0, 1, 2]
    counts = [len(tshark(mgr.file_path(rec.id, f["index"])[0], "frame.number")) for f in files]
    assert all(c > 0 for c in counts) and sum(counts) < 60, "older files were overwritten"
    for f in files:
        assert f["size"] == os.stat(mgr.file_path(rec.id, f["index"])[0]).st_size
    # the ring keeps the newest packets: the last file written holds the last packet
    sports = [tshark(mgr.file_path(rec.id, f["index"])[0], "tcp.srcport") for f in files]
    assert any(r and r[-1] == ["30029"] for r in sports)


def test_rotation_by_time_stops_after_count_files(env, mgr):
    rec = mgr.start(spec(rotation=RotationPolicy(rotate_ns=200_000_000, max_files=2)))
    send(env, 2)
    time.sleep(0.25)
    send(env, 2, start=2)
    time.sleep(0.25)
    send(env, 2, start=4)                   # would open a third file: the recording stops
    wait_for(lambda: rec.state == "stopped", what="max_files")
    assert rec.stop_reason == "max_files"
    files = rec.to_dict()["files"]
    assert [f["index"] for f in files] == [0, 1]
    assert [len(tshark(mgr.file_path(rec.id, i)[0], "frame.number")) for i in (0, 1)] == [4, 4]


def test_classic_pcap_has_ns_magic_and_truthful_lengths(env, mgr):
    rec = mgr.start(spec(fmt="pcap", capture_length=70))
    send(env, 3, size=300)
    wait_for(lambda: rec.packets == 6, what="samples")
    mgr.stop(rec.id)
    path, fmt = mgr.file_path(rec.id, 0)
    assert fmt == "pcap" and path.name.endswith(".pcap")
    assert struct.unpack("<I", path.read_bytes()[:4])[0] == 0xA1B23C4D
    rows = tshark(path, "frame.cap_len", "frame.len", "ip.src")
    assert [r[:2] for r in rows] == [["70", "300"], ["70", "320"]] * 3


def test_two_recordings_at_once_and_lost_samples_are_counted(env, tmp_path: Path):
    m = RecorderManager(tmp_path / "rec", env.dp, run=env.call, page_cnt=1)
    try:
        a = m.start(spec(name="a"))
        b = m.start(spec(filters=(parse_filter(f"{CLIENT} 0 any 0 any"),), capture_length=0, name="b"))
        with m.drain._ring_lock:             # the drain is held off: the 1-page rings overflow
            send(env, 300)
        wait_for(lambda: a.packets + a.lost == 600 and b.packets + b.lost == 600, what="accounting")
        assert a.lost > 0 and a.lost == b.lost, (a.lost, b.lost)
        send(env, 1)                           # carries epb_dropcount
        wait_for(lambda: a.packets + a.lost == 602, what="one more")
        m.stop(a.id)
        rows = tshark(m.file_path(a.id, 0)[0], "frame.drop_count")
        assert sum(int(r[0] or 0) for r in rows) == a.lost
        assert a.to_dict()["lost"] == a.lost
    finally:
        m.close()


def test_shutdown_closes_files_cleanly_and_a_new_manager_lists_them(env, tmp_path: Path):
    m = RecorderManager(tmp_path / "rec", env.dp, run=env.call)
    rec = m.start(spec(name="survivor"))
    send(env, 4)
    wait_for(lambda: rec.packets == 8, what="samples")
    m.close()
    assert rec.state == "stopped" and rec.stop_reason == "daemon_shutdown"
    assert m.datapath.maps is not None and m.datapath.maps.entry_count() == 0, "disarmed"
    path = tmp_path / "rec" / rec.files[0].name
    out = subprocess.run(["capinfos", "-c", "-M", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "8" in out.stdout, out.stdout + out.stderr
    blocks = _pcapng_block_types(path)
    assert blocks[-1] == 5, "ends with an interface statistics block: closed cleanly"
    meta = json.loads((tmp_path / "rec" / f"{rec.id}.json").read_text())
    assert meta["state"] == "stopped" and meta["packets"] == 8
    m2 = RecorderManager(tmp_path / "rec", env.dp, run=env.call)
    try:
        again = m2.get(rec.id).to_dict()
        assert (again["state"], again["stop_reason"], again["packets"], again["name"]) == (
            "stopped", "daemon_shutdown", 8, "survivor")
        assert m2.file_path(rec.id, 0)[0] == path
        m2.delete(rec.id)
        assert not path.exists() and not (tmp_path / "rec" / f"{rec.id}.json").exists()
    finally:
        m2.close()


def _pcapng_block_types(path: Path) -> list[int]:
    data = path.read_bytes()
    out, off = [], 0
    while off + 8 <= len(data):
        btype, blen = struct.unpack_from("<II", data, off)
        out.append(btype)
        off += blen
    assert off == len(data), "no truncated block"
    return out


def test_a_redirect_shows_each_copy_on_its_own_nic_and_direction_keeps_one_side(env, mgr):
    """In on edge0, out (XDP_REDIRECT) on out1: one IDB per NIC, each packet on its own;
    --direction in/out recordings of the same tuple keep only their side."""
    from scapy.utils import PcapNgReader

    from l4lb.lab.pktenv import EDGE_IF, OUT_IF

    vip2 = "198.51.100.2"
    base = [Service(name="w", vip=VIP, port=80, backends=[{"address": b} for b in edge_backends_v4(4)])]
    env.apply([*base, Service(name="r", vip=vip2, port=80, backends=[{"address": "203.0.113.10"}])])
    try:
        flt = (parse_filter(f"{CLIENT} 0 {vip2} 80 tcp"),)
        both, inn, out = (mgr.start(spec(filters=flt, direction=d)) for d in ("both", "in", "out"))
        plain = mgr.start(spec(filters=flt, verdict=False))
        for i in range(2):
            verdict, _, _ = env.run(raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22") / IP(src=CLIENT, dst=vip2)
                                        / TCP(sport=31000 + i, dport=80, flags="S")))
            assert verdict == 4, "XDP_REDIRECT"
        wait_for(lambda: (both.packets, inn.packets, out.packets, plain.packets) == (4, 2, 2, 4), what="samples")
        for r in (both, inn, out, plain):
            mgr.stop(r.id)
        rows = {r.spec.direction: tshark(mgr.file_path(r.id, 0)[0], "frame.interface_name",
                                         "frame.packet_flags_direction", "frame.verdict.ebpf_xdp")
                for r in (both, inn, out)}
        assert rows["both"] == [[EDGE_IF, "0x00000001", ""], [OUT_IF, "0x00000002", "4"]] * 2
        assert rows["in"] == [[EDGE_IF, "0x00000001", ""]] * 2
        assert rows["out"] == [[OUT_IF, "0x00000002", "4"]] * 2
        path = mgr.file_path(both.id, 0)[0]
        desc = tshark(path, "frame.interface_description")
        assert desc[0][0] == f"{EDGE_IF} (ifindex {env.edge_ifindex}), as the l4lb XDP program saw it"
        with PcapNgReader(str(path)) as reader:
            assert [p.sniffed_on for p in reader] == [EDGE_IF, OUT_IF] * 2
        assert _pcapng_block_types(path) == [0x0A0D0D0A, 1, 6, 1, 6, 6, 6, 5, 5]
        info = subprocess.run(["capinfos", str(mgr.file_path(inn.id, 0)[0])], capture_output=True, text=True).stdout
        assert "direction: in" in info, "the section comment says which side was kept"
        # --no-verdict: no epb_verdict, the verdict in the comment; Debian 12's editcap copies it intact
        src = mgr.file_path(plain.id, 0)[0]
        copy = src.parent / "copy.pcapng"
        subprocess.run(["editcap", str(src), str(copy)], check=True, capture_output=True)
        for f in (src, copy):
            rows = tshark(f, "frame.interface_name", "frame.verdict.ebpf_xdp", "frame.comment")
            assert [r[:2] for r in rows] == [[EDGE_IF, ""], [OUT_IF, ""]] * 2
            assert all(r[2].endswith("verdict=XDP_REDIRECT") for r in rows[1::2])
            assert not any("verdict=" in r[2] for r in rows[0::2]), "inbound: no verdict yet"
        copy.unlink()
    finally:
        env.apply(base)
