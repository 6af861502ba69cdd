"""`make demo` works: the demo runs the real l4lbd and l4lbctl in the lab and
ends with "demo OK", having shown every step it promises."""

from __future__ import annotations

import subprocess
import sys

import pytest

from l4lb.lab import netns

pytestmark = [pytest.mark.netns, pytest.mark.bpf]


def test_demo_runs_end_to_end(bpffs) -> None:  # bpffs: fails loudly without root
    cp = subprocess.run([sys.executable, "-m", "l4lb.lab.demo"], capture_output=True, text=True, timeout=600)
    out = cp.stdout
    assert cp.returncode == 0 and out.rstrip().endswith("demo OK"), out[-3000:] + cp.stderr[-3000:]
    for promise in ("$ l4lbctl service add web4", "$ l4lbctl stats", "PACKETS", "(b1 got 0 new connections)",
                    "$ l4lbctl backend drain web4", "redirect", "$ l4lbctl record", "tshark's view"):
        assert promise in out, f"missing from the demo's output: {promise!r}"
    rows = [line.split() for line in out.splitlines() if line.startswith("    ") and ("in" in line.split()
                                                                                     or "out" in line.split())]
    assert any(r[1] == "in" for r in rows) and any(r[1] == "out" and r[2] == "XDP_TX" for r in rows), rows
    assert not netns.list_netns("l4demo"), "the demo left namespaces behind"
