"""Where a start's time went, from the exec of the process to READY=1.

A restart's budget (README: ready within 2 s with a few services, 5 s at
1,000 x 100) is spent before the daemon can say anything: the interpreter and
its imports come first. So the clock starts at the process's own start time
(/proc/self/stat, in clock ticks since boot: 10 ms steps), not at main(), and
each phase is the time since the previous mark, with the CPU time the process
spent in it (on a busy box the wall time stretches, the CPU time much less).
The daemon logs the line at READY; bench/restart.py reads it back for its
per-phase table.
"""

from __future__ import annotations

import os
import time

# The line the daemon logs at READY (bench/restart.py parses it: keep the form).
PREFIX = "start timeline"


def process_start() -> float | None:
    """CLOCK_BOOTTIME seconds at which this process started (None if /proc says nothing)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # Field 22 (starttime); the command name in parentheses may hold spaces.
        ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Timeline:
    def __init__(self) -> None:
        self._origin = process_start()
        self._marks: list[tuple[str, float, float]] = []  # (phase, wall seconds, CPU seconds)
        self._last = self._origin if self._origin is not None else time.clock_gettime(time.CLOCK_BOOTTIME)
        # Process CPU time counts from the exec too; without an origin, from now.
        self._last_cpu = 0.0 if self._origin is not None else time.process_time()

    def mark(self, phase: str) -> None:
        """``phase`` ended now (it began at the previous mark, or at the exec)."""
        now, cpu = time.clock_gettime(time.CLOCK_BOOTTIME), time.process_time()
        self._marks.append((phase, now - self._last, cpu - self._last_cpu))
        self._last, self._last_cpu = now, cpu

    def summary(self) -> str:
        """``start timeline: 1.23 s (cpu 0.95) since exec: imports 0.61 (cpu 0.45), ...``."""
        wall, cpu = sum(m[1] for m in self._marks), sum(m[2] for m in self._marks)
        since = "since exec" if self._origin is not None else "since the first mark"
        return (f"{PREFIX}: {wall:.2f} s (cpu {cpu:.2f}) {since}: "
                + ", ".join(f"{p} {w:.2f} (cpu {c:.2f})" for p, w, c in self._marks))


def parse(line: str) -> dict[str, tuple[float, float]]:
    """A summary() line as {"total": (wall, cpu), phase: (wall, cpu)}, in seconds (bench/restart.py)."""
    rest = line.partition(PREFIX + ": ")[2]
    total, _, phases = rest.partition(": ")
    out = {"total": _pair(total)}
    for part in phases.split(", "):
        name, _, times = part.partition(" (cpu ")
        name, _, wall = name.rpartition(" ")
        out[name] = (float(wall), float(times.rstrip(")")))
    return out


def _pair(text: str) -> tuple[float, float]:
    wall, _, rest = text.partition(" s (cpu ")
    return float(wall), float(rest.partition(")")[0])
