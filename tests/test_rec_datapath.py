"""The recorder's BPF half on the real compiled program (BPF_PROG_TEST_RUN): which packets
reach which recording, what the perf samples carry, any mask armed by map writes (the program never changes), losses.

One PacketEnv for the module; every test sets the filters it needs (set_filters makes the
datapath match exactly those). Each filter of the semantics tests gets its own recording slot,
so a sample's recordings bitmap shows exactly which filters matched; the expectation comes
from l4lb.recfilter.matches, the plain semantics (a packet goes to every recording with a
matching filter)."""

from __future__ import annotations

import ipaddress
import itertools
import random
from pathlib import Path

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, Raw, raw

from l4lb.datapath.libbpf import prog_info
from l4lb.datapath.recorder import CAP_WHOLE, FilterEntry, RecorderDatapath
from l4lb.lab.pktenv import EDGE_IF, PacketEnv, edge_backends_v4, edge_backends_v6
from l4lb.models import Service
from l4lb.recfilter import Filter, PacketTuple, matches, parse_filter
from l4lb.recorder.drain import SAMPLE

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

XDP_PASS, XDP_TX = 2, 3
VIPS4 = ("198.51.100.1", "198.51.100.2")
VIPS6 = ("2001:db8:100::1", "2001:db8:100::2")
PORTS = (80, 443)
CLIENT4, OTHER4 = "203.0.113.7", "192.0.2.77"
CLIENT6, OTHER6 = "2001:db8:77::7", "2001:db8:99::9"


@pytest.fixture(scope="module")
def env(bpffs: Path):
    d = bpffs / "rec-datapath"
    d.mkdir(exist_ok=True)
    with PacketEnv(d, n_backends=8, prefix="rec", maglev_m=251, max_backends=4096, flow_table_size=65536) as e:
        services = []
        for fam, vips, bes in ((4, VIPS4, edge_backends_v4(4)), (6, VIPS6, edge_backends_v6(4))):
            for i, (vip, port, proto) in enumerate(itertools.product(vips, PORTS, ("tcp", "udp"))):
                services.append(Service(name=f"s{fam}-{i}", vip=vip, port=port, protocol=proto,
                                        backends=[{"address": b} for b in bes]))
        e.apply(services)
        yield e


class Rec:
    """RecorderDatapath + a perf reader collecting raw samples."""

    def __init__(self, env: PacketEnv) -> None:
        self.env = env
        self.samples: list[tuple[tuple, bytes]] = []
        self.rd = RecorderDatapath(env.dp, on_program=self._open)
        self.page_cnt = 64

    def _open(self, maps) -> None:
        maps.bpf[b"rec_events"].open_perf_buffer(self._cb, page_cnt=self.page_cnt)

    def _cb(self, cpu, data, size) -> None:
        import ctypes as ct

        b = ct.string_at(data, size)
        hdr = SAMPLE.unpack_from(b)
        self.samples.append((hdr, b[SAMPLE.size:SAMPLE.size + hdr[2]]))

    def set(self, entries: list[FilterEntry]) -> bool:
        return self.env.call(self.rd.set_filters, entries)

    def run(self, frame: bytes) -> tuple[int, bytes, list[tuple[tuple, bytes]]]:
        """Verdict, output, samples of one packet."""
        self.drain()
        self.samples.clear()
        verdict, out, _ = self.env.run(frame)
        self.drain()
        got, self.samples = self.samples, []
        return verdict, out, got

    def drain(self) -> None:
        assert self.rd.maps is not None
        self.rd.maps.bpf.perf_buffer_poll(0)


@pytest.fixture(scope="module")
def rec(env):
    return Rec(env)


def frame(src: str, dst: str, sport: int, dport: int, proto: str, payload: bytes = b"") -> bytes:
    l4 = TCP(sport=sport, dport=dport, flags="S") if proto == "tcp" else UDP(sport=sport, dport=dport)
    ip = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)
    return raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22") / ip / l4 / Raw(payload))


def tuple_of(src: str, dst: str, sport: int, dport: int, proto: str) -> PacketTuple:
    return PacketTuple.make(src, dst, sport, dport, 6 if proto == "tcp" else 17)


def combo_filters(fam: int) -> list[Filter]:
    """All 32 wildcard combinations of (src, sport, dst, dport, proto) around one flow."""
    src, dst = (("203.0.113.0/24", VIPS4[0]) if fam == 4 else ("2001:db8:77::/48", VIPS6[0]))
    out = []
    for wild in itertools.product((False, True), repeat=5):
        ws, wsp, wd, wdp, wp = wild
        out.append(Filter.from_fields(
            src="any" if ws else src, sport=0 if wsp else 40000, dst="any" if wd else dst,
            dport=0 if wdp else 80, proto="any" if wp else "tcp", family=fam))
    return out


def probes(fam: int) -> list[tuple[str, str, int, int, str]]:
    """Every combination of 'field equals the filter's value or not'."""
    srcs = (CLIENT4, OTHER4) if fam == 4 else (CLIENT6, OTHER6)
    vips = VIPS4 if fam == 4 else VIPS6
    return [(s, d, sp, dp, pr) for s, d, sp, dp, pr in
            itertools.product(srcs, vips, (40000, 40001), PORTS, ("tcp", "udp"))]


def test_every_wildcard_combination_v4_and_v6_with_64_masks_loaded(env, rec):
    filters = combo_filters(4) + combo_filters(6)
    entries = [FilterEntry(f, slot) for slot, f in enumerate(filters)]
    rec.set(entries)
    slots = rec.rd.slots
    assert sorted(s for m, s in slots.items() if m.family == 4) == list(range(32))
    assert sorted(s for m, s in slots.items() if m.family == 6) == list(range(32, 64))
    checked = 0
    for fam in (4, 6):
        for p in probes(fam):
            f_in = frame(*p)
            verdict, out, samples = rec.run(f_in)
            assert verdict == XDP_TX
            want = sum(1 << i for i, f in enumerate(filters) if matches(f, tuple_of(*p)))
            assert want, "the all-wildcard filter matches every probe"
            assert [s[0][6] for s in samples] == [1, 2], f"{p}: one inbound and one outbound sample"
            (h_in, d_in), (h_out, d_out) = samples
            assert h_in[0] == want and h_out[0] == want, f"{p}: recordings {h_in[0]:#x} != {want:#x}"
            assert d_in == f_in and h_in[3] == len(f_in) and h_in[2] == len(f_in)
            assert d_out == out and h_out[3] == len(out), "outbound sample = the encapsulated frame"
            assert h_in[7] == 0xFF and h_out[7] == XDP_TX
            assert h_out[5] != 0 and h_in[5] == 0, "backend id only on the way out"
            assert h_out[1] >= h_in[1] > 0
            checked += 1
    assert checked == 64


def test_overlapping_filters_across_and_within_recordings(env, rec):
    r = random.Random(5)
    texts = [
        ("203.0.113.0/24 0 any 0 any", 0),
        ("203.0.113.0/25 0 198.51.100.1 80 tcp", 0),      # overlaps slot 0's filter: one sample
        ("203.0.113.0/24 0 any 0 any", 1),                # identical filter, other recording
        ("203.0.0.0/16 0 198.51.100.0/31 443 any", 2),
        ("any 0 198.51.100.2 0 udp", 3),
        ("0.0.0.0/0 40001 any 0 any", 4),
        ("2001:db8:77::/64 0 any 80 tcp", 5),
        ("2001:db8::/32 0 2001:db8:100::2/128 0 any", 6),
        ("::/0 0 any 443 udp", 7),
    ]
    entries = [FilterEntry(parse_filter(t), s) for t, s in texts]
    rec.set(entries)
    srcs4 = ["203.0.113.5", "203.0.113.200", "203.0.7.1", "192.0.2.5"]
    srcs6 = ["2001:db8:77::5", "2001:db8:77:1::5", "2001:db9::1", "2001:db8:99::1"]
    seen = set()
    for _ in range(80):
        fam = r.choice((4, 6))
        p = (r.choice(srcs4 if fam == 4 else srcs6), r.choice(VIPS4 if fam == 4 else VIPS6),
             r.choice((40000, 40001)), r.choice(PORTS), r.choice(("tcp", "udp")))
        want = 0
        for e in entries:
            if matches(e.filter, tuple_of(*p)):
                want |= 1 << e.slot
        _, _, samples = rec.run(frame(*p))
        if want:
            assert [s[0][0] for s in samples] == [want, want], p
        else:
            assert samples == [], f"{p} matches nothing, yet was sampled"
        seen.add(want)
    assert 0 in seen and len(seen) > 6, "the probes exercised misses and several overlaps"
    assert any(w & 0b11 == 0b11 for w in seen), "the identical filter reached both recordings"


def test_capture_length_is_the_largest_of_the_matching_recordings(env, rec):
    f_all = parse_filter("203.0.113.0/24 0 any 0 any")
    f_one = parse_filter(f"203.0.113.7 0 {VIPS4[0]} 80 tcp")
    rec.set([FilterEntry(f_all, 0, 64), FilterEntry(f_one, 1, 100)])
    payload = b"z" * 500
    _, out, s = rec.run(frame(CLIENT4, VIPS4[0], 40000, 80, "tcp", payload))
    (h_in, d_in), (h_out, d_out) = s
    assert (h_in[0], h_in[2], h_in[3]) == (0b11, 100, 54 + 500)
    assert (h_out[2], h_out[3]) == (100, len(out)) and d_out == out[:100]
    _, _, s = rec.run(frame(CLIENT4, VIPS4[1], 40000, 80, "tcp", payload))
    assert [(h[0], h[2]) for h, _ in s] == [(0b01, 64), (0b01, 64)]
    rec.set([FilterEntry(f_all, 0, 0)])
    _, out, s = rec.run(frame(CLIENT4, VIPS4[1], 40000, 80, "tcp", payload))
    assert [(h[2], h[3]) for h, _ in s] == [(554, 554), (len(out), len(out))], "0 = whole packet"
    assert CAP_WHOLE > 1514


def test_any_new_mask_is_a_map_update_never_a_new_program(env, rec):
    base = parse_filter("203.0.113.0/24 0 any 0 any")
    rec.set([FilterEntry(base, 0)])
    prog_before = env.call(_attached_prog_id, EDGE_IF)
    assert prog_before == prog_info(env.dp.prog_fd).id
    p_other = frame("203.0.114.9", VIPS4[0], 40000, 80, "tcp")
    assert rec.run(p_other)[2] == []
    # Same mask (/24, rest wild): one more entry.
    rec.set([FilterEntry(base, 0), FilterEntry(parse_filter("203.0.114.0/24 0 any 0 any"), 1)])
    assert [h[0] for h, _ in rec.run(p_other)[2]] == [0b10, 0b10]
    # New masks (a /32, /20 to /20 with a port, an IPv6 /64): map writes, the same program.
    verdict0, out0, _ = rec.run(frame(OTHER4, VIPS4[0], 41000, 80, "tcp"))
    rec.set([FilterEntry(base, 0), FilterEntry(parse_filter("192.0.2.77 0 any 0 any"), 2),
             FilterEntry(parse_filter("192.0.0.0/20 0 198.51.96.0/20 80 tcp"), 3),
             FilterEntry(parse_filter("2001:db8:77::/64 0 any 0 any"), 4)])
    assert env.call(_attached_prog_id, EDGE_IF) == prog_before == prog_info(env.dp.prog_fd).id
    slots, at = rec.rd.slots, rec.rd.slots[base.mask()]
    assert sorted(v for m, v in slots.items() if m != base.mask()) == [*[s for s in range(32) if s != at][:2], 32], \
        "new masks take the lowest free slots of their family"
    verdict1, out1, s = rec.run(frame(OTHER4, VIPS4[0], 41000, 80, "tcp"))
    assert (verdict1, out1) == (verdict0, out0)
    assert [h[0] for h, _ in s] == [0b1100, 0b1100], "the /32 and the /20 -> /20:80 both match"
    assert [h[0] for h, _ in rec.run(frame(CLIENT6, VIPS6[0], 41000, 80, "tcp"))[2]] == [0b10000, 0b10000]
    assert rec.run(p_other)[2] == [], "filters of the old set are gone"
    # A mask that stays keeps its slot; a freed slot is taken by the next new mask.
    kept = rec.rd.slots[parse_filter("192.0.2.77 0 any 0 any").mask()]
    rec.set([FilterEntry(parse_filter("192.0.2.77 0 any 0 any"), 2),
             FilterEntry(parse_filter("any 0 198.51.100.1 0 udp"), 5)])
    assert rec.rd.slots[parse_filter("192.0.2.77 0 any 0 any").mask()] == kept
    assert rec.rd.slots[parse_filter("any 0 198.51.100.1 0 udp").mask()] == min({0, 1} - {kept})
    assert [h[0] for h, _ in rec.run(frame(CLIENT4, VIPS4[0], 41000, 443, "udp"))[2]] == [1 << 5, 1 << 5]
    assert rec.run(frame(CLIENT4, VIPS4[0], 41000, 443, "tcp"))[2] == []
    rec.set([FilterEntry(base, 0)])
    assert rec.run(frame(OTHER4, VIPS4[0], 41000, 80, "tcp"))[2] == []
    assert env.call(_attached_prog_id, EDGE_IF) == prog_before


def test_slot_reuse_never_matches_wrongly(env, rec):
    """Masks in and out of every slot, many times: each packet's samples are exactly what the
    plain semantics say (a mask of another filter in a reused slot finds only true matches)."""
    r = random.Random(15)
    pool = [Filter.from_fields(src=str(ipaddress.ip_network(f"203.0.113.{r.choice((7, 9))}/{n}", strict=False)),
                               dport=r.choice((0, 80)), proto="tcp") for n in range(24, 33)]
    pool += [parse_filter(f"any 0 198.51.100.{i} 0 any") for i in (1, 2)]
    pool = list(dict.fromkeys(pool))
    probe = (CLIENT4, VIPS4[0], 40000, 80)
    for _ in range(6):
        chosen = r.sample(pool, 4)
        rec.set([FilterEntry(f, i) for i, f in enumerate(chosen)])
        want = sum(1 << i for i, f in enumerate(chosen) if matches(f, PacketTuple.make(*probe[:2], probe[2], probe[3], 6)))
        got = rec.run(frame(*probe, "tcp"))[2]
        assert [h[0] for h, _ in got] == ([want, want] if want else [])


def test_incremental_writes_leave_exactly_what_a_fresh_write_would(env, rec):
    """Recordings come and go (shared filters, capture lengths changing): the kernel's maps
    always hold what build_filters/build_bits compute from scratch for the entries in force."""
    r = random.Random(16)
    pool = [Filter.from_fields(src=str(ipaddress.ip_network(f"203.0.113.{r.randrange(256)}/{r.choice((24, 28, 32))}",
                                                                strict=False)),
                               dst=r.choice(("any", VIPS4[0], "198.51.100.0/22")), dport=r.choice((0, 80, 443)),
                               proto=r.choice(("tcp", "udp", "any"))) for _ in range(40)]
    pool += [parse_filter(f"2001:db8:77::/{n} 0 any {p} any") for n in (48, 64) for p in (0, 80)]
    pool = list(dict.fromkeys(pool))
    recordings: dict[int, tuple[list[Filter], int]] = {}
    for step in range(12):
        slot = r.randrange(6)
        if slot in recordings and r.random() < 0.4:
            del recordings[slot]
        else:
            recordings[slot] = (r.sample(pool, r.randrange(1, 8)), r.choice((0, 64, 128)))
        entries = [FilterEntry(f, s, cap) for s, (fs, cap) in sorted(recordings.items()) for f in fs]
        rec.set(entries)
        _check_maps(env, rec, entries)
    rec.set([])
    _check_maps(env, rec, [])


def test_opening_the_maps_clears_what_a_dead_daemon_armed(env, rec):
    """A restarted daemon opens the pinned maps with recordings of the dead one still armed
    (v4 and v6 masks, wildcards): everything is cleared, and with every mask slot free the
    3 MB of bitmaps are not even read (no bit can be set then)."""
    from l4lb.datapath.recorder import RecorderMaps

    entries = [FilterEntry(parse_filter("203.0.113.0/24 0 any 80 tcp"), 0),
               FilterEntry(parse_filter("2001:db8:77::/48 0 any 0 any"), 1, 64)]
    rec.set(entries)
    _check_maps(env, rec, entries)
    env.call(RecorderMaps, rec.rd.maps.bpf)   # what the next daemon does at its start
    _check_map_contents(env, rec.rd.maps, {}, [])
    env.call(RecorderMaps, rec.rd.maps.bpf)   # all free already: opened again, still empty
    _check_map_contents(env, rec.rd.maps, {}, [])
    rec.set([])                                # this module's recorder forgets them too
    _check_maps(env, rec, [])


def _check_maps(env, rec, entries) -> None:
    _check_map_contents(env, rec.rd.maps, rec.rd.slots, entries)


def _check_map_contents(env, maps, slots, entries) -> None:
    import numpy as np

    from l4lb.datapath import libbpf
    from l4lb.datapath.recorder import BM_SIZE, build_bits, build_filters

    got_bits = env.call(libbpf.array_lookup_all, maps.bits.map_fd, BM_SIZE, 8).view(np.uint64).reshape(-1)
    got_wild = np.frombuffer(bytes(maps.wild[0]), dtype=np.uint64)
    want = build_bits(entries, slots)
    assert np.array_equal(got_bits, want[:BM_SIZE]) and np.array_equal(got_wild, want[BM_SIZE:])
    got = {bytes(k): (v.recordings, v.caplen) for k, v in maps.filters.items()}
    assert got == build_filters(entries)
    templates = {s: bytes(maps.masks[s]) for s in range(64)}
    assert {s: t for s, t in templates.items() if any(t)} == {s: m.template().pack() for m, s in slots.items()}


def test_no_filters_no_samples_and_same_verdicts(env, rec):
    rec.set([FilterEntry(parse_filter("any 0 any 0 any", family=4), 0)])
    p = frame(CLIENT4, VIPS4[0], 40000, 443, "udp")
    v1, o1, s = rec.run(p)
    assert len(s) == 2
    rec.set([])
    v2, o2, s = rec.run(p)
    assert s == [] and (v2, o2) == (v1, o1)


def test_icmp_too_big_reply_is_recorded_outbound_and_marked(env, rec):
    rec.set([FilterEntry(parse_filter(f"{CLIENT4} 0 any 0 tcp"), 3)])
    big = raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22")
              / IP(src=CLIENT4, dst=VIPS4[0], flags="DF") / TCP(sport=1111, dport=80, flags="A")
              / Raw(b"B" * 1460))
    verdict, out, s = rec.run(big)
    assert verdict == XDP_TX and Ether(out).haslayer(ICMP)
    (h_in, d_in), (h_out, d_out) = s
    assert (h_in[6], h_in[8], d_in) == (1, 0, big)
    assert (h_out[0], h_out[6], h_out[7], h_out[8]) == (1 << 3, 2, XDP_TX, 1), "outbound, flagged ICMP"
    assert d_out == out


def test_full_ring_losses_are_charged_to_each_recording(env, rec):
    rec.set([FilterEntry(parse_filter("any 0 any 0 any", family=4), 0),
             FilterEntry(parse_filter(f"{CLIENT4} 0 any 0 any"), 9)])
    rec.drain()
    before = rec.rd.lost_per_slot()
    rec.samples.clear()
    n = 2000                              # 2 samples of ~140 bytes each: far beyond 64 pages
    for i in range(n):
        env.run(frame(CLIENT4, VIPS4[0], 20000 + i, 80, "tcp", b"x" * 60))
    rec.drain()
    after = rec.rd.lost_per_slot()
    got = len(rec.samples)
    lost0, lost9 = after[0] - before[0], after[9] - before[9]
    assert lost0 > 0 and got + lost0 == 2 * n, (got, lost0)
    assert lost9 == lost0 and after[1] == before[1]
    rec.samples.clear()


def _attached_prog_id(ifname: str) -> int:
    from pyroute2 import IPRoute

    from l4lb.datapath import netlink

    with IPRoute() as ipr:
        return netlink.xdp_state(ipr, netlink.ifindex(ipr, ifname)).prog_id
