"""The probes run in a process of their own.

Thousands of checks per second keep a Python thread busy a quarter of a core;
in the daemon's process that thread would hold the GIL against every API
request (a drain's p99 went from ~20 ms to 100-200 ms in bench/health.py). So
the scheduler (l4lb/health/scheduler.py) runs in a child process started with
``spawn`` (a fresh interpreter: no locks or threads of the daemon copied), in
the daemon's network namespace and with its capabilities. They talk over a
pipe:

    daemon -> worker   ("update", {key: ProbeConfig | None}), ("details", id), ("stop",)
    worker -> daemon   ("batch", [Transition], LoopStats, {(kind, via): Latency}, [Failure]),
                       ("reply", id, data)

Transitions are sent as soon as they happen; counters and the failed checks
since the last batch (at most RECENT_FAILURES of them) ride along at most
every 0.2 s. If the worker dies, the daemon starts another with the same
probes and their last known states: nothing is lost, nothing flaps.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from l4lb.health.machine import Damping, Transition
from l4lb.health.overlay import Health
from l4lb.health.probe import Route
from l4lb.health.scheduler import Failure, LoopStats, ProbeConfig, Scheduler

log = logging.getLogger("l4lbd.health")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FLUSH_EVERY = 0.2
RECENT_FAILURES = 256   # failed checks kept for the API (the newest; counters count all of them)
NICE = 10


class Latency:
    """A Prometheus-style histogram of check durations (one per check kind and way)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1   # the first bucket >= seconds
        self.total += seconds


# --- the child ----------------------------------------------------------------------------------


def serve(conn: Any, damping: Damping, max_in_flight: int, restored: Mapping[str, tuple[Health, float]]) -> None:
    """The worker process: run probes, report transitions and counters, answer queries."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s (probe worker): %(message)s")
    # Background work: on a busy box the API (a drain) goes first; checks have their timeouts to spare.
    try:
        os.nice(NICE)
    except OSError:  # a syscall filter without @resources (the systemd unit): run at the daemon's priority
        pass
    lock = threading.Lock()
    pending: list[Transition] = []
    latency: dict[tuple[str, str], Latency] = {}
    failures: deque[Failure] = deque(maxlen=RECENT_FAILURES)   # since the last batch
    wake = threading.Event()

    def send(msg: tuple) -> None:
        with lock:
            conn.send(msg)

    def on_transition(t: Transition) -> None:
        pending.append(t)
        wake.set()

    def on_result(cfg: ProbeConfig, ok: bool, seconds: float) -> None:
        k = (cfg.spec.kind.value, cfg.spec.via)
        h = latency.get(k)
        if h is None:
            h = latency[k] = Latency()
        h.observe(seconds)

    sched = Scheduler(on_transition, on_result, on_failure=failures.append, damping=damping,
                      max_in_flight=max_in_flight, restored=restored)

    def flusher() -> None:
        counted = -1
        while True:
            wake.wait(FLUSH_EVERY)
            wake.clear()
            # Taken in two C calls (each atomic under the GIL), not by pop(0) one at a time:
            # that was quadratic when every probe changed state at once (10,000 at a start).
            batch = pending.copy()
            del pending[:len(batch)]  # what was appended meanwhile stays for the next batch
            failed = [failures.popleft() for _ in range(len(failures))]
            if counted != sched.version:   # probes by state: counted again only after a change
                counted = sched.version
                states = {h.value: 0 for h in Health}
                for job in list(sched.jobs.values()):
                    states[job.state.state.value] += 1
                sched.stats.states = states
            try:
                send(("batch", batch, sched.stats, latency, failed))
            except (OSError, ValueError):
                return

    sched.start()
    threading.Thread(target=flusher, name="l4lb-health-flush", daemon=True).start()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the daemon is gone
        if msg[0] == "update":
            sched.update(msg[1])
        elif msg[0] == "details":
            now = time.monotonic()
            out = {}
            for key, job in list(sched.jobs.items()):
                t, route = job.config.timing, job.config.route
                out[key] = {**job.state.to_dict(now), "check": job.config.spec.description,
                            "interval": t.interval, "timeout": t.timeout, "rise": t.rise, "fall": t.fall,
                            # the LB's address the probe leaves from (tunnel probes; None: the kernel's choice)
                            "source": route.source if isinstance(route, Route) else None}
            send(("reply", msg[1], out))
        elif msg[0] == "stop":
            break
    sched.stop()


# --- the daemon's side ------------------------------------------------------------------------------


class ProbeWorker:
    """Starts and feeds the worker process; the same calls as a Scheduler, across a pipe."""

    def __init__(self, on_transition: Callable[[Transition], None], *, damping: Damping, max_in_flight: int,
                 restored: Mapping[str, tuple[Health, float]]) -> None:
        self._on_transition = on_transition
        self._damping, self._max_in_flight = damping, max_in_flight
        self._states = dict(restored)                  # key -> last known (state, since): a respawn's start
        self._configs: dict[str, ProbeConfig] = {}      # what the worker runs (to start another with it)
        self._ids = itertools.count()
        self._replies: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._conn: Any = None
        self._proc: Any = None
        self._stopping = False
        self.stats = LoopStats()
        self.latency: dict[tuple[str, str], Latency] = {}
        self.failures: deque[Failure] = deque(maxlen=RECENT_FAILURES)   # the newest failed checks

    def update(self, changes: Mapping[str, ProbeConfig | None]) -> None:
        with self._lock:
            for key, cfg in changes.items():
                if cfg is None:
                    self._configs.pop(key, None)
                else:
                    self._configs[key] = cfg
            if self._proc is None:
                if not self._configs:
                    return  # no probes, no process
                self._spawn()
            else:
                self._send(("update", dict(changes)))

    def details(self, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        """key -> what the probe's state machine shows (the API's per-backend detail)."""
        with self._lock:
            if self._proc is None:
                return {}
            rid = next(self._ids)
            fut: Future = Future()
            self._replies[rid] = fut
            self._send(("details", rid))
        try:
            return fut.result(timeout)
        except Exception:  # noqa: BLE001 - a busy or restarting worker: no details this time
            return {}
        finally:
            self._replies.pop(rid, None)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            if self._proc is None:
                return
            try:
                self._conn.send(("stop",))
            except (OSError, ValueError):
                pass
            proc = self._proc
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)

    # -- internals ---------------------------------------------------------------------

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, name="l4lb-health-probes", daemon=True,
                           args=(child, self._damping, self._max_in_flight, dict(self._states)))
        proc.start()
        child.close()
        self._conn, self._proc = parent, proc
        self._send(("update", dict(self._configs)))
        threading.Thread(target=self._read, args=(parent, proc), name="l4lb-health-worker", daemon=True).start()
        log.info("health: probe worker started (pid %d, %d probes)", proc.pid, len(self._configs))

    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (OSError, ValueError) as e:
            log.error("health: probe worker unreachable (%s); it is restarted", e)

    def _read(self, conn: Any, proc: Any) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "batch":
                _, transitions, stats, latency, failed = msg
                self.stats, self.latency = stats, latency
                self.failures.extend(failed)
                for t in transitions:
                    if t.old is not t.new:
                        self._states[t.key] = (t.new, t.at)
                    self._on_transition(t)
            elif msg[0] == "reply":
                fut = self._replies.get(msg[1])
                if fut is not None:
                    fut.set_result(msg[2])
        proc.join(5)
        with self._lock:
            if self._stopping or proc is not self._proc:
                return
            log.error("health: probe worker exited (code %s); starting another with the last known states",
                      proc.exitcode)
            self._proc = None
            time.sleep(0.5)
            self._spawn()
