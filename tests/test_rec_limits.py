"""Recorder stop conditions and rotation: exact, predictable file sets."""

from __future__ import annotations

import os

import dpkt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from l4lb.recorder.limits import Action, Decision, Limiter, RotationPolicy, StopConditions, StopReason
from l4lb.recorder.pcapfile import PcapWriter, safe_join, safe_name

S = 1_000_000_000
T0 = 1_700_000_000 * S
HDR, REC = 24, 16  # classic pcap global header and per-record header


def simulate(limiter, packets):
    """Drive a limiter with (caplen, ts) the way the drain does, modelling classic pcap file
    sizes. Returns ({index: [packet numbers]} in the final state, [decisions], events)."""
    files: dict[int, list[int]] = {0: []}
    size = HDR
    decisions, events = [], []
    for n, (caplen, ts) in enumerate(packets):
        d = limiter.offer(caplen, ts, file_bytes=size)
        decisions.append(d)
        if d.action is Action.STOP:
            events.append(("stop", n, d.reason))
            break
        if d.action is Action.ROTATE:
            events.append(("rotate", n, d.index, d.overwrite))
            assert (d.index in files) == d.overwrite
            files[d.index] = []
            size = HDR
        files[d.index].append(n)
        size += REC + caplen
        if d.final:
            events.append(("final", n, d.reason))
            break
    return files, decisions, events


def steady(n, caplen=40, step=S // 10, start=T0):
    return [(caplen, start + i * step) for i in range(n)]


def test_no_limits_one_file():
    files, decisions, _ = simulate(Limiter(start_ns=T0), steady(50))
    assert files == {0: list(range(50))}
    assert all(d == Decision(Action.WRITE, 0) for d in decisions)


def test_size_rotation_like_tcpdump_C():
    # records are 56 bytes: 24 -> 80 -> 136 (> 100: rotate before the third packet)
    lim = Limiter(rotation=RotationPolicy(file_size=100), start_ns=T0)
    files, decisions, events = simulate(lim, steady(7))
    assert files == {0: [0, 1], 1: [2, 3], 2: [4, 5], 3: [6]}
    assert [d.action for d in decisions] == [Action.WRITE, Action.WRITE, Action.ROTATE, Action.WRITE,
                                             Action.ROTATE, Action.WRITE, Action.ROTATE]
    assert events == [("rotate", 2, 1, False), ("rotate", 4, 2, False), ("rotate", 6, 3, False)]
    assert lim.files_opened == 4 and lim.index == 3


def test_size_equal_to_limit_does_not_rotate():
    # 24 + 56 = 80: with file_size=80 the file is not *larger*, so the next packet stays
    files, _, _ = simulate(Limiter(rotation=RotationPolicy(file_size=80), start_ns=T0), steady(4))
    assert files == {0: [0, 1], 1: [2, 3]}


def test_file_smaller_than_header_still_gets_one_packet_each():
    files, _, _ = simulate(Limiter(rotation=RotationPolicy(file_size=1), start_ns=T0), steady(3))
    assert files == {0: [0], 1: [1], 2: [2]}


def test_ring_with_C_and_W():
    lim = Limiter(rotation=RotationPolicy(file_size=100, max_files=3), start_ns=T0)
    files, _, events = simulate(lim, steady(11))
    assert [e[2:] for e in events] == [(1, False), (2, False), (0, True), (1, True), (2, True)]
    # final state: slot 0 was rewritten with packets 6, 7; slot 1 with 8, 9; slot 2 with 10
    assert files == {0: [6, 7], 1: [8, 9], 2: [10]}
    assert lim.files_opened == 6 and lim.index == 2


def test_ring_of_one_file():
    files, _, events = simulate(Limiter(rotation=RotationPolicy(file_size=100, max_files=1), start_ns=T0), steady(5))
    assert [e[2:] for e in events] == [(0, True), (0, True)]
    assert files == {0: [4]}


def test_time_rotation_like_tcpdump_G_window_from_first_packet():
    lim = Limiter(rotation=RotationPolicy(rotate_ns=S), start_ns=T0)
    # first packet 0.5 s after start: window of file 0 is [0.5, 1.5)
    ts = [T0 + x for x in (S // 2, S, S + S // 2 - 1, S + S // 2, 5 * S, 5 * S + 1, 6 * S)]
    files, _, events = simulate(lim, [(40, t) for t in ts])
    assert files == {0: [0, 1, 2], 1: [3], 2: [4, 5], 3: [6]}
    assert [e[1] for e in events] == [3, 4, 6]


def test_time_rotation_stops_after_W_files():
    lim = Limiter(rotation=RotationPolicy(rotate_ns=S, max_files=2), start_ns=T0)
    files, decisions, events = simulate(lim, steady(30, step=S // 4))
    assert files == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert events[-1] == ("stop", 8, StopReason.MAX_FILES)
    assert lim.stopped and lim.reason is StopReason.MAX_FILES
    assert lim.offer(1, T0 + 99 * S, file_bytes=0) == Decision(Action.STOP, 1, reason=StopReason.MAX_FILES)


def test_C_and_G_with_W_is_a_ring():
    lim = Limiter(rotation=RotationPolicy(file_size=1000, rotate_ns=S, max_files=2), start_ns=T0)
    # 1 s windows of two packets each (size never reached): files 0,1,0,1
    files, _, events = simulate(lim, steady(8, step=S // 2))
    assert [e[2:] for e in events] == [(1, False), (0, True), (1, True)]
    assert files == {0: [4, 5], 1: [6, 7]}


def test_time_checked_before_size_one_rotation_per_packet():
    lim = Limiter(rotation=RotationPolicy(file_size=100, rotate_ns=S), start_ns=T0)
    files, _, events = simulate(lim, [(40, T0), (40, T0 + 1), (40, T0 + 2 * S), (40, T0 + 2 * S + 1)])
    assert files == {0: [0, 1], 1: [2, 3]}
    assert len(events) == 1


def test_backwards_timestamps_never_rotate_by_time():
    lim = Limiter(rotation=RotationPolicy(rotate_ns=S), start_ns=T0)
    files, _, _ = simulate(lim, [(40, T0 + 5 * S), (40, T0), (40, T0 + 5 * S + S - 1), (40, T0 - 10 * S)])
    assert files == {0: [0, 1, 2, 3]}


def test_max_packets_final_then_sticky_stop():
    lim = Limiter(StopConditions(max_packets=3), start_ns=T0)
    d = [lim.offer(10, T0 + i) for i in range(3)]
    assert [x.final for x in d] == [False, False, True] and d[2].reason is StopReason.MAX_PACKETS
    assert d[2].action is Action.WRITE and lim.packets == 3
    assert lim.offer(10, T0 + 3) == Decision(Action.STOP, 0, reason=StopReason.MAX_PACKETS)
    assert lim.packets == 3 and lim.poll(T0) == Decision(Action.STOP, 0, reason=StopReason.MAX_PACKETS)


def test_max_bytes_never_exceeded():
    lim = Limiter(StopConditions(max_bytes=100), start_ns=T0)
    assert lim.offer(60, T0) == Decision(Action.WRITE, 0)
    assert lim.offer(41, T0 + 1) == Decision(Action.STOP, 0, reason=StopReason.MAX_BYTES)
    assert lim.bytes == 60 and lim.packets == 1
    exact = Limiter(StopConditions(max_bytes=100), start_ns=T0)
    exact.offer(60, T0)
    assert exact.offer(40, T0 + 1) == Decision(Action.WRITE, 0, final=True, reason=StopReason.MAX_BYTES)
    assert exact.bytes == 100


def test_max_duration_and_poll():
    lim = Limiter(StopConditions(max_duration_ns=10 * S), start_ns=T0)
    assert lim.poll(T0 + 10 * S - 1) is None
    assert lim.offer(40, T0 + 10 * S - 1).action is Action.WRITE
    assert lim.offer(40, T0 + 10 * S) == Decision(Action.STOP, 0, reason=StopReason.MAX_DURATION)
    idle = Limiter(StopConditions(max_duration_ns=10 * S), start_ns=T0)
    assert idle.poll(T0 + 10 * S) == Decision(Action.STOP, 0, reason=StopReason.MAX_DURATION)
    assert idle.offer(1, T0).action is Action.STOP


def test_stop_wins_over_rotation_no_empty_file():
    lim = Limiter(StopConditions(max_bytes=119), RotationPolicy(file_size=100), start_ns=T0)
    files, _, events = simulate(lim, steady(5, caplen=40))
    # packet 2 would rotate (136 > 100) but also exceed 119 captured bytes: stop, no file 1
    assert files == {0: [0, 1]}
    assert events == [("stop", 2, StopReason.MAX_BYTES)]
    assert lim.files_opened == 1


def test_all_limits_combined_exact_file_set():
    lim = Limiter(
        StopConditions(max_packets=9, max_bytes=10_000, max_duration_ns=60 * S),
        RotationPolicy(file_size=100, max_files=4),
        start_ns=T0,
    )
    files, _, events = simulate(lim, steady(100))
    assert files == {0: [8], 1: [2, 3], 2: [4, 5], 3: [6, 7]}
    assert events[-1] == ("final", 8, StopReason.MAX_PACKETS)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(max_files=3), "needs file_size"),
        (dict(file_size=0), "file_size"),
        (dict(rotate_ns=-1), "rotate_ns"),
        (dict(max_files=0, file_size=1), "max_files"),
        (dict(file_size=True), "file_size"),
    ],
)
def test_rotation_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        RotationPolicy(**kwargs)


def test_stop_and_offer_validation():
    with pytest.raises(ValueError, match="max_packets"):
        StopConditions(max_packets=0)
    with pytest.raises(ValueError, match="max_duration_ns"):
        StopConditions(max_duration_ns=1.5)  # type: ignore[arg-type]
    lim = Limiter(rotation=RotationPolicy(file_size=10), start_ns=T0)
    with pytest.raises(ValueError, match="file_bytes"):
        lim.offer(10, T0)
    with pytest.raises(ValueError, match="caplen"):
        lim.offer(-1, T0, file_bytes=0)
    assert lim.packets == 0


# --------------------------------------------------------------------------- with real files

def test_drives_real_writers_to_exact_files(tmp_path):
    """The drain's loop with real writers: sizes from bytes_written, ring overwrite by unlink."""
    lim = Limiter(StopConditions(max_packets=10), RotationPolicy(file_size=200, max_files=3), start_ns=T0)

    def open_index(i):
        return PcapWriter(safe_join(tmp_path, safe_name("rec/1", i, "pcap")))

    w = open_index(0)
    for n in range(100):
        d = lim.offer(60, T0 + n, file_bytes=w.bytes_written)
        if d.action is Action.STOP:
            break
        if d.action is Action.ROTATE:
            w.close()
            path = safe_join(tmp_path, safe_name("rec/1", d.index, "pcap"))
            if d.overwrite:
                os.unlink(path)
            w = open_index(d.index)
        w.write_packet(n.to_bytes(2, "big") + bytes(58), T0 + n)
        if d.final:
            break
    w.close()
    # 24-byte header, 76-byte records: 24, 100, 176, 252 > 200 -> three packets per file
    # files 0:[0,1,2] 1:[3,4,5] 2:[6,7,8] then 0 again:[9]
    got = {}
    for name in sorted(os.listdir(tmp_path)):
        with open(tmp_path / name, "rb") as f:
            got[name] = [int.from_bytes(buf[:2], "big") for _, buf in dpkt.pcap.Reader(f)]
    base = safe_name("rec/1", 0, "pcap").rsplit("_", 1)[0]
    assert got == {
        f"{base}_000000.pcap": [9],
        f"{base}_000001.pcap": [3, 4, 5],
        f"{base}_000002.pcap": [6, 7, 8],
    }


# --------------------------------------------------------------------------- properties

@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 300), st.integers(-S // 10, S)), max_size=60),
    st.one_of(st.none(), st.integers(1, 30)),
    st.one_of(st.none(), st.integers(1, 3000)),
    st.one_of(st.none(), st.integers(1, 20 * S)),
    st.one_of(st.none(), st.integers(1, 600)),
    st.one_of(st.none(), st.integers(1, 3 * S)),
    st.one_of(st.none(), st.integers(1, 4)),
)
def test_prop_limits_hold(steps, max_packets, max_bytes, max_dur, file_size, rotate_ns, max_files):
    if max_files is not None and file_size is None and rotate_ns is None:
        max_files = None
    rot = RotationPolicy(file_size=file_size, rotate_ns=rotate_ns, max_files=max_files)
    lim = Limiter(StopConditions(max_packets, max_bytes, max_dur), rot, start_ns=T0)
    ts, pkts = T0, []
    for caplen, dt in steps:
        ts += dt
        pkts.append((caplen, ts))
    written, seq_files = [], [[]]
    size, stopped = HDR, False
    for n, (caplen, t) in enumerate(pkts):
        d = lim.offer(caplen, t, file_bytes=size)
        if stopped:
            assert d.action is Action.STOP
            continue
        if d.action is Action.STOP:
            stopped = True
            assert d.reason is not None
            continue
        if d.action is Action.ROTATE:
            assert seq_files[-1], "rotated away from an empty file"
            if file_size is not None and (rotate_ns is None or t - pkts[seq_files[-1][0]][1] < rotate_ns):
                assert size > file_size
            seq_files.append([])
            size = HDR
        elif file_size is not None and seq_files[-1]:
            assert size <= file_size
        seq_files[-1].append(n)
        size += REC + caplen
        written.append(n)
        if max_files is not None and file_size is not None:
            assert d.index == (len(seq_files) - 1) % max_files
            assert d.overwrite == (d.action is Action.ROTATE and len(seq_files) > max_files)
        else:
            assert d.index == len(seq_files) - 1
        if d.final:
            stopped = True
    total = sum(pkts[n][0] for n in written)
    assert lim.packets == len(written) and lim.bytes == total
    if max_packets is not None:
        assert len(written) <= max_packets
    if max_bytes is not None:
        assert total <= max_bytes
    if max_dur is not None:
        assert all(pkts[n][1] - T0 < max_dur for n in written)
    if rotate_ns is not None:
        for f in seq_files:
            assert all(pkts[n][1] - pkts[f[0]][1] < rotate_ns for n in f)
    if max_files is not None and file_size is None:
        assert len(seq_files) <= max_files
    assert lim.files_opened == len(seq_files)


@settings(max_examples=300, deadline=None)
@given(
    # steps and limits that land exactly on each other: the bounds are where plain() can be wrong
    st.lists(st.tuples(st.sampled_from([0, 1, 40, 300]),
                       st.one_of(st.sampled_from([0, S // 4, S // 2, S]), st.integers(-S // 10, S))), max_size=60),
    st.one_of(st.none(), st.integers(1, 30)),
    st.one_of(st.none(), st.sampled_from([40, 80, 341, 680]), st.integers(1, 3000)),
    st.one_of(st.none(), st.sampled_from([S // 2, S, 2 * S]), st.integers(1, 20 * S)),
    st.one_of(st.none(), st.sampled_from([HDR + REC + 40, HDR + 2 * (REC + 40)]), st.integers(1, 600)),
    st.one_of(st.none(), st.sampled_from([S // 2, S, 2 * S]), st.integers(1, 3 * S)),
    st.one_of(st.none(), st.integers(1, 4)),
)
@example([(40, 0), (40, 0)], None, 80, None, None, None, None)          # max_bytes reached exactly: final
@example([(1, S // 2), (1, S // 2)], None, None, S, None, None, None)   # max_duration reached exactly: stop
def test_prop_plain_runs_are_what_offer_decides(steps, max_packets, max_bytes, max_dur, file_size, rotate_ns,
                                                max_files):
    """Limiter.plain's bounds (with the caller's file-size check) only admit packets that
    offer() would WRITE to the current file without a final; took() counts them as offer
    does: a limiter fed through took() wherever plain() admits a packet ends in the same
    state as one asked about every packet."""
    if max_files is not None and file_size is None and rotate_ns is None:
        max_files = None
    stop, rot = StopConditions(max_packets, max_bytes, max_dur), RotationPolicy(file_size, rotate_ns, max_files)
    asked, ran = Limiter(stop, rot, start_ns=T0), Limiter(stop, rot, start_ns=T0)
    ts, size, took = T0, HDR, 0
    for caplen, dt in steps:
        ts += dt
        p = ran.plain()
        plain = (p is not None and p.packets >= 1 and caplen < p.caplen_below and ts < p.ts_below
                 and (file_size is None or size <= file_size))
        d = asked.offer(caplen, ts, file_bytes=size)
        if plain:
            assert d.action is Action.WRITE and not d.final, (d, p)
            ran.took(1, caplen)
            took += 1
        else:
            assert ran.offer(caplen, ts, file_bytes=size) == d
        if d.action is Action.STOP:
            break
        size = (HDR if d.action is Action.ROTATE else size) + REC + caplen
        if d.final:
            break
    state = lambda lim: (lim.packets, lim.bytes, lim.index, lim.files_opened, lim.reason)  # noqa: E731
    assert state(ran) == state(asked)
