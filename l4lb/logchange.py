"""Log a repeated condition when it changes, not every time it is seen.

A periodic check over 100,000 backends must not write a line per backend per
round (the next-hop refresh once logged 860 lines/s while idle). A
``Condition`` remembers the set it last reported and gives one summarised line
when the set changes: how many, and the first few.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

SHOWN = 3  # items named in a summary line


class Condition:
    def __init__(self, log: logging.Logger, what: str, cleared: str, level: int = logging.WARNING) -> None:
        self.log = log
        self.what = what          # e.g. "backends have no route"
        self.cleared = cleared    # e.g. "every backend has a route again"
        self.level = level
        self._items: frozenset[str] = frozenset()

    def update(self, items: Iterable[object]) -> str | None:
        """Report the condition now holding for ``items`` (empty: it no longer
        holds); logs and returns the line if that differs from the last report."""
        now = frozenset(str(i) for i in items)
        if now == self._items:
            return None
        before, self._items = self._items, now
        if not now:
            line = self.cleared
            self.log.info("%s", line)
            return line
        first = ", ".join(sorted(now)[:SHOWN])
        more = f", +{len(now) - SHOWN} more" if len(now) > SHOWN else ""
        change = "" if not before else f" (was {len(before)})"
        line = f"{len(now):,} {self.what}{change}: {first}{more}"
        self.log.log(self.level, "%s", line)
        return line
