"""How desired-state writes went: a count per result and a latency histogram.

The control core's change path reports each write once (``observe``); the
Prometheus collector renders the counts (api/metrics.py). Pure counters, no
Prometheus types here: the core stays free of the exposition library.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

# Seconds. A one-backend PATCH is a few ms (store fsync included); a 100,000-backend
# document a few seconds; a stuck fsync or netlink call shows in the top buckets.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RESULTS = ("ok", "failed", "unchanged")
TIMED = ("ok", "failed")    # "unchanged" writes touch neither the store nor the datapath


class ApplyMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results: Counter[str] = Counter()
        self.last_seconds = 0.0
        self._hist = {r: ([0] * (len(BUCKETS) + 1), [0.0]) for r in TIMED}  # per-bucket counts (+Inf last), sum

    def observe(self, result: str, seconds: float | None = None) -> None:
        """One write's outcome; ``seconds`` from the start of staging to the commit
        (or to the failure), for the results in TIMED."""
        with self._lock:
            self.results[result] += 1
            if seconds is not None and result in self._hist:
                counts, total = self._hist[result]
                counts[bisect.bisect_left(BUCKETS, seconds)] += 1
                total[0] += seconds
                if result == "ok":
                    self.last_seconds = seconds

    def histogram(self, result: str) -> tuple[list[tuple[str, int]], float]:
        """Cumulative (le, count) buckets ending with "+Inf", and the sum of seconds."""
        with self._lock:
            counts, total = self._hist[result]
            out, acc = [], 0
            for le, n in zip([*map(str, BUCKETS), "+Inf"], counts):
                acc += n
                out.append((le, acc))
            return out, total[0]
