"""Smoke runs of every benchmark, so none can rot unnoticed (issue 17).

The convention for ``bench/*.py`` (every file there is picked up by itself,
including benches added later):

* ``--quick`` on the command line runs the bench's every step with a few
  thousand iterations and a small state, in seconds: ``python bench/NAME.py
  --quick``, as root, from the repository root. It exits 0. Its figures are
  not measurements, so a quick run judges no target (a missed target must not
  change its exit code) and should say so in its output.
* It prints its table(s). "Printed its table" means: stdout holds a *header
  line*, two or more column titles separated by runs of two or more spaces and
  none of them a number, directly followed by a *data row*, two or more
  columns (same separator) at least one of which is a number (optional sign,
  digits with thousands commas and decimals, then optionally a unit or %:
  ``149``, ``-8``, ``1,839,871``, ``12.5 ms``, ``99%``).

All quick runs together take well under a minute on the quiet 2-core VM.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import _require_root

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted((ROOT / "bench").glob("*.py"))
# These quick runs are tests/test_bench_more.py's, every other bench (benches added later
# too) is this file's: two files of about the same run time (~2 min each on the quiet VM)
# and test count, so that xdist (--dist loadfile: a file per worker, files with more tests
# first) runs them on both workers at once, in mid-run, instead of ~4 min on one.
MORE = ("datapath.py", "flowscan.py", "maglev_build.py", "restart.py")
HERE = [b for b in BENCHES if b.name not in MORE]
TIMEOUT_S = 300         # per bench, on a machine shared with other test runs

pytestmark = [pytest.mark.bench, pytest.mark.bpf, pytest.mark.netns]

_COLUMNS = re.compile(r"\s{2,}")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(\.\d+)?\s*(%|[a-zA-Zµ/]+)?")


def _columns(line: str) -> list[str]:
    return [c for c in _COLUMNS.split(line.strip()) if c]


def _is_number(col: str) -> bool:
    return _NUMBER.fullmatch(col) is not None


def find_table(out: str) -> tuple[str, str] | None:
    """The first (header line, data row) pair of `out`, as the docstring defines them."""
    lines = out.splitlines()
    for head, row in zip(lines, lines[1:]):
        h, r = _columns(head), _columns(row)
        if len(h) >= 2 and not any(map(_is_number, h)) and len(r) >= 2 and any(map(_is_number, r)):
            return head, row
    return None


def test_find_table_tells_tables_from_other_output() -> None:
    assert find_table("title\nprobe     disarmed  +ns\nv4 early      72.0  8.0\n") == (
        "probe     disarmed  +ns", "v4 early      72.0  8.0")
    assert find_table("  label    measured  target\n  p99       13.4 ms  <= 20 ms\n")
    assert find_table("reader   samples/s\nbcc   1,839,871\n")
    assert find_table("") is None
    assert find_table("probe     disarmed  +ns\n") is None                     # no row
    assert find_table("probe     disarmed  +ns\n\nv4 early   72.0  8.0\n") is None   # not directly after
    assert find_table("probe     disarmed  +ns\nv4 early     n/a  none\n") is None  # no number
    assert find_table("Traceback (most recent call last):\n  File x, line 3\n") is None
    assert find_table("m     N\n251    10\n4093  100\n") == ("m     N", "251    10")


def _run(bench: Path) -> tuple[int, str, str, float]:
    """Run `bench --quick`; on a timeout interrupt it (its `with` blocks tear down its
    namespaces and bpffs), then kill it."""
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, str(bench.relative_to(ROOT)), "--quick"], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGINT)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        pytest.fail(f"{bench.name} --quick ran over {TIMEOUT_S} s\n--- stdout\n{out[-3000:]}\n"
                    f"--- stderr\n{err[-3000:]}", pytrace=False)
    return p.returncode, out, err, time.monotonic() - t0


def check_quick(bench: Path) -> None:
    """`bench --quick` exits 0 and prints its table (the module docstring's convention)."""
    _require_root()
    rc, out, err, took = _run(bench)
    context = f"\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    assert rc == 0, f"bench/{bench.name} --quick exited {rc} after {took:.1f} s{context}"
    assert find_table(out), f"bench/{bench.name} --quick printed no table (header line + data row){context}"
    print(f"bench/{bench.name} --quick: {took:.1f} s")


@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("bench", HERE, ids=[f"{b.name} --quick" for b in HERE])
def test_bench_quick(bench: Path) -> None:
    check_quick(bench)


def test_benches_are_found() -> None:
    # An empty glob would make pytest skip test_bench_quick quietly.
    assert BENCHES, f"no benchmarks found in {ROOT / 'bench'}"
    # A renamed bench of MORE would otherwise run in neither file.
    assert {b.name for b in BENCHES} >= set(MORE), f"{MORE} not all in {ROOT / 'bench'}"
