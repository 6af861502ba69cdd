"""`make demo` works: the demo runs the real l4lbd and l4lbctl in the lab and
ends with "demo OK", having shown every step it promises. Run with --keep, the
lab outlives a kill -9 of l4lbd and the restart the demo prints; `demo down`
removes only what runs that are gone left behind."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time

import pytest

from l4lb.lab import netns

pytestmark = [pytest.mark.netns, pytest.mark.bpf]


def _until(proc: subprocess.Popen, marker: str, out: list[str], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, f"the demo ended before {marker!r}:\n{''.join(out)[-3000:]}"
        out.append(line)
        if marker in line:
            return
    raise AssertionError(f"no {marker!r} after {timeout}s:\n{''.join(out)[-3000:]}")


def test_demo_runs_end_to_end_and_its_kept_lab_survives_a_daemon_restart(bpffs) -> None:  # bpffs: root
    proc = subprocess.Popen([sys.executable, "-m", "l4lb.lab.demo", "up", "--keep"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    lines: list[str] = []
    try:
        _until(proc, "Ctrl-C here (or kill -TERM", lines)
        kept = "".join(lines)
        kill = re.search(r"kill -9 (\d+)", kept)
        start = re.search(r"^    (ip netns exec \S+ .*l4lbd --config .*&)$", kept, re.M)
        curl = re.search(r"^  (ip netns exec \S+ curl http://\S+/)$", kept, re.M)
        ctl = re.search(r"^  (L4LBCTL_SOCKET=\S+ \S+) stats", kept, re.M)
        assert kill and start and curl and ctl, kept[-2000:]
        namespaces = netns.list_netns("l4demo")
        os.kill(int(kill.group(1)), signal.SIGKILL)
        _until(proc, "l4lbd exited with -9; the lab stays up", lines, timeout=30)
        assert netns.list_netns("l4demo") == namespaces, "the kept lab went away with the daemon"
        # XDP stays attached while the daemon is away: the VIP still answers.
        assert "backend=" in subprocess.run(curl.group(1), shell=True, capture_output=True, text=True,
                                            timeout=30).stdout
        # The printed command brings l4lbd back in the lab.
        subprocess.run(["bash", "-c", start.group(1)], check=True, timeout=30)
        deadline = time.monotonic() + 120
        while "Ready:       yes" not in (st := subprocess.run(f"{ctl.group(1)} status", shell=True,
                                                                capture_output=True, text=True)).stdout:
            assert time.monotonic() < deadline, st.stdout + st.stderr
            time.sleep(0.5)
        assert "backend=" in subprocess.run(curl.group(1), shell=True, capture_output=True, text=True,
                                            timeout=30).stdout
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the first lab goes, the tier part runs
        rest, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 0 and out.rstrip().endswith("demo OK"), out[-3000:] + err[-3000:]
    for promise in ("$ l4lbctl service add web4", "$ l4lbctl stats", "PACKETS", "(b1 got 0 new connections)",
                    "$ l4lbctl backend drain web4", "redirect", "$ l4lbctl record", "tshark's view",
                    "a tier: 2 LB boxes"):
        assert promise in out, f"missing from the demo's output: {promise!r}"
    rows = [line.split() for line in out.splitlines() if line.startswith("    ") and ("in" in line.split()
                                                                                     or "out" in line.split())]
    assert any(r[1] == "in" for r in rows) and any(r[1] == "out" and r[2] == "XDP_TX" for r in rows), rows
    assert not netns.list_netns("l4demo"), "the demo left namespaces behind"


def test_demo_down_spares_live_runs() -> None:
    """`demo down` used to force-delete every l4demo-* namespace, a running demo's (or test's) too."""
    live_owner = subprocess.Popen(["sleep", "60"])
    gone_owner = subprocess.Popen(["true"])
    gone_owner.wait()
    tags = {"live": secrets.token_hex(3), "gone": secrets.token_hex(3)}
    try:
        netns.OWNER_DIR.mkdir(parents=True, exist_ok=True)
        for kind, owner in (("live", live_owner.pid), ("gone", gone_owner.pid)):
            start = netns._starttime(owner) if kind == "live" else "1"
            (netns.OWNER_DIR / f"{tags[kind]}.owner").write_text(f"{owner} {start}\n")
            netns.add(f"l4demo-{tags[kind]}-x")
        cp = subprocess.run([sys.executable, "-m", "l4lb.lab.demo", "down"], capture_output=True, text=True,
                            timeout=60)
        assert cp.returncode == 0, cp.stderr
        assert netns.exists(f"l4demo-{tags['live']}-x") and not netns.exists(f"l4demo-{tags['gone']}-x")
        assert f"spared lab l4demo-{tags['live']}-*: its demo (or test) is still running (pid {live_owner.pid})" \
            in cp.stdout, cp.stdout
    finally:
        live_owner.kill()
        live_owner.wait()
        for tag in tags.values():
            netns.delete(f"l4demo-{tag}-x")
            netns.release(tag)
