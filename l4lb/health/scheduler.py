"""One thread, one epoll loop: every probe on time, thousands per second.

Each probe (one per distinct ``ProbeSpec.key``) is due every ``interval``
seconds, first at a random point within its first interval so that probes
do not start in bursts. A due probe starts an attempt (l4lb/health/probe.py);
its result goes through the probe's rise/fall machine, and transitions go to
``on_transition`` (the manager persists them and tells the control core).
At most ``max_in_flight`` attempts run at once; a probe that finds no room
is started a little later and counted as late, and so is a probe that comes
due while its last attempt still runs (it starts when that one ends), and one
that starts a whole interval late (the loop fell behind: short of CPU). A probe
has one place in the queue (its ``due``); entries left behind by a reschedule
are skipped. An attempt that the LB
itself cannot start (no socket, no tunnel) is *not run*: no evidence, no
change.

A turn takes every answer first, looks at the sockets once more, and only
then expires deadlines that passed before that last look: an answer that
arrived before its deadline is never a timeout, however late the loop runs.
It starts at most LAUNCH_BATCH checks before it looks at the sockets again, so
a burst of due checks (after a stall) does not keep answers waiting; each
check's timeout runs from its own start.

Probes are added, changed and removed with ``update`` from any thread; the
loop picks that up at once (an eventfd wakes it). Results and states are read by the API
from other threads: they are plain attribute reads, updated only here.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import random
import resource
import select
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from l4lb.health.machine import Damping, ProbeState, Transition
from l4lb.health.overlay import Health
from l4lb.health.probe import ATTEMPTS, FAILURE_KINDS, Attempt, LocalError, Route, failure_kind
from l4lb.health.targets import ProbeSpec, Timing

log = logging.getLogger("l4lbd.health")
MAX_EVENTS = 1024
DRAIN_ROUNDS = 16      # looks at the sockets per turn, at most (MAX_EVENTS each)
LAUNCH_BATCH = 256     # checks started per turn, at most


@dataclass(frozen=True)
class ProbeConfig:
    spec: ProbeSpec
    timing: Timing
    route: Route | str      # a Route, or why the probe cannot run (e.g. the tunnel is unavailable)


@dataclass
class Job:
    key: str
    config: ProbeConfig
    state: ProbeState
    due: float = 0.0
    running: Attempt | None = None


@dataclass(frozen=True)
class Failure:
    """One failed check, for the API's recent failures: which probe, why, when
    (wall clock), how long it took and from which local port (to find it in a capture)."""

    key: str
    error: str
    at: float
    latency: float
    source_port: int | None


@dataclass
class LoopStats:
    started: int = 0
    finished: int = 0
    late: int = 0
    not_run: int = 0
    results: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})
    # failure_kind -> count; every kind from the start, so that the dict never changes
    # size while the flusher thread pickles it (and every metric series exists at 0).
    failed_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_KINDS, 0))
    states: dict[str, int] = field(default_factory=dict)   # probes by state (filled when sent)


class Scheduler:
    def __init__(self, on_transition: Callable[[Transition], None],
                 on_result: Callable[[ProbeConfig, bool, float], None] | None = None, *,
                 on_failure: Callable[[Failure], None] | None = None,
                 damping: Damping = Damping(), max_in_flight: int = 4096,
                 restored: Mapping[str, tuple[Health, float]] | None = None) -> None:
        self._on_transition = on_transition
        self._on_result = on_result
        self._on_failure = on_failure
        self.damping = damping
        self.max_in_flight = _fd_room(max_in_flight)
        self.restored = dict(restored or {})   # key -> (state, since) from the last run
        self.jobs: dict[str, Job] = {}
        self.stats = LoopStats()
        self._pending: dict[str, ProbeConfig | None] = {}
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep = select.epoll()
        self._ep.register(self._wake, select.EPOLLIN)
        self._inflight: dict[int, Job] = {}
        self._due: list[tuple[float, int, Job]] = []
        self._deadlines: list[tuple[float, int, Job, Attempt]] = []
        self._seq = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.version = 0    # bumped when probes come or go or change state (counting them is then due)

    # -- from other threads ----------------------------------------------------------

    def update(self, probes: Mapping[str, ProbeConfig | None]) -> None:
        """New or changed probes by key; None removes one."""
        with self._lock:
            self._pending.update(probes)
        os.eventfd_write(self._wake, 1)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="l4lb-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(10)
        for job in list(self._inflight.values()):
            if job.running is not None:
                job.running.close()
        self._ep.close()
        os.close(self._wake)

    def state(self, key: str) -> ProbeState | None:
        job = self.jobs.get(key)
        return job.state if job is not None else None

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        while not self._stop:
            try:
                self._turn()
            except Exception:  # noqa: BLE001 - a bug must not stop every health check
                log.exception("health check loop failed; continuing")
                time.sleep(0.1)

    def _turn(self) -> None:
        if self._pending:
            self._reconfigure()
        now = time.monotonic()
        due, dl = self._due, self._deadlines
        wait = min(due[0][0] if due else now + 1.0, dl[0][0] if dl else now + 1.0) - now
        # Every ready socket first, then one more look for what answered while the
        # loop was busy with those: a deadline expires only if it passed before
        # the last look at the sockets (``seen``). When the loop ran late (a busy
        # machine, the GIL), an answer that arrived before its deadline must not
        # be taken for a timeout. (epoll hands out at most MAX_EVENTS per call: a
        # full batch says nothing about what else was ready.)
        events = self._ep.poll(max(wait, 0.0), MAX_EVENTS)
        seen = -math.inf
        for _ in range(DRAIN_ROUNDS):
            for fd, mask in events:
                self._event(fd, mask)
            look = time.monotonic()
            events = self._ep.poll(0, MAX_EVENTS)
            if len(events) < MAX_EVENTS:
                seen = look   # everything ready at `look` is in `events`
            if not events:
                break
        for fd, mask in events:   # the last look's, when answers kept coming
            self._event(fd, mask)
        now = time.monotonic()
        while dl and dl[0][0] <= seen:
            _, _, job, attempt = heapq.heappop(dl)
            if job.running is attempt:
                self._finish(job, False, f"timeout after {job.config.timing.timeout:g} s ({attempt.stage})")
        # At most LAUNCH_BATCH starts per turn: a loop that fell behind (thousands
        # due at once) goes back to the sockets between batches, so answers are
        # taken while a burst starts, not after all of it (their durations stay
        # true, and fewer checks are in flight at once).
        launched = 0
        waiting: list[Job] = []
        while due and due[0][0] <= now and launched < LAUNCH_BATCH:
            at, _, job = heapq.heappop(due)
            if at != job.due or self.jobs.get(job.key) is not job:
                continue  # stale: the job was rescheduled (only the entry at job.due counts) or removed
            if job.running is not None:
                # Due again while its attempt still runs (the loop ran late, or timeout ==
                # interval): it starts once that attempt ends, at its deadline at the latest.
                # Dropping the entry here would stop the probe for good. Queued again only
                # after this loop: a deadline that passed after the last look at the
                # sockets (not expired above) would put it back at ``now``, and this loop
                # would take it again, forever (every probe of the box stopped).
                self.stats.late += 1
                job.due = max(job.running.deadline, now)
                waiting.append(job)
                continue
            self._launch(job, now)
            launched += 1
        for job in waiting:
            self._schedule(job)

    def _event(self, fd: int, mask: int) -> None:
        job = self._inflight.get(fd)
        if job is None:
            if fd == self._wake:
                os.eventfd_read(self._wake)
            return
        attempt = job.running
        assert attempt is not None
        try:
            r = attempt.event(mask)
        except Exception as e:  # noqa: BLE001 - an odd reply must not stop the loop
            r = (False, f"{type(e).__name__}: {e}")
        if isinstance(r, int):
            self._ep.modify(fd, r)
        else:
            self._finish(job, *r)

    def _reconfigure(self) -> None:
        with self._lock:
            changes, self._pending = self._pending, {}
        self.version += 1
        now = time.monotonic()
        for key, cfg in changes.items():
            if cfg is None:
                job = self.jobs.pop(key, None)
                if job is not None and job.running is not None:
                    self._drop(job)
                continue
            job = self.jobs.get(key)
            if job is not None:
                if cfg.timing.interval < job.config.timing.interval and now + cfg.timing.interval < job.due:
                    job.due = now + cfg.timing.interval
                    self._schedule(job)
                job.config = cfg
                job.state.timing = cfg.timing
                continue
            state, since = self.restored.pop(key, (Health.unknown, time.time()))
            job = Job(key, cfg, ProbeState(key, cfg.timing, self.damping, state=state, since=since))
            job.due = now + random.uniform(0, cfg.timing.interval)
            self.jobs[key] = job
            self._schedule(job)

    def _schedule(self, job: Job) -> None:
        """Queue ``job`` at ``job.due``. A job has one live entry, the one at its
        current ``due``; entries left from before a reschedule are skipped."""
        heapq.heappush(self._due, (job.due, next(self._seq), job))

    def _launch(self, job: Job, now: float) -> None:
        interval = job.config.timing.interval
        # Fixed rate. A loop that fell a whole interval behind leaves the missed
        # checks out and says so (late: the box is short of CPU for its probes),
        # but keeps each probe's phase: restarting them all at now + interval
        # would line every late probe up into one burst per interval, which
        # keeps the loop behind for good.
        due = job.due + interval
        if due <= now:
            due += interval * (math.floor((now - due) / interval) + 1)
            self.stats.late += 1
        job.due = due
        self._schedule(job)
        route = job.config.route
        if isinstance(route, str):
            job.state.skip(route)
            self.stats.not_run += 1
            return
        if len(self._inflight) >= self.max_in_flight:
            self.stats.late += 1
            job.due = now + 0.01
            self._schedule(job)
            return
        attempt = ATTEMPTS[job.config.spec.kind](job.config.spec, route, time.monotonic(), job.config.timing.timeout,
                                                 job.key)
        self.stats.started += 1
        job.running = attempt
        try:
            r = attempt.start()
        except LocalError as e:
            attempt.close()
            job.running = None
            job.state.skip(str(e))
            self.stats.not_run += 1
            return
        if isinstance(r, int):
            fd = attempt.fileno()
            self._inflight[fd] = job
            self._ep.register(fd, r)
            heapq.heappush(self._deadlines, (attempt.deadline, next(self._seq), job, attempt))
        else:
            self._finish(job, *r)

    def _drop(self, job: Job) -> None:
        attempt = job.running
        assert attempt is not None
        if attempt.sock is not None:
            self._inflight.pop(attempt.fileno(), None)
        attempt.close()  # closing the fd also takes it out of the epoll set
        job.running = None

    def _finish(self, job: Job, ok: bool, error: str) -> None:
        attempt = job.running
        assert attempt is not None
        now, wall = time.monotonic(), time.time()
        latency = now - attempt.started
        stats = self.stats
        if not ok:
            kind = failure_kind(error)
            stats.failed_by[kind] += 1
            if self._on_failure is not None:
                self._on_failure(Failure(job.key, error, wall, latency, attempt.source_port()))
        self._drop(job)
        stats.finished += 1
        stats.results["ok" if ok else "failed"] += 1
        if self._on_result is not None:
            self._on_result(job.config, ok, latency)
        t = job.state.observe(ok, error or None, latency, now, wall)
        if t is not None:
            self.version += 1
            self._on_transition(t)


def _fd_room(wanted: int) -> int:
    """Raise the soft fd limit towards the hard one so ``wanted`` probes fit
    beside the daemon's own files; returns what fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + 1024
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return max(16, min(wanted, int(soft) - 1024 if soft != resource.RLIM_INFINITY else wanted))
