"""Box state: is this box (or one of its services) drained by its operator?

Per box, so never in the shared desired document (a fleet applies one
document to every box): it lives in ``state_dir/box.json``, written
atomically (temp file, fsync, rename), so a restart keeps a drain and a crash
never leaves half a file. Times are wall-clock: a drain's withdraw deadline
survives a restart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from l4lb.atomicfile import write_atomic

BOX = "*"  # the key of a whole-box drain


@dataclass(frozen=True)
class Drain:
    since: float    # wall clock (time.time()) when the drain began
    delay: float    # seconds of graceful shutdown before the withdraw

    @property
    def withdraw_at(self) -> float:
        return self.since + self.delay

    def withdrawn(self, now: float) -> bool:
        return now >= self.withdraw_at


@dataclass(frozen=True)
class BoxState:
    drains: dict[str, Drain] = field(default_factory=dict)  # BOX or a service name -> its drain

    def drain_of(self, service: str) -> Drain | None:
        """The drain that applies to ``service``: its own or the box's, whichever withdraws first."""
        found = [d for d in (self.drains.get(BOX), self.drains.get(service)) if d is not None]
        return min(found, key=lambda d: d.withdraw_at) if found else None

    def with_drain(self, key: str, drain: Drain | None) -> "BoxState":
        drains = dict(self.drains)
        if drain is None:
            drains.pop(key, None)
        elif key not in drains or drain.withdraw_at < drains[key].withdraw_at:
            # Draining again never postpones the withdraw (a repeated command
            # must not extend a drain), but a shorter delay hastens it: the
            # operator's "withdraw now" during a long graceful phase.
            drains[key] = drain
        return replace(self, drains=drains)

    def to_json(self) -> dict[str, Any]:
        return {"drains": {k: {"since": d.since, "delay": d.delay} for k, d in sorted(self.drains.items())}}

    @classmethod
    def from_json(cls, data: Any) -> "BoxState":
        drains = data.get("drains", {}) if isinstance(data, dict) else None
        if not isinstance(drains, dict):
            raise ValueError("box state: 'drains' must be a mapping")
        return cls({str(k): Drain(float(v["since"]), float(v["delay"])) for k, v in drains.items()})


class BoxStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> BoxState:
        try:
            return BoxState.from_json(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return BoxState()
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path}: unreadable box state ({e}); fix or remove it") from None

    def save(self, state: BoxState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(state.to_json()))
