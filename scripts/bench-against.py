#!/usr/bin/env python3
"""Run bench/datapath.py for this tree and for another revision, in
interleaved rounds (which tree goes first alternates as well), and compare
them row by row: the lowest minimum, the median of the medians and the
highest maximum over the rounds.

    sudo .venv/bin/python scripts/bench-against.py main --rounds 3

The other revision is exported with `git archive` into a temporary directory
and run with this tree's venv, its own sources first on the path (the
`l4lb.bpf_src`, `l4lb.api` and `l4lb.recorder` packages, mapped by
pyproject.toml, are linked in), so each run compiles its own BPF C; the
benches' helpers in build/ (scripts/setup.sh) are this tree's for both. Rounds
alternate (other, this; this, other; ...) so that load from other work on the
machine, and whatever favours the first or the second run of a pair, falls on
both alike; the load average is printed with the figures. The floor rows run
the same programs in both trees: their differences show the noise.
Extra arguments after `--` go to bench/datapath.py (e.g. `-- --quick`).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/datapath.py's rows: name, A min/median/max, B min/median/max, then maybe more
ROW = re.compile(r"^(\S.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)(?:\s.*)?$")
MAPPED = {"bpf_src": "bpf_src", "api": "api", "recorder": "recorder"}  # pyproject.toml package-dir


def export(rev: str, dest: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for pkg, src in MAPPED.items():
        (dest / "l4lb" / pkg).symlink_to(dest / src)
    if (ROOT / "build").is_dir():  # the benches' C helpers (scripts/setup.sh): this tree's serve both
        (dest / "build").symlink_to(ROOT / "build")


def run(tree: Path, extra: list[str]) -> dict[str, tuple[int, ...]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cp = subprocess.run([sys.executable, str(tree / "bench" / "datapath.py"), *extra], env=env, cwd=tree,
                        capture_output=True, text=True)
    if cp.returncode:
        raise SystemExit(f"bench in {tree} failed:\n{cp.stdout}\n{cp.stderr}")
    rows = {}
    for line in cp.stdout.splitlines():
        m = ROW.match(line.strip())
        if m:
            rows[m.group(1)] = tuple(int(m.group(i)) for i in range(2, 8))
    return rows


def spread(runs: list[tuple[int, ...]], method: int) -> str:
    """min / median / max over the rounds of one method (0: A, 1: B)."""
    lo = min(r[3 * method] for r in runs)
    med = statistics.median(r[3 * method + 1] for r in runs)
    hi = max(r[3 * method + 2] for r in runs)
    return f"{lo:>4} {med:>5.0f} {hi:>4}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the other revision (e.g. main)")
    ap.add_argument("--rounds", type=int, default=3)
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory(prefix="l4lb-bench-against-") as tmp:
        other = Path(tmp)
        export(args.rev, other)
        results: dict[str, list[dict[str, tuple[int, ...]]]] = {args.rev: [], "this tree": []}
        loads = []
        for r in range(args.rounds):
            # who goes first alternates too: the second of a pair measured slower here
            pair = ((args.rev, other), ("this tree", ROOT))
            for name, tree in (pair if r % 2 == 0 else pair[::-1]):
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1}/{args.rounds}: {name} (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
                results[name].append(run(tree, extra))
    names = [n for n in results[args.rev][0] if n in results["this tree"][0]]
    print(f"\nbench/datapath.py, {args.rounds} interleaved rounds each; ns/packet as min median max over the "
          f"rounds' runs; 1-min load average {min(loads):.1f}-{max(loads):.1f} at the rounds' starts")
    print("ratio columns: this tree / the other, by the lowest minimum and by the median of the medians "
          "(on a shared VM noise only adds time: the minima show the code, the medians the typical run)")
    print(f"{'row':<44}{args.rev + ' A':>17}{'this A':>17}{args.rev + ' B':>17}{'this B':>17}"
          f"{'A min':>7}{'A med':>7}{'B min':>7}{'B med':>7}")
    for n in names:
        cols = [spread([r[n] for r in results[t]], m) for m in (0, 1) for t in (args.rev, "this tree")]
        ratios = "".join(f"{ratio(results, args.rev, n, m, k):>7.2f}" for m in (0, 1) for k in (0, 1))
        print(f"{n:<44}{cols[0]:>17}{cols[1]:>17}{cols[2]:>17}{cols[3]:>17}{ratios}")


def ratio(results: dict[str, list[dict[str, tuple[int, ...]]]], rev: str, row: str, method: int, stat: int) -> float:
    """This tree over the other for one row: stat 0 the lowest minimum, 1 the median of the medians."""
    def value(tree: str) -> float:
        runs = [r[row] for r in results[tree]]
        if stat == 0:
            return min(r[3 * method] for r in runs)
        return statistics.median(r[3 * method + 1] for r in runs)
    other = value(rev)
    return value("this tree") / other if other else float("nan")


if __name__ == "__main__":
    main()
