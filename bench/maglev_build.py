"""Maglev table build times (pure Python + numpy, no kernel).

Run: ``.venv/bin/python bench/maglev_build.py`` (``--quick``: two small cases,
3 runs each, for tests/test_bench.py). Importable: ``measure()`` returns one
dict per case and ``print_table()`` prints them, so bench/datapath.py can fold
them into its report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# bench/ is a plain folder, not a package: make the repository importable when
# this file is run directly or imported via sys.path from a sibling script.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from l4lb.maglev import build  # noqa: E402

CASES: tuple[tuple[int, int], ...] = ((16381, 100), (65521, 1000), (131071, 3), (16381, 1000))
SEED = bytes(range(12))
QUICK: dict = {"cases": ((251, 10), (4093, 100)), "runs": 3}   # measure(**QUICK)


def _weights(n: int) -> dict[tuple[str, int], int]:
    # Equal weights over distinct 10.x.y.z backends (exploded IPv4 == dotted quad).
    return {(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 8080): 100 for i in range(1, n + 1)}


def measure(cases: tuple[tuple[int, int], ...] = CASES, runs: int = 7) -> list[dict]:
    """Wall time of ``build`` for each (m, N).

    ``cold_ms``: one build with a never-seen seed, which also pays for the
    per-(m, seed) scramble permutation. ``median_ms`` etc.: repeated builds with
    one seed, as a daemon rebuilding after backend changes would see.
    """
    results = []
    build({}, 251, SEED)  # import and first-call costs are nobody's build time
    for m, n in cases:
        weights = _weights(n)
        t0 = time.perf_counter()
        build(weights, m, os.urandom(12))
        cold = time.perf_counter() - t0
        build(weights, m, SEED)  # warm the cache for SEED
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            build(weights, m, SEED)
            times.append(time.perf_counter() - t0)
        results.append(
            {
                "m": m,
                "backends": n,
                "runs": runs,
                "median_ms": statistics.median(times) * 1e3,
                "min_ms": min(times) * 1e3,
                "max_ms": max(times) * 1e3,
                "cold_ms": cold * 1e3,
            }
        )
    return results


def print_table(results: list[dict]) -> None:
    print(f"{'m':>7} {'N':>5} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'cold ms':>8}")
    for r in results:
        print(
            f"{r['m']:>7} {r['backends']:>5} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f}"
            f" {r['max_ms']:>8.1f} {r['cold_ms']:>8.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description="Maglev table build times")
    ap.add_argument("--quick", action="store_true", help="smoke run: two small cases, 3 runs each")
    quick = ap.parse_args().quick
    print(f"Maglev build, wall ms (median/min/max of the runs; cold = a new seed)"
          f"{' (--quick: not a measurement)' if quick else ''}")
    print_table(measure(**(QUICK if quick else {})))


if __name__ == "__main__":
    main()
