"""Rise/fall with flap damping: what one probe's results mean (pure).

* ``fall`` consecutive failures take a probe *down*; ``rise`` consecutive
  successes bring it back *up*. A probe starts *unknown* (counted as up by
  the overlay): one success confirms it up, ``fall`` failures take it down.
  After a daemon restart it starts from its last known state instead, and
  only evidence changes it.
* Flap damping: a probe that changes between up and down more than
  ``max_changes`` times within ``window`` seconds is held down for ``hold``
  seconds (and then needs ``rise`` successes as usual). While held, results
  are still counted and shown; ``held_until`` says how long it lasts.

Time comes in as arguments (monotonic for rules, wall for display), so the
tests drive it with a fake clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from l4lb.health.overlay import Health
from l4lb.health.targets import Timing


@dataclass(frozen=True)
class Damping:
    window: float = 60.0
    max_changes: int = 4
    hold: float = 120.0


@dataclass(frozen=True)
class Transition:
    key: str
    old: Health
    new: Health
    reason: str
    at: float        # wall clock


class ProbeState:
    """The state of one probe and what the API shows about it."""

    def __init__(self, key: str, timing: Timing, damping: Damping = Damping(), *,
                 state: Health = Health.unknown, since: float = 0.0) -> None:
        self.key = key
        self.timing = timing
        self.damping = damping
        self.state = state
        self.since = since              # wall clock of the last change (or of the restored state)
        self.ok_run = 0
        self.fail_run = 0
        self.checks = self.successes = self.failures = self.transitions = 0
        self.last_ok: bool | None = None
        self.last_error: str | None = None
        self.last_latency: float | None = None
        self.last_at: float | None = None   # wall clock
        self.reason = "restored from the last run" if state is not Health.unknown else "not checked yet"
        self.not_run = 0                        # probes the LB could not start (not the backend's fault)
        self.not_run_reason: str | None = None   # why the probe cannot run now (None once it ran again)
        self._changes: deque[float] = deque()   # monotonic times of up<->down changes
        self._held_until = 0.0                  # monotonic
        self._held_until_wall = 0.0

    def held(self, now: float) -> bool:
        return now < self._held_until

    def observe(self, ok: bool, error: str | None, latency: float, now: float, wall: float) -> Transition | None:
        """One probe result at monotonic ``now`` / wall clock ``wall``."""
        self.checks += 1
        self.last_ok, self.last_error, self.last_latency, self.last_at = ok, error, latency, wall
        self.not_run_reason = None   # it runs again: why it could not is history (``not_run`` counts it)
        if ok:
            self.successes += 1
            self.ok_run += 1
            self.fail_run = 0
            need = 1 if self.state is Health.unknown else self.timing.rise
            if self.state is not Health.up and self.ok_run >= need and not self.held(now):
                n = self.ok_run
                return self._change(Health.up, f"{n} consecutive success{'es' if n > 1 else ''}", now, wall)
            return None
        self.failures += 1
        self.fail_run += 1
        self.ok_run = 0
        if self.state is not Health.down and self.fail_run >= self.timing.fall:
            n = self.fail_run
            return self._change(Health.down, f"{n} consecutive failure{'s' if n > 1 else ''}: {error}", now, wall)
        return None

    def _change(self, new: Health, reason: str, now: float, wall: float) -> Transition:
        old = self.state
        if old is not Health.unknown:
            d = self.damping
            self._changes.append(now)
            while self._changes and self._changes[0] < now - d.window:
                self._changes.popleft()
            if len(self._changes) > d.max_changes:
                self._held_until, self._held_until_wall = now + d.hold, wall + d.hold
                reason = (f"flapping: {len(self._changes)} changes in {d.window:g} s, held down for "
                          f"{d.hold:g} s (last: {reason})")
                new = Health.down
        if new is old:  # a flap caught while already down: only the hold is new
            self.reason = reason
            return Transition(self.key, old, new, reason, wall)
        self.state, self.since, self.reason = new, wall, reason
        self.transitions += 1
        return Transition(self.key, old, new, reason, wall)

    def skip(self, reason: str) -> None:
        """The LB could not run the probe: no evidence either way."""
        self.not_run += 1
        self.not_run_reason = reason

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "health": self.state.value, "since": self.since or None, "reason": self.reason,
            "last_result": None if self.last_ok is None else ("ok" if self.last_ok else "failed"),
            "last_error": self.last_error, "last_latency_seconds": self.last_latency,
            "last_check_at": self.last_at,
            "held_down_until": self._held_until_wall if self.held(now) else None,
            "checks": self.checks, "successes": self.successes, "failures": self.failures,
            "transitions": self.transitions, "not_run": self.not_run, "not_run_reason": self.not_run_reason,
        }
