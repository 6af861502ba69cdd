"""The rare paths (tail-called programs: replies, ICMP, fragments) of a real
l4lbd's program keep working once the daemon has let BCC go and after it is
killed: the kernel empties a program array nobody holds, so the loader pins it
with the program. Run on the pinned program itself (BPF_PROG_TEST_RUN)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from scapy.all import ICMP, IP, TCP, Ether, raw
from test_daemon_harness import DaemonLab

from l4lb.datapath import libbpf

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

XDP_TX = 3
VIP = "198.51.100.10"


def run_pinned(lab: DaemonLab, frame: bytes) -> tuple[int, bytes]:
    fd = libbpf.obj_get(str(lab.pin_dirs()[0] / "prog"))
    try:
        verdict, out, _ = libbpf.test_run(fd, frame)
    finally:
        os.close(fd)
    return verdict, out


def test_rare_paths_work_from_the_pins_and_with_the_daemon_gone(bpffs: Path) -> None:
    syn = raw(Ether() / IP(src="203.0.113.7", dst=VIP) / TCP(sport=40000, dport=80, flags="S"))
    ping = raw(Ether() / IP(src="203.0.113.7", dst=VIP) / ICMP(type=8))
    lab = DaemonLab(bpffs, "edge")
    with lab.running({"web": {"vip": VIP, "port": 80, "backends": []}}):
        for when in ("daemon running (BCC let go)", "daemon killed (kill -9)"):
            verdict, out = run_pinned(lab, syn)
            assert verdict == XDP_TX and Ether(out)[TCP].flags == "RA", f"{when}: no RST for a service without backends"
            verdict, out = run_pinned(lab, ping)
            assert verdict == XDP_TX and Ether(out)[ICMP].type == 0, f"{when}: the VIP did not answer ping"
            lab.kill9()
