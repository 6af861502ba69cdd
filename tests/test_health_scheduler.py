"""The probe scheduler's bookkeeping on a fake clock (no root, no network):
every probe keeps exactly one place in the queue, whatever the loop's
timing. The probes here are stand-ins (an AF_UNIX socket pair that never
answers, or one that answers at once); tests/test_health_lab.py runs the
real probers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from l4lb.health import scheduler as sched
from l4lb.health.overlay import Health
from l4lb.health.probe import EPOLLIN, Attempt, Route
from l4lb.health.targets import ProbeSpec, Timing
from l4lb.models import CheckType


class Clock:
    """monotonic() and time() for the scheduler; the loop's epoll waits move it."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def time(self) -> float:
        return self.t + 1.7e9

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class FakeEpoll:
    """A real epoll set whose waits take fake time: each wait lasts its timeout
    plus the next of ``late`` (a loop that wakes up late: a busy machine)."""

    def __init__(self, real: Any, clock: Clock, late: Iterator[float]) -> None:
        self.real, self.clock, self.late = real, clock, late

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        self.clock.t += max(timeout, 0.0) + next(self.late, 0.0)
        return self.real.poll(0, maxevents)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class Silent(Attempt):
    """A backend that never answers: waits for a byte nobody sends."""

    def start(self) -> int | tuple[bool, str]:
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)
        return EPOLLIN

    def close(self) -> None:
        super().close()
        self.peer.close()


class Answers(Attempt):
    """A backend that answers at once."""

    def start(self) -> int | tuple[bool, str]:
        return True, ""


def spec(i: int = 0) -> ProbeSpec:
    return ProbeSpec(kind=CheckType.tcp, via="direct", address=f"192.0.2.{i + 1}", port=80)


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(sched, "time", c)
    monkeypatch.setattr(sched.random, "uniform", lambda a, b: 0.0)   # first check at once
    return c


def scheduler(clock: Clock, attempt: type[Attempt], late: list[float],
              monkeypatch: pytest.MonkeyPatch) -> sched.Scheduler:
    monkeypatch.setitem(sched.ATTEMPTS, CheckType.tcp, attempt)
    s = sched.Scheduler(lambda t: None)
    s._ep = FakeEpoll(s._ep, clock, iter(late))
    return s


def test_a_probe_due_again_while_its_attempt_runs_keeps_running(clock: Clock,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """timeout == interval (allowed), a backend that never answers, and one check
    started half a second late: its next due comes while that attempt still
    runs. The probe must carry on and go down after ``fall`` timeouts (a
    scheduler that dropped it there stopped checking it for good, and a dead
    backend stayed in service)."""
    s = scheduler(clock, Silent, [0.5], monkeypatch)
    try:
        s.update({spec().key: sched.ProbeConfig(spec(), Timing(1.0, 1.0, rise=1, fall=3), Route())})
        for _ in range(40):
            s._turn()
        job = s.jobs[spec().key]
        elapsed = clock.t - 1000.0
        assert job.state.state is Health.down, (job.state.checks, s.stats)
        # One attempt per interval from then on (it shifted by the late start, no more).
        assert elapsed - 2 <= s.stats.started <= elapsed + 1, (s.stats.started, elapsed)
        assert s.stats.results["failed"] == s.stats.started - (job.running is not None)
    finally:
        s.stop()


def test_a_deadline_passing_between_the_last_look_and_now_does_not_stall_the_loop(
        clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """timeout == interval and a check started 0.3 s late: in the next turn the
    probe is due again while its attempt runs, and that attempt's deadline falls
    after the loop's last look at the sockets but before ``now`` (so it is not
    expired yet). The probe was put back at ``now`` and taken again by the same
    turn, forever: the loop spun and every check of the box stopped (seen in the
    tier lab: 24 million "late" in 30 s). The turn must end, and the probe go on."""
    s = scheduler(clock, Silent, [0.0, 0.3, 0.1, 0.3], monkeypatch)
    try:
        s.update({spec().key: sched.ProbeConfig(spec(), Timing(1.0, 1.0, rise=1, fall=2), Route())})
        turns = threading.Thread(target=lambda: [s._turn() for _ in range(12)], daemon=True)
        turns.start()
        turns.join(10)
        assert not turns.is_alive(), f"the loop is stuck in one turn: {s.stats.late} late"
        job = s.jobs[spec().key]
        assert job.state.state is Health.down and s.stats.late <= 12, (job.state.checks, s.stats)
    finally:
        if not turns.is_alive():
            s.stop()


def test_a_shorter_interval_keeps_one_queue_entry_per_probe(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe whose interval shrinks runs at the new interval; the entry queued
    for the old one is skipped when it comes due, not run as a second chain
    (each such entry stayed in the queue for good, and every later reschedule,
    e.g. no room under max_in_flight, added one more)."""
    s = scheduler(clock, Answers, [], monkeypatch)
    try:
        probes = {spec(i).key: (spec(i), i) for i in range(3)}
        s.update({k: sched.ProbeConfig(sp, Timing(10.0, 1.0, 1, 1), Route()) for k, (sp, _) in probes.items()})
        s._turn()
        assert s.stats.started == 3
        s.update({k: sched.ProbeConfig(sp, Timing(1.0, 1.0, 1, 1), Route()) for k, (sp, _) in probes.items()})
        start = clock.t
        while clock.t - start < 30:
            s._turn()
        per_probe = (s.stats.started - 3) / 3
        assert 29 <= per_probe <= 31, per_probe
        assert len(s._due) == 3, "one queue entry per probe once the old ones came due"
    finally:
        s.stop()


def test_a_loop_that_falls_a_whole_interval_behind_counts_it_late(clock: Clock,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop starved of CPU for longer than an interval leaves checks out and
    ``late`` says so; the probe keeps its phase (restarting late probes at
    now + interval lined them all up into one burst per interval)."""
    s = scheduler(clock, Answers, [0.0, 2.5], monkeypatch)
    try:
        s.update({spec().key: sched.ProbeConfig(spec(), Timing(1.0, 0.5, 1, 1), Route())})
        s._turn()                      # the first check, on time
        s._turn()                      # the next one 2.5 s late: two checks left out
        assert (s.stats.started, s.stats.late) == (2, 1)
        s._turn()                      # then on time again, in its old phase
        assert (s.stats.started, s.stats.late) == (3, 1) and clock.t == pytest.approx(1004.0)
    finally:
        s.stop()


def test_each_attempt_gets_its_whole_timeout_when_a_turn_launches_a_burst(clock: Clock,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Five probes come due in the same turn and each start (connect) takes 0.3 s
    of a busy machine: the last one starts 1.2 s after the turn began. Its
    timeout runs from its own start. (Measured from the turn's clock it had
    0.4 s of its 1.6 s: bench/health.py showed bursts of "timeout after 1 s"
    checks that had lasted 0.7 s.)"""

    began: dict[str, float] = {}

    class SlowStart(Silent):
        def start(self) -> int | tuple[bool, str]:
            began[self.key] = clock.t
            clock.t += 0.3
            return super().start()

    failures: list[sched.Failure] = []
    monkeypatch.setitem(sched.ATTEMPTS, CheckType.tcp, SlowStart)
    s = sched.Scheduler(lambda t: None, on_failure=failures.append)
    s._ep = FakeEpoll(s._ep, clock, iter([]))
    try:
        s.update({spec(i).key: sched.ProbeConfig(spec(i), Timing(10.0, 1.6, 1, 3), Route()) for i in range(5)})
        while len(failures) < 5:
            s._turn()
        assert [round(f.at - 1.7e9 - began[f.key], 6) for f in failures] == [1.6] * 5   # failed at start + timeout
        assert [round(f.latency, 6) for f in failures] == [1.6] * 5, failures
        assert {k: n for k, n in s.stats.failed_by.items() if n} == {"timeout": 5}
        assert all(f.error == "timeout after 1.6 s (connecting)" for f in failures)
    finally:
        s.stop()


@pytest.mark.parametrize("error,kind", [
    ("timeout after 1 s (connecting)", "timeout"), ("timeout after 0.5 s (receiving)", "timeout"),
    ("connect: connection refused", "refused"), ("receive: connection refused", "refused"),
    ("receive: connection reset by peer", "reset"), ("connect: no route to host", "unreachable"),
    ("connect: network is unreachable", "unreachable"), ("TLS: CERTIFICATE_VERIFY_FAILED", "tls"),
    ("HTTP 503 (expected 200-399)", "http"), ("HTTP: malformed response (bad status line)", "http"),
    ("body does not contain 'ok'", "http"), ("connection closed before a response", "http"),
    ("the first 64 KiB of the body do not contain 'ok'", "http"), ("DNS: NXDOMAIN", "dns"),
    ("send: broken pipe", "error"), ("ValueError: odd reply", "error"),
])
def test_every_failure_text_of_the_probers_has_its_kind(error: str, kind: str) -> None:
    from l4lb.health.probe import FAILURE_KINDS, failure_kind

    assert failure_kind(error) == kind and kind in FAILURE_KINDS


class Answered(Attempt):
    """A backend that answers at once: its byte is waiting when the loop looks."""

    cost = 0.0   # fake seconds that starting one takes (a busy machine)

    def start(self) -> int | tuple[bool, str]:
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)
        self.peer.send(b"x")
        Answered.clock.t += self.cost
        return EPOLLIN

    def event(self, mask: int) -> int | tuple[bool, str]:
        return True, ""

    def close(self) -> None:
        super().close()
        self.peer.close()


def test_answers_are_taken_while_a_burst_of_checks_starts(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 checks due at once (a loop that fell behind), each start taking 1 ms:
    the answers are taken between batches of starts, so no check waits for the
    whole burst (it took 1 s, twice the timeout, when every start came first)."""
    durations: list[float] = []
    monkeypatch.setattr(Answered, "clock", clock, raising=False)
    monkeypatch.setattr(Answered, "cost", 0.001)
    monkeypatch.setitem(sched.ATTEMPTS, CheckType.tcp, Answered)
    s = sched.Scheduler(lambda t: None, lambda cfg, ok, seconds: durations.append(seconds))
    s._ep = FakeEpoll(s._ep, clock, iter([]))
    try:
        s.update({spec(i).key: sched.ProbeConfig(spec(i), Timing(10.0, 0.5, 1, 3), Route()) for i in range(1000)})
        while len(durations) < 1000:
            s._turn()
        assert s.stats.results == {"ok": 1000, "failed": 0}
        assert max(durations) <= 0.3, max(durations)   # a batch of starts (256 ms here), not the burst
    finally:
        s.stop()


def test_an_answer_that_came_while_the_loop_was_busy_is_no_timeout(clock: Clock,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe 0 (timeout 1 s) answers half a second after its start, while the loop
    is busy with probe 1's answer for a whole second (a stalled box): past probe
    0's deadline. The loop looks at the sockets again before it expires
    deadlines: a success, not a timeout."""
    attempts: dict[str, Any] = {}

    class Peers(Silent):
        def start(self) -> int | tuple[bool, str]:
            r = super().start()
            attempts[self.key] = self
            if self.key == spec(1).key:
                self.peer.send(b"x")       # probe 1 has answered by the next look
            return r

        def event(self, mask: int) -> int | tuple[bool, str]:
            if self.key == spec(1).key:
                attempts[spec(0).key].peer.send(b"x")   # probe 0 answers now ...
                clock.t += 1.0                          # ... and the loop stalls past its deadline
            return True, ""

    monkeypatch.setitem(sched.ATTEMPTS, CheckType.tcp, Peers)
    s = sched.Scheduler(lambda t: None)
    s._ep = FakeEpoll(s._ep, clock, iter([]))
    try:
        s.update({spec(0).key: sched.ProbeConfig(spec(0), Timing(10.0, 1.0, 1, 3), Route()),
                  spec(1).key: sched.ProbeConfig(spec(1), Timing(10.0, 0.5, 1, 3), Route())})
        s._turn()                       # both start
        s._turn()                       # at probe 1's deadline: its answer; meanwhile probe 0's, then the stall
        assert s.stats.results == {"ok": 2, "failed": 0}, [j.state.last_error for j in s.jobs.values()]
    finally:
        s.stop()
