"""Maglev table build times (no kernel): the compiled rounds (l4lb/maglev_assign.c,
what the daemon runs) and the numpy rounds (its fallback and reference) in one run.

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

from l4lb import maglevc  # noqa: E402
from l4lb.maglev import build  # noqa: E402

CASES: tuple[tuple[int, int], ...] = ((16381, 100), (65521, 1000), (131071, 3), (16381, 1000))
SEED = bytes(range(12))
QUICK: dict = {"cases": ((251, 10), (4093, 100)), "runs": 3}   # measure(**QUICK)


def _weights(n: int) -> dict[tuple[str, int], int]:
    # Equal weights over distinct 10.x.y.z backends (exploded IPv4 == dotted quad).
    return {(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 8080): 100 for i in range(1, n + 1)}


def measure(cases: tuple[tuple[int, int], ...] = CASES, runs: int = 7, compiled: bool = True) -> list[dict]:
    """Wall time of ``build`` for each (m, N), its rounds compiled or in numpy.

    ``cold_ms``: one build with a never-seen seed, which also pays for the
    per-(m, seed) scramble permutation. ``median_ms`` etc.: repeated builds with
    one seed, as a daemon rebuilding after backend changes would see.
    """
    results = []
    build({}, 251, SEED, compiled=compiled)  # import and first-call costs are nobody's build time
    for m, n in cases:
        weights = _weights(n)
        t0 = time.perf_counter()
        build(weights, m, os.urandom(12), compiled=compiled)
        cold = time.perf_counter() - t0
        build(weights, m, SEED, compiled=compiled)  # warm the cache for SEED
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            build(weights, m, SEED, compiled=compiled)
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


def print_table(results: list[dict], reference: list[dict] | None = None) -> None:
    """``reference``: the same cases in numpy, measured in the same run (a column of medians
    and the ratio)."""
    extra = f" {'numpy median':>13} {'ratio':>6}" if reference else ""
    print(f"{'m':>7} {'N':>5} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'cold ms':>8}{extra}")
    for i, r in enumerate(results):
        more = ""
        if reference:
            ref = reference[i]["median_ms"]
            more = f" {ref:>13.1f} {ref / r['median_ms']:>5.1f}x"
        print(
            f"{r['m']:>7} {r['backends']:>5} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f}"
            f" {r['max_ms']:>8.1f} {r['cold_ms']:>8.1f}{more}"
        )


def title() -> str:
    """What ran: the compiled rounds, or numpy if the library is not built."""
    return ("compiled rounds (l4lb/maglev_assign.c), numpy rounds' median alongside" if maglevc.library()
            else "numpy rounds: l4lb/_maglev_assign*.so is NOT built (pip install the project)")


def report(quick: bool) -> None:
    """The compiled builds and, in the same run, the numpy ones they replace."""
    kw = QUICK if quick else {}
    compiled = measure(**kw) if maglevc.library() else measure(**kw, compiled=False)
    print_table(compiled, measure(**kw, compiled=False) if maglevc.library() else None)


def main() -> None:
    ap = argparse.ArgumentParser(description="Maglev table build times")
    ap.add_argument("--quick", action="store_true", help="smoke run: two small cases, 3 runs each")
    quick = ap.parse_args().quick
    print(f"Maglev build, {title()}, wall ms (median/min/max of the runs; cold = a new seed)"
          f"{' (--quick: not a measurement)' if quick else ''}")
    report(quick)


if __name__ == "__main__":
    main()
