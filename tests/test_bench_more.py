"""Half of the `bench/*.py --quick` smoke runs (test_bench.MORE), in a file of their own so
that xdist's --dist loadfile can run them beside test_bench.py's half on the other worker.
The convention and the checks are test_bench.py's."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_bench import BENCHES, MORE, TIMEOUT_S, check_quick

pytestmark = [pytest.mark.bench, pytest.mark.bpf, pytest.mark.netns]

RUNS = [b for b in BENCHES if b.name in MORE]


@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("bench", RUNS, ids=[f"{b.name} --quick" for b in RUNS])
def test_bench_quick(bench: Path) -> None:
    check_quick(bench)
