"""Recorder capture files: pcapng and ns pcap, read back with tshark, capinfos, dpkt and scapy."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
from decimal import Decimal

import dpkt
import pytest
from conftest import UNICODE
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from l4lb import __version__
from l4lb.recorder.pcapfile import (
    EPB_VERDICT,
    Direction,
    PcapngWriter,
    PcapWriter,
    XdpVerdict,
    open_writer,
    safe_join,
    safe_name,
)

needs_tshark = pytest.mark.skipif(
    shutil.which("tshark") is None or shutil.which("capinfos") is None, reason="needs tshark and capinfos"
)

T0 = 1_700_000_000_123_456_789  # ns since the epoch, odd digits down to the ns
LB_MAC, ROUTER_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


def client_syn() -> bytes:
    return bytes(
        Ether(src=ROUTER_MAC, dst=LB_MAC)
        / IP(src="198.51.100.7", dst="203.0.113.1")
        / TCP(sport=40000, dport=80, flags="S")
        / (b"q" * 200)
    )


def ipip() -> bytes:
    inner = IP(src="198.51.100.7", dst="203.0.113.1") / TCP(sport=40000, dport=80, flags="S") / (b"q" * 200)
    return bytes(Ether(src=LB_MAC, dst=ROUTER_MAC) / IP(src="192.0.2.1", dst="192.0.2.10", proto=4) / inner)


def too_big() -> bytes:
    quoted = IP(src="198.51.100.7", dst="203.0.113.1") / TCP(sport=40000, dport=80) / (b"q" * 100)
    return bytes(
        Ether(src=LB_MAC, dst=ROUTER_MAC)
        / IP(src="203.0.113.1", dst="198.51.100.7")
        / ICMP(type=3, code=4, nexthopmtu=1480)
        / quoted
    )


def v6_too_big() -> bytes:
    quoted = IPv6(src="2001:db8::7", dst="2001:db8:1::1") / UDP(sport=5000, dport=53) / (b"x" * 64)
    return bytes(Ether(src=LB_MAC, dst=ROUTER_MAC) / IPv6(src="2001:db8:1::1", dst="2001:db8::7") / ICMPv6PacketTooBig(mtu=1280) / quoted)


# (data as captured, ts, orig_len, direction, verdict, comment, lost before it)
def sample_records():
    syn, enc, icmp, icmp6 = client_syn(), ipip(), too_big(), v6_too_big()
    return [
        (syn, T0, None, Direction.INBOUND, None, "rec-1 svc=web", 0),
        (enc[:96], T0 + 1, len(enc), Direction.OUTBOUND, XdpVerdict.TX, "rec-1 svc=web backend=192.0.2.10", 0),
        (icmp, T0 + 1_000_000_007, None, Direction.OUTBOUND, XdpVerdict.TX, "icmp-too-big", 5),
        (icmp6[:80], T0 + 2_000_000_000, len(icmp6), Direction.INBOUND, XdpVerdict.PASS, None, 0),
    ]


def write_sample_pcapng(path, *, snaplen=65535):
    with PcapngWriter(path, snaplen=snaplen, if_name="eth0", section_comment="recording rec-1",
                      start_ns=T0 - 500) as w:
        for data, ts, orig, d, v, c, lost in sample_records():
            if lost:
                w.note_lost(lost)
            w.write_packet(data, ts, orig_len=orig, direction=d, verdict=v, comment=c)
        w.note_lost(2)  # lost after the last packet: only the ISB can tell
        w.close(ts_ns=T0 + 3_000_000_000)
    return w


def tshark_fields(path, *fields):
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,",
         *sum((["-e", f] for f in fields), [])],
        capture_output=True, text=True, check=True,
    )
    assert "cut short" not in out.stderr and "isn't" not in out.stderr, out.stderr
    return [line.split("\t") for line in out.stdout.splitlines()]


def capinfos(path) -> str:
    return subprocess.run(["capinfos", "-M", str(path)], capture_output=True, text=True, check=True).stdout


def pcapng_blocks(path):
    """Independent little-endian pcapng block walker: [(type, body)]."""
    raw = open(path, "rb").read()
    blocks, off = [], 0
    while off < len(raw):
        btype, blen = struct.unpack_from("<II", raw, off)
        assert blen % 4 == 0 and blen >= 12
        assert struct.unpack_from("<I", raw, off + blen - 4)[0] == blen
        blocks.append((btype, raw[off + 8: off + blen - 4]))
        off += blen
    assert off == len(raw)
    return blocks


def parse_options(buf):
    opts, off = {}, 0
    while off + 4 <= len(buf):
        code, length = struct.unpack_from("<HH", buf, off)
        if code == 0:
            break
        opts.setdefault(code, []).append(buf[off + 4: off + 4 + length])
        off += 4 + length + (-length % 4)
    return opts


# --------------------------------------------------------------------------- pcapng

@needs_tshark
def test_pcapng_tshark_fields(tmp_path):
    path = tmp_path / "r.pcapng"
    write_sample_pcapng(path)
    rows = tshark_fields(
        path, "frame.time_epoch", "frame.len", "frame.cap_len", "frame.comment", "frame.packet_flags_direction",
        "frame.verdict.ebpf_xdp", "frame.drop_count", "frame.interface_name", "ip.src", "ipv6.src", "tcp.dstport",
        "icmp.type", "icmp.code", "icmpv6.type",
    )
    recs = sample_records()
    assert len(rows) == len(recs)
    epochs = [r[0] for r in rows]
    assert epochs == ["1700000000.123456789", "1700000000.123456790", "1700000001.123456796", "1700000002.123456789"]
    assert [(int(r[1]), int(r[2])) for r in rows] == [
        (len(recs[0][0]), len(recs[0][0])),
        (recs[1][2], 96),
        (len(recs[2][0]), len(recs[2][0])),
        (recs[3][2], 80),
    ]
    assert int(rows[1][1]) > int(rows[1][2]) and int(rows[3][1]) > int(rows[3][2])
    assert [r[3] for r in rows] == ["rec-1 svc=web", "rec-1 svc=web backend=192.0.2.10", "icmp-too-big", ""]
    assert [int(r[4], 16) for r in rows] == [1, 2, 2, 1]
    assert [r[5] for r in rows] == ["", "3", "3", "2"]
    assert [r[6] for r in rows] == ["", "", "5", ""]
    assert {r[7] for r in rows} == {"eth0"}
    assert rows[0][8] == "198.51.100.7"
    assert rows[1][8] == "192.0.2.1,198.51.100.7"  # IPIP: outer, then inner source
    assert rows[0][10] == "80" and rows[1][10] == "80"
    assert rows[2][11].split(",")[0] == "3" and rows[2][12].split(",")[0] == "4"
    assert rows[3][9].split(",")[0] == "2001:db8:1::1" and rows[3][13] == "2"


@needs_tshark
def test_pcapng_capinfos(tmp_path):
    path = tmp_path / "r.pcapng"
    write_sample_pcapng(path, snaplen=1500)
    info = capinfos(path)
    assert "File type:           pcapng\n" in info
    assert "File encapsulation:  ether\n" in info
    assert "File timestamp precision:  nanoseconds (9)" in info
    assert "Number of packets:   4" in info
    assert "Capture comment:     recording rec-1" in info
    assert f"Capture application: l4lb {__version__}" in info
    assert f"Capture oper-sys:    Linux {os.uname().release}" in info
    assert "Capture length = 1500" in info
    assert "Number of stat entries = 1" in info
    assert f"File size:           {os.path.getsize(path)} bytes" in info


def test_pcapng_raw_blocks_and_isb(tmp_path):
    path = tmp_path / "r.pcapng"
    w = write_sample_pcapng(path)
    blocks = pcapng_blocks(path)
    assert [b[0] for b in blocks] == [0x0A0D0D0A, 1, 6, 6, 6, 6, 5]
    shb = blocks[0][1]
    assert struct.unpack_from("<IHHq", shb) == (0x1A2B3C4D, 1, 0, -1)
    idb = blocks[1][1]
    assert struct.unpack_from("<HHI", idb) == (1, 0, 65535)
    assert parse_options(idb[8:])[9] == [b"\x09"]
    isb = blocks[-1][1]
    iface, hi, lo = struct.unpack_from("<III", isb)
    assert iface == 0 and (hi << 32 | lo) == T0 + 3_000_000_000
    opts = parse_options(isb[12:])
    u64 = lambda code: struct.unpack("<Q", opts[code][0])[0]  # noqa: E731
    hl = lambda code: (lambda h, l: h << 32 | l)(*struct.unpack("<II", opts[code][0]))  # noqa: E731,E741
    assert hl(2) == T0 - 500 and hl(3) == T0 + 3_000_000_000
    assert u64(5) == 7 == w.lost        # isb_ifdrop: 5 + 2 lost samples
    assert u64(8) == 4 == w.packets_written  # isb_usrdeliv
    assert u64(4) == 11                 # isb_ifrecv
    assert w.bytes_written == os.path.getsize(path)


def test_pcapng_dpkt(tmp_path):
    path = tmp_path / "r.pcapng"
    write_sample_pcapng(path)
    recs = sample_records()
    with open(path, "rb") as f:
        reader = dpkt.pcapng.Reader(f)
        assert reader.datalink() == dpkt.pcap.DLT_EN10MB and reader.snaplen == 65535
        got = list(reader)
    assert [bytes(buf) for _, buf in got] == [r[0] for r in recs]
    assert got[0][0] == pytest.approx(T0 / 1e9, abs=1e-6)
    eth = dpkt.ethernet.Ethernet(got[1][1])
    assert eth.ip.p == 4 and bytes(eth.ip.src) == bytes([192, 0, 2, 1])
    # exact ns and lengths from the EPBs themselves (dpkt's Reader converts to float seconds)
    epbs = [dpkt.pcapng.EnhancedPacketBlockLE(struct.pack("<II", 6, len(b) + 12) + b + struct.pack("<I", len(b) + 12))
            for t, b in pcapng_blocks(path) if t == 6]
    assert [(e.ts_high << 32 | e.ts_low) for e in epbs] == [r[1] for r in recs]
    assert [(e.caplen, e.pkt_len) for e in epbs] == [(len(r[0]), r[2] or len(r[0])) for r in recs]
    opts = [{o.code: o.data for o in e.opts} for e in epbs]
    assert opts[1][7] == b"\x02" + struct.pack("<q", 3)
    assert opts[1][2] == struct.pack("<I", 2)
    assert opts[2][4] == struct.pack("<Q", 5)
    assert 4 not in opts[0] and 4 not in opts[1] and 4 not in opts[3]
    assert 7 not in opts[0] and 1 not in opts[3]


def test_pcapng_scapy(tmp_path):
    path = tmp_path / "r.pcapng"
    write_sample_pcapng(path)
    recs = sample_records()
    pkts = rdpcap(str(path))
    assert [Decimal(p.time) * 10**9 for p in pkts] == [Decimal(r[1]) for r in recs]
    assert [p.wirelen for p in pkts] == [r[2] or len(r[0]) for r in recs]
    assert [bytes(p) for p in pkts] == [r[0] for r in recs]
    assert [p.direction for p in pkts] == [1, 2, 2, 1]
    assert pkts[2].comments == [b"icmp-too-big"]
    assert pkts[0][TCP].dport == 80 and pkts[1][IP][1].src == "198.51.100.7"
    assert pkts[2][ICMP].type == 3 and pkts[2][ICMP].code == 4


@needs_tshark
def test_pcapng_readable_while_open_with_autoflush(tmp_path):
    path = tmp_path / "live.pcapng"
    w = PcapngWriter(path, autoflush=True)
    w.write_packet(client_syn(), T0, direction=Direction.INBOUND)
    assert os.path.getsize(path) == w.bytes_written
    assert tshark_fields(path, "frame.time_epoch") == [["1700000000.123456789"]]
    w.close()


def test_flush_control(tmp_path):
    path = tmp_path / "b.pcapng"
    w = PcapngWriter(path)
    w.write_packet(client_syn(), T0)
    size_before = os.path.getsize(path)
    assert size_before < w.bytes_written  # still buffered
    w.flush(fsync=True)
    assert os.path.getsize(path) == w.bytes_written
    w.close()
    assert os.path.getsize(path) == w.bytes_written > size_before


def test_snaplen_truncates_truthfully(tmp_path):
    path = tmp_path / "s.pcapng"
    syn = client_syn()
    with PcapngWriter(path, snaplen=64) as w:
        n = w.write_packet(syn, T0)
    epb = [b for t, b in pcapng_blocks(path) if t == 6][0]
    assert struct.unpack_from("<II", epb, 12) == (64, len(syn))
    assert epb[20:84] == syn[:64]
    assert n == 12 + 20 + 64  # block framing + fixed EPB fields + data, no options


@pytest.mark.parametrize("writer", [PcapngWriter, PcapWriter])
def test_invalid_packets_write_nothing(tmp_path, writer):
    w = writer(tmp_path / "x")
    before = w.bytes_written
    with pytest.raises(ValueError, match="orig_len"):
        w.write_packet(b"abc", T0, orig_len=2)
    with pytest.raises(ValueError, match="ts_ns"):
        w.write_packet(b"abc", -1)
    with pytest.raises(ValueError, match="ts_ns"):
        w.write_packet(b"abc", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        w.write_packet(b"abc", T0, direction=3)
    with pytest.raises(ValueError, match="lost"):
        w.note_lost(-1)
    assert w.bytes_written == before and w.packets_written == 0
    w.close()


def test_pcapng_rejects_bad_options(tmp_path):
    with PcapngWriter(tmp_path / "x") as w:
        with pytest.raises(ValueError, match="comment"):
            w.write_packet(b"abc", T0, comment="x" * 70000)
        with pytest.raises(ValueError, match="verdict"):
            w.write_packet(b"abc", T0, verdict=True)
        assert w.packets_written == 0


# --------------------------------------------------------------------------- classic pcap

def write_sample_pcap(path, snaplen=65535):
    with PcapWriter(path, snaplen=snaplen) as w:
        for data, ts, orig, d, v, c, lost in sample_records():
            w.note_lost(lost)
            w.write_packet(data, ts, orig_len=orig, direction=d, verdict=v, comment=c)
    return w


def test_pcap_header_and_records(tmp_path):
    path = tmp_path / "r.pcap"
    w = write_sample_pcap(path)
    raw = open(path, "rb").read()
    assert raw[:4] == bytes.fromhex("4d3cb2a1")  # 0xA1B23C4D little-endian
    assert struct.unpack_from("<IHHiIII", raw) == (0xA1B23C4D, 2, 4, 0, 0, 65535, 1)
    sec, nsec, incl, orig = struct.unpack_from("<IIII", raw, 24)
    assert (sec, nsec) == divmod(T0, 10**9) and incl == orig == len(client_syn())
    assert w.bytes_written == len(raw) == 24 + sum(16 + len(r[0]) for r in sample_records())
    assert w.lost == 5


@needs_tshark
def test_pcap_tshark_capinfos(tmp_path):
    path = tmp_path / "r.pcap"
    write_sample_pcap(path)
    rows = tshark_fields(path, "frame.time_epoch", "frame.len", "frame.cap_len")
    recs = sample_records()
    assert [r[0] for r in rows] == [
        "1700000000.123456789", "1700000000.123456790", "1700000001.123456796", "1700000002.123456789",
    ]
    assert [(int(r[1]), int(r[2])) for r in rows] == [(r[2] or len(r[0]), len(r[0])) for r in recs]
    info = capinfos(path)
    assert "File type:           nsecpcap\n" in info and "File timestamp precision:  nanoseconds (9)" in info
    assert "Number of packets:   4" in info


def test_pcap_dpkt_and_scapy(tmp_path):
    path = tmp_path / "r.pcap"
    write_sample_pcap(path)
    recs = sample_records()
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        assert reader.datalink() == dpkt.pcap.DLT_EN10MB
        got = list(reader)
    assert [ts for ts, _ in got] == [Decimal(r[1]) / 10**9 for r in recs]  # dpkt keeps ns as Decimal
    assert [bytes(b) for _, b in got] == [r[0] for r in recs]
    pkts = rdpcap(str(path))
    assert [Decimal(p.time) * 10**9 for p in pkts] == [Decimal(r[1]) for r in recs]
    assert [p.wirelen for p in pkts] == [r[2] or len(r[0]) for r in recs]
    assert [len(p) for p in pkts] == [len(r[0]) for r in recs]
    assert pkts[1][IP].proto == 4 and pkts[1][IP][1][TCP].dport == 80


def test_pcap_timestamp_range(tmp_path):
    with PcapWriter(tmp_path / "y") as w:
        with pytest.raises(ValueError, match="2106"):
            w.write_packet(b"a", (2**32) * 10**9)
        w.write_packet(b"a", (2**32 - 1) * 10**9 + 999_999_999)


# --------------------------------------------------------------------------- common file handling

@pytest.mark.parametrize("fmt", ["pcapng", "pcap"])
def test_file_mode_0600_even_with_open_umask(tmp_path, fmt):
    old = os.umask(0)
    try:
        w = open_writer(tmp_path / f"m.{fmt}", fmt)
    finally:
        os.umask(old)
    w.close()
    assert stat.S_IMODE(os.stat(tmp_path / f"m.{fmt}").st_mode) == 0o600


@pytest.mark.parametrize("writer", [PcapngWriter, PcapWriter])
def test_never_clobbers_or_follows_symlinks(tmp_path, writer):
    existing = tmp_path / "exists"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        writer(existing)
    assert existing.read_bytes() == b"keep me"
    target = tmp_path / "target"
    target.write_bytes(b"victim")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(FileExistsError):
        writer(tmp_path / "link")
    assert target.read_bytes() == b"victim"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        writer(tmp_path / "dangling")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("writer", [PcapngWriter, PcapWriter])
def test_close_idempotent_and_context_manager(tmp_path, writer):
    w = writer(tmp_path / "c")
    w.write_packet(b"\x00" * 60, T0)
    with pytest.raises(ValueError, match="ts_ns"):
        w.close(ts_ns=-1)
    assert not w.closed
    w.close(ts_ns=T0)
    size = os.path.getsize(tmp_path / "c")
    assert w.closed and size == w.bytes_written
    w.close()
    w.close(ts_ns=T0 + 5)
    assert os.path.getsize(tmp_path / "c") == size == w.bytes_written
    with pytest.raises(ValueError, match="closed"):
        w.write_packet(b"x", T0)
    with pytest.raises(ValueError, match="closed"):
        w.flush()
    with pytest.raises(RuntimeError):
        with writer(tmp_path / "d") as w2:
            w2.write_packet(b"\x00" * 60, T0)
            raise RuntimeError("boom")
    assert w2.closed and os.path.getsize(tmp_path / "d") == w2.bytes_written


def test_open_writer_factory(tmp_path):
    a = open_writer(tmp_path / "a", "pcapng", if_name="eth1", snaplen=128)
    b = open_writer(tmp_path / "b", "pcap", if_name="ignored", snaplen=128)
    assert isinstance(a, PcapngWriter) and isinstance(b, PcapWriter) and b.snaplen == 128
    a.close()
    b.close()
    with pytest.raises(ValueError, match="fmt"):
        open_writer(tmp_path / "c", "erf")
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- names

_SAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def test_safe_name_examples():
    assert safe_name("rec-1", 0) == "rec-1_000000.pcapng"
    assert safe_name("rec-1", 12, "pcap") == "rec-1_000012.pcap"
    bad = safe_name("../../etc/passwd", 1)
    assert "/" not in bad and not bad.startswith(".") and bad.endswith("_000001.pcapng")
    assert safe_name("a/b", 0) != safe_name("a_b", 0) != safe_name("a\\b", 0)
    assert safe_name("", 0).startswith("rec-")
    assert safe_name("-rf", 0)[0] != "-"
    assert len(safe_name("x" * 1000, 0)) < 100
    with pytest.raises(ValueError, match="fmt"):
        safe_name("r", 0, "txt")
    with pytest.raises(ValueError, match="index"):
        safe_name("r", -1)


@settings(max_examples=300, deadline=None)
@given(st.text(UNICODE, max_size=80), st.text(UNICODE, max_size=80), st.integers(0, 10**7), st.sampled_from(["pcapng", "pcap"]))
def test_prop_safe_name(a, b, index, fmt):
    name = safe_name(a, index, fmt)
    assert set(name) <= _SAFE and name[0] not in ".-" and name not in (".", "..")
    assert name.endswith(f"_{index:06d}.{fmt}")
    assert len(name.encode()) <= 255
    if a != b:
        assert name != safe_name(b, index, fmt)


def test_safe_join(tmp_path):
    d = tmp_path / "recs"
    d.mkdir()
    assert safe_join(d, "rec-1_000000.pcapng") == d / "rec-1_000000.pcapng"
    for bad in ["..", ".", "", "../x", "a/b", "/etc/passwd", "x\x00y", "a b", "é"]:
        with pytest.raises(ValueError):
            safe_join(d, bad)
    (d / "evil").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="escapes"):
        safe_join(d, "evil")
    (tmp_path / "alias").symlink_to(d)  # the directory itself may be reached through a symlink
    assert safe_join(tmp_path / "alias", "ok.pcap") == d / "ok.pcap"
    for i in range(3):
        assert safe_join(d, safe_name("../up", i)).parent == d


# --- one IDB per NIC ---------------------------------------------------------------------------------------------------

NICS = {3: ("eth0", "uplink, XDP"), 7: ("eth1", "backend side, XDP")}


def write_two_nics(path, **kw):
    """A redirect recorded: in on eth0 (ifindex 3), out on eth1 (7), then an XDP_TX reply on eth0."""
    with PcapngWriter(path, snaplen=1500, interfaces=lambda i: NICS[i], start_ns=T0 - 1, **kw) as w:
        syn = client_syn()
        w.write_sample(syn, T0, len(syn), 1, None, "in", 3)
        w.write_sample(syn + b"\0" * 20, T0 + 10, len(syn) + 20, 2, XdpVerdict.REDIRECT, "out", 7)
        w.write_packet(syn, T0 + 20, direction=Direction.OUTBOUND, verdict=XdpVerdict.TX, comment="reply", ifindex=3)
        w.note_lost(4)
        w.close(ts_ns=T0 + 100)
    return w


def test_pcapng_one_idb_per_nic_written_before_its_first_packet(tmp_path):
    path = tmp_path / "nics.pcapng"
    w = write_two_nics(path)
    assert w.interfaces == {3: 0, 7: 1}
    blocks = pcapng_blocks(path)
    assert [t for t, _ in blocks] == [0x0A0D0D0A, 1, 6, 1, 6, 6, 5, 5]
    shb_opts = parse_options(blocks[0][1][16:])
    assert shb_opts[4] == [f"l4lb {__version__}".encode()] and shb_opts[3] == [f"Linux {os.uname().release}".encode()]
    for (_, idb), (name, desc) in zip([b for b in blocks if b[0] == 1], NICS.values()):
        opts = parse_options(idb[8:])
        assert (opts[2], opts[3], opts[9]) == ([name.encode()], [desc.encode()], [b"\x09"])
    assert [struct.unpack_from("<I", b)[0] for t, b in blocks if t == 6] == [0, 1, 0], "each EPB names its IDB"
    isbs = [b for t, b in blocks if t == 5]
    got = []
    for b in isbs:
        opts = parse_options(b[12:])
        got.append((struct.unpack_from("<I", b)[0], *(struct.unpack("<Q", opts[k][0])[0] for k in (8, 5, 4))))
    assert got == [(0, 2, 4, 6), (1, 1, 0, 1)], "(interface, usrdeliv, ifdrop, ifrecv): losses on the first"


@needs_tshark
def test_pcapng_nics_in_tshark_and_the_direction_filter(tmp_path):
    path = tmp_path / "nics.pcapng"
    write_two_nics(path)
    rows = tshark_fields(path, "frame.interface_id", "frame.interface_name", "frame.interface_description",
                         "frame.packet_flags_direction", "frame.comment")
    assert rows == [["0", "eth0", "uplink, XDP", "0x00000001", "in"],
                    ["1", "eth1", "backend side, XDP", "0x00000002", "out"],
                    ["0", "eth0", "uplink, XDP", "0x00000002", "reply"]]
    # the README's display filters: outbound copies only / inbound only
    out = subprocess.run(["tshark", "-r", str(path), "-Y", "frame.packet_flags_direction == 2", "-T", "fields",
                          "-e", "frame.comment"], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["out", "reply"]
    inbound = subprocess.run(["tshark", "-r", str(path), "-Y", "frame.packet_flags_direction == 1", "-T", "fields",
                              "-e", "frame.comment"], capture_output=True, text=True, check=True).stdout.split()
    assert inbound == ["in"]
    info = capinfos(path)
    assert "Number of interfaces in file: 2" in info


def test_pcapng_nics_in_scapy_and_dpkt(tmp_path):
    from scapy.utils import PcapNgReader

    path = tmp_path / "nics.pcapng"
    write_two_nics(path)
    with PcapNgReader(str(path)) as r:
        pkts = list(r)
    assert [p.sniffed_on for p in pkts] == ["eth0", "eth1", "eth0"]
    assert [p.direction for p in pkts] == [1, 2, 2]
    assert [p.time for p in pkts] == [Decimal(T0) / 10**9, Decimal(T0 + 10) / 10**9, Decimal(T0 + 20) / 10**9]
    n = len(client_syn())
    with open(path, "rb") as f:
        got = [(round(ts * 1e6), buf) for ts, buf in dpkt.pcapng.Reader(f)]   # dpkt: float seconds
    assert [(ts, len(buf)) for ts, buf in got] == [(round(T0 / 1e3), n), (round((T0 + 10) / 1e3), n + 20),
                                                   (round((T0 + 20) / 1e3), n)]
    assert all(dpkt.ethernet.Ethernet(buf).data.src == bytes([198, 51, 100, 7]) for _, buf in got)


def test_pcapng_without_verdicts_and_the_header_idb_of_plain_writers(tmp_path):
    path = tmp_path / "nov.pcapng"
    write_two_nics(path, verdicts=False)
    epbs = [b for t, b in pcapng_blocks(path) if t == 6]
    assert all(EPB_VERDICT not in parse_options(b[20 + (struct.unpack_from("<I", b, 12)[0] + 3) // 4 * 4:])
               for b in epbs)
    plain = tmp_path / "plain.pcapng"
    with PcapngWriter(plain, if_name="eth9") as w:
        w.write_sample(client_syn(), T0, 54, 1, None, None, 42)   # no resolver: every packet on the one IDB
    assert [t for t, _ in pcapng_blocks(plain)] == [0x0A0D0D0A, 1, 6, 5]
